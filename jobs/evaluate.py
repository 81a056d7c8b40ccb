"""Ray job entrypoint for ``xray-dist evaluate``; takes the same flags.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/evaluate.py --model SWEEP --cache CACHE

Paths may be object-store URIs (s3://bucket/prefix): every node reads them from there.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the submitted working dir

from xray_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
