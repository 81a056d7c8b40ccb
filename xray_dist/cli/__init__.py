"""The ``xray-dist`` command line and the demo: parse, build one config, call one stage, print.

:mod:`~xray_dist.cli.app` holds the parser and :func:`main`; each stage's commands have their own
module (``prepare``, ``train``, ``inference``, ``results``, ``demo``) over :mod:`~xray_dist.cli.common`.
Importing this package loads neither TensorFlow nor Ray: the stages import them when a command runs.

May import: every stage below it.
"""
from xray_dist.cli.app import main

__all__ = ["main"]
