"""The ``xray-dist`` command line and the demo: parse, build one config, call one stage.

Importing this package loads neither TensorFlow nor Ray: each command imports its stage when it runs.
"""
from xray_dist.cli.app import main

__all__ = ["main"]
