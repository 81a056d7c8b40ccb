"""Ray job entrypoint for sweeps; takes the same flags as ``xray-dist tune``.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/tune.py --cache ... --out ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the submitted working dir

from xray_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
