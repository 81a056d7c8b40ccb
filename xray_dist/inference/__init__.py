"""Using a trained model: ``predict`` (local or Ray Data), ``explain`` (Grad-CAM) and ``export`` (a serving bundle).

May import: :mod:`xray_dist.results` (plots) and everything below it. TensorFlow, Ray and matplotlib are imported in
the functions that load a model, start Ray Data or draw, so importing these modules costs neither.
"""
