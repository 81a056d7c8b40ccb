"""``python -m xray_dist.cli``: the same as the ``xray-dist`` command."""
import sys

from xray_dist.cli import main

sys.exit(main())
