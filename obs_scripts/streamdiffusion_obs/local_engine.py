"""A local engine started and stopped from the script's buttons: `python -m engine serve`.

The engine runs in its own process with the Python environment's interpreter (it
needs torch, which OBS's Python does not have). Its output goes to a log file whose
path the script's status shows, since OBS has no console to show it in.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

STOP_WAIT_S = 5.0  # how long unload waits for the engine to close its sessions before killing it


class LocalEngine:
    def __init__(self):
        self._process: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, python: Path, model: str, address: str, repo_root: Path) -> None:
        """Start `python -m engine serve --model MODEL --bind ADDRESS`, unless one we started still runs."""
        if self.running:
            return
        with tempfile.NamedTemporaryFile("w", prefix="streamdiffusion-engine-", suffix=".log", delete=False) as log:
            self.log_path = Path(log.name)
            self._process = subprocess.Popen(
                # --parent-pid: the engine stops by itself if OBS crashes.
                [str(python), "-m", "engine", "serve", "--model", model, "--bind", address, "--parent-pid",
                 str(os.getpid())],
                cwd=str(repo_root), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=_child_environment(), creationflags=_NO_CONSOLE_WINDOW,
            )

    def stop(self, wait_s: float = 0.0) -> None:
        """Ask the engine to stop (it closes its sessions and shared memory); with wait_s,
        wait that long for it to end, then kill it."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
        if wait_s > 0:
            try:
                self._process.wait(wait_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def describe(self) -> str:
        if self._process is None:
            return "not started by this script"
        code = self._process.poll()
        if code is None:
            return f"running (pid {self._process.pid}); its log: {self.log_path}"
        return f"exited with code {code}; its log: {self.log_path}"


def _child_environment() -> dict[str, str]:
    """OBS's environment without the variables that would point the engine's Python at another
    Python's standard library or packages."""
    return {name: value for name, value in os.environ.items() if name not in ("PYTHONHOME", "PYTHONPATH")}


# On Windows a console program started from OBS would open a console window.
_NO_CONSOLE_WINDOW = subprocess.CREATE_NO_WINDOW if sys.platform == "win32" else 0
