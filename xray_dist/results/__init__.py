"""Numbers and pictures: metrics with patient-level intervals, plots, ``evaluate`` on held-out data (by
subgroup: subgroups; external caches), ``calibrate`` (temperature scaling), the HTML report and its model card
(model_card), MLflow tracking, and the layout and readers of run and sweep directories (runs).

May import: :mod:`xray_dist.model` and everything below it. Only plots imports matplotlib at its top (the others
import it, and MLflow, in the functions that draw or log), so ``report`` and ``evaluate`` load without it.
"""
