"""Using a trained model: ``predict`` (local or Ray Data), ``explain`` (Grad-CAM) and ``export`` (a serving bundle).

May import: :mod:`xray_dist.results` (plots) and everything below it.
"""
