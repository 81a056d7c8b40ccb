"""A real S3 API on 127.0.0.1 for the benchmark and the tests: moto in server mode, in its own process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request


def start_moto(log=subprocess.DEVNULL, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """Start ``python -m moto.server`` on a free loopback port; returns (process, endpoint URL)
    once it answers. The caller points ``AWS_ENDPOINT_URL`` at it and terminates the process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2)
            return proc, endpoint
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}") from None
            time.sleep(0.3)
