"""Fitting models: ``xray-dist train`` and ``xray-dist tune``.

- :mod:`~xray_dist.training.pipeline`: the cache's splits as Ray Datasets, each worker's batches
  (:class:`~xray_dist.training.pipeline.ShardCache`), the ``tf.data`` input, devices and strategy;
  :mod:`~xray_dist.training.augment`: ``--augment light``, drawn per (seed, epoch, image);
- :mod:`~xray_dist.training.worker`: the per-worker training loop and its Ray Train session;
- :mod:`~xray_dist.training.callbacks`: the end of each epoch (weights check, validation,
  checkpoint, report); :mod:`~xray_dist.training.state`: optimizer and RNG state, weights digest;
- :mod:`~xray_dist.training.inputs`: what a run trains (class scheme, model spec, datasets, loop
  config), set up alike for every runner;
- :mod:`~xray_dist.training.driver`: the train command's driver; :mod:`~xray_dist.training.export`:
  the run's outputs; :mod:`~xray_dist.training.scalars`: TensorBoard; :mod:`~xray_dist.training.resume`:
  the same-settings rule for a rerun into an existing ``--out``;
- :mod:`~xray_dist.training.features`: the frozen-feature cache; :mod:`~xray_dist.training.inprocess`:
  one worker in the calling process (``train --runner inprocess``, one-worker sweep trials); :mod:`~xray_dist.training.tune`: the Ray Tune sweep, and
  :mod:`~xray_dist.training.sweep_results` what it writes; :mod:`~xray_dist.training.backend`:
  MultiWorkerMirroredStrategy's Ray Train backend without a TensorFlow import.

May import: :mod:`xray_dist.inference`, :mod:`xray_dist.results` and everything below them.
"""
