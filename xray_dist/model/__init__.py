"""The network and a trained model's directory: building VGG16 with its sized head (network), and the artifacts of
a trained model (spec, weights, loading, rebuilding a full model from a trial's top weights, predicting on arrays), and calibration (a temperature and
the probabilities it gives, NumPy only).

May import: :mod:`xray_dist.data`, :mod:`xray_dist.config`, :mod:`xray_dist.infra`, :mod:`xray_dist.errors`.
TensorFlow is imported here (network at its top; artifacts only in the functions that build a model), so nothing
below this layer may import it.
"""
