"""A real DICOMweb archive on 127.0.0.1 for the benchmark and the tests: Orthanc with its DICOMweb
plugin (Debian's ``orthanc`` and ``orthanc-dicomweb``), its own storage, authentication on."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from base64 import b64encode
from pathlib import Path

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def available() -> bool:
    return os.path.exists(ORTHANC) and os.path.exists(PLUGIN)


class Orthanc:
    """Orthanc on a free loopback port, storing under ``root``; ``url`` is its DICOMweb root.
    ``stop()`` and ``start()`` again keep its storage (an archive that goes down and comes back)."""

    def __init__(self, root: Path, user: str, password: str, timeout: float = 60, token: str | None = None):
        """``token``: requests must carry ``Authorization: Bearer <token>`` instead of basic
        credentials (an Orthanc Lua filter checks every request, as a token-checking gateway would)."""
        self.root, self.user, self.password, self.timeout, self.token = Path(root), user, password, timeout, token
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/dicom-web"
        (self.root / "storage").mkdir(parents=True, exist_ok=True)
        auth = {"AuthenticationEnabled": True, "RegisteredUsers": {user: password}}
        if token:
            (self.root / "bearer.lua").write_text(
                "function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)\n"
                f"  return httpHeaders['authorization'] == 'Bearer {token}'\nend\n")
            auth = {"AuthenticationEnabled": False, "LuaScripts": [str(self.root / "bearer.lua")]}
        (self.root / "orthanc.json").write_text(json.dumps({
            "Name": "xray-dist", "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"), "HttpPort": self.port, "DicomServerEnabled": False,
            "RemoteAccessAllowed": False, **auth,
            "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        }))
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        log = open(self.root / "orthanc.log", "ab")
        self.proc = subprocess.Popen([ORTHANC, str(self.root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
        auth = f"Bearer {self.token}" if self.token else "Basic " + b64encode(f"{self.user}:{self.password}".encode()).decode()
        deadline = time.time() + self.timeout
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{self.port}/system", headers={"Authorization": auth})
                urllib.request.urlopen(req, timeout=2)
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not start (see {self.root / 'orthanc.log'})") from None
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None

    def client(self):
        """A DICOMweb client with this archive's credentials (to store instances with STOW-RS)."""
        import requests
        from dicomweb_client.api import DICOMwebClient

        s = requests.Session()
        if self.token:
            s.headers["Authorization"] = f"Bearer {self.token}"
        else:
            s.auth = (self.user, self.password)
        return DICOMwebClient(self.url, session=s)
