"""Ray job entrypoint for training; takes the same flags as ``xray-dist train``.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train.py --cache ... --out ...

Ray sets RAY_ADDRESS for the job's driver, so it joins the cluster it was submitted to.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the submitted working dir

from xray_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
