"""A real `mlflow server` on loopback for tests: start it, SIGKILL it (an outage), start it again on the same store."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """One tracking server over a SQLite file and an artifact folder in `folder`, restartable on the same port."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = Path(folder), free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder}/server.db",
               "--default-artifact-root", str(self.folder / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        # no job runner: its 5 huey consumer processes (jobs these tests never submit) would take the cores from the
        # training under test at every (re)start
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        # its own session, so that kill() reaches the web workers it forks, not just the launcher
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                     env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1)
                return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server on {self.url} did not start in 120 s")

    def kill(self) -> None:
        """SIGKILL the whole server: to its clients, the store is gone mid-request."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
