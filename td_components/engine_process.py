"""EngineProcess: `python -m engine serve` as a child process of TouchDesigner.

Nothing here waits on the engine. Starting returns once the process exists; a thread
reads its output (the log view, and the "listening at ADDRESS" line that says where it
serves); stopping asks it to stop (SIGTERM, which it handles by closing its sessions
and removing its shared memory) and a thread kills it if it has not gone within the
grace period. Only shutdown() waits, bounded, for when TouchDesigner closes.

Standard library only: this runs inside TouchDesigner.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import threading
from collections import deque

LISTENING = re.compile(r"listening at (\S+)")
LOG_LINES = 500  # output lines kept for the log view
STOP_GRACE_S = 5.0  # how long a stopping engine gets before it is killed


class EngineProcess:
    """One engine child process. Make it with EngineProcess.start()."""

    def __init__(self, process: subprocess.Popen):
        self._process = process
        self._lock = threading.Lock()
        self._new_lines: deque[str] = deque(maxlen=LOG_LINES)  # not yet taken by take_lines
        self._last_line = ""
        self.address: str | None = None  # where it listens, once it says so
        self.stopping = False  # stop() was called: its exit is expected
        threading.Thread(target=self._read_output, name="engine-output", daemon=True).start()

    @classmethod
    def start(cls, python: str, model: str, address: str, extra_args: str = "") -> EngineProcess:
        """Start `python -m engine serve`; raises OSError when python cannot be run, and
        ValueError for extra arguments that do not parse."""
        # Split as a POSIX shell would, on Windows too: write paths with forward slashes.
        # --parent-pid: the engine stops by itself if TouchDesigner crashes.
        command = [python, "-m", "engine", "serve", "--model", model, "--bind", address, "--parent-pid",
                   str(os.getpid()), *shlex.split(extra_args)]
        environment = dict(os.environ, PYTHONUNBUFFERED="1")  # so its log arrives line by line
        # Python settings in TouchDesigner's environment, if any, would point the engine's
        # interpreter at TouchDesigner's standard library instead of its own.
        for name in ("PYTHONHOME", "PYTHONPATH"):
            environment.pop(name, None)
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            encoding="utf-8", errors="replace", bufsize=1, env=environment,
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),  # no console window on Windows
        )
        return cls(process)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs; its exit code once it has exited (negative: killed by that signal)."""
        return self._process.poll()

    def describe(self) -> str:
        """Its state in a few words, for the Engine page."""
        code = self.returncode
        if code is not None and code < 0:
            return f"killed by signal {-code}"
        if code is not None:
            return f"exited with code {code}" + (f": {self._last_line}" if self._last_line else "")
        if self.stopping:
            return f"stopping (pid {self.pid})"
        if self.address is None:
            return f"starting (pid {self.pid})"
        return f"running (pid {self.pid}) at {self.address}"

    def take_lines(self) -> list[str]:
        """Output lines that came since the last call."""
        with self._lock:
            lines = list(self._new_lines)
            self._new_lines.clear()
        return lines

    def stop(self) -> None:
        """Ask it to stop, and kill it if it has not within STOP_GRACE_S. Returns at once."""
        if self.stopping:
            return
        self.stopping = True
        if self._process.poll() is None:
            self._process.terminate()  # SIGTERM; on Windows TerminateProcess, which ends it at once
        threading.Thread(target=self._wait_or_kill, args=(STOP_GRACE_S,), name="engine-reaper", daemon=True).start()

    def shutdown(self, timeout_s: float = STOP_GRACE_S) -> None:
        """Stop it and wait until it is gone (killing it after timeout_s): for closing TouchDesigner."""
        self.stop()
        self._wait_or_kill(timeout_s)

    def _wait_or_kill(self, timeout_s: float) -> None:
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def _read_output(self) -> None:
        with self._process.stdout as output:
            for line in output:
                line = line.rstrip()
                match = LISTENING.search(line)
                with self._lock:
                    if match and self.address is None:
                        self.address = match.group(1)
                    if line:
                        self._new_lines.append(line)
                        self._last_line = line


def python_problem(python: str) -> str | None:
    """Why `python` cannot be the engine's interpreter, or None when it may be."""
    if not python:
        return ("set Python Executable (Engine page) to the python of the environment the engine is "
                "installed in, e.g. .venv/bin/python or .venv\\Scripts\\python.exe")
    if os.path.isabs(python) and not os.path.isfile(python):
        return f"Python Executable {python} does not exist"
    return None
