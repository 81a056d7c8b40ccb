"""Numbers and pictures: metrics with patient-level intervals, plots, ``evaluate`` on held-out data, the HTML
report, and MLflow tracking.

May import: :mod:`xray_dist.model` and everything below it.
"""
