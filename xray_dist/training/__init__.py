"""Fitting models: the input pipeline, the worker loop under MultiWorkerMirroredStrategy, optimizer and RNG state,
the Ray Train driver and the run's export, the frozen-feature cache, in-process trials, and the Ray Tune sweep.

May import: :mod:`xray_dist.inference`, :mod:`xray_dist.results` and everything below them.
"""
