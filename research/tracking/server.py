"""``lab server``: an MLflow tracking server for many jobs (``tracking.server`` in the config).

One SQLite file cannot take the writes of a cluster's jobs; a server in front of PostgreSQL can.
It binds 127.0.0.1 unless ``tracking.server.host`` says otherwise; jobs then log with
``tracking.uri=http://HOST:PORT``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from components.registry import require
from research.runtime import redact


def server_command(server: Any) -> list[str]:
    """The ``mlflow server`` command line for a ``tracking.server`` config node."""
    port = int(server.port)
    require(0 < port < 65536, "tracking.server.port", server.port, "1-65535")
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    cmd = [mlflow, "server", "--backend-store-uri", str(server.backend),
           "--artifacts-destination", str(Path(server.artifacts).expanduser().resolve()),
           "--host", str(server.host), "--port", str(port),
           "--workers", str(int(server.workers))]  # fmt: skip
    if server.get("app_name"):
        cmd += ["--app-name", str(server.app_name)]
    if server.get("allowed_hosts"):
        cmd += ["--allowed-hosts", str(server.allowed_hosts)]
    return cmd


def serve(server: Any) -> None:
    """Replace this process with the server (Ctrl-C stops it)."""
    cmd = server_command(server)
    print(f"MLflow server on http://{server.host}:{server.port} (runs in {redact(str(server.backend))}); "
          f"jobs log with tracking.uri=http://{server.host}:{server.port}", flush=True)  # fmt: skip
    os.execv(cmd[0], cmd)
