"""EngineProcess: start `python -m engine serve` as a child, know when it answers, stop it cleanly.

    engine = EngineProcess.start(model="tiny", bind="tcp://127.0.0.1:*")
    address = engine.wait_until_ready()     # or, not to wait: engine.address (None until it answers)
    ...                                      # hosts connect to address
    engine.stop()                            # or stop(wait=False), which returns at once

Starting returns once the process exists. A thread of the launcher's own then waits for
the engine to say where it listens (`serve --ready-file`, which works for a port the
engine picks, `tcp://127.0.0.1:*`) and to answer a ping there: only then is it ready.
An engine that exits first, or does not answer within ready_timeout_s, is a start
error (start_error, and wait_until_ready raises EngineStartError) saying what happened,
the end of its log and what to do; one that never answers is stopped.

Stopping asks the engine through the protocol (a shutdown request, which it takes as
SIGTERM: sessions closed, shared memory unlinked, on Windows too), waits a bounded
time, then terminates it, and kills it only if that fails as well. The engine gets
--parent-pid, so it stops by itself when the application that started it ends.

The engine's output (stdout and stderr) goes to one log file, log_path(name) unless
told otherwise: overwritten at each start, the run before kept beside it as
NAME.previous.log, so the folder never holds more than two per name.

Standard library and the bridge only: TouchDesigner, OBS and the tests use it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

from .protocol import Shutdown
from .zmq_io import DEFAULT_ADDRESS, AuthenticationError, ClientKeys, HostSocket, RemoteError, check_address

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # from start to the first answer: importing torch on a slow disk takes a while
STOP_TIMEOUT_S = 15.0  # the engine's clean stop waits up to 10 s for a step (or a model load) in progress
TERMINATE_TIMEOUT_S = 5.0  # after terminate(), before kill()
REQUEST_TIMEOUT_S = 2.0  # the ping and the shutdown request
LOOK_EVERY_S = 0.05  # how often the launcher looks for the ready file
LOG_TAIL_LINES = 12  # how much of the log a start error quotes

if sys.platform == "win32":
    # Its own process group (a console's Ctrl-C reaches only the application, which stops
    # the engine itself), and no console window.
    _PROCESS_GROUP = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
else:
    _PROCESS_GROUP = {"start_new_session": True}


class EngineStartError(RuntimeError):
    """The engine did not become ready; the message says what happened and what to do."""


def log_folder() -> Path:
    """The one folder engine logs go to: the user's local state folder, per platform."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Logs"
    else:
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "streamdiffusion"


def log_path(name: str) -> Path:
    """Where the engine an application called `name` starts writes its log."""
    return log_folder() / f"{name}-engine.log"


class EngineProcess:
    """One engine child process. Make it with EngineProcess.start()."""

    def __init__(self, process: subprocess.Popen, log_file: Path, ready_file: Path, ready_timeout_s: float,
                 auth: ClientKeys | None):
        self.process = process
        self.log_path = log_file
        self._ready_file = ready_file
        self._auth = auth
        self._ready_timeout_s = ready_timeout_s
        self.address: str | None = None  # where it answers, once it does
        self.start_error: str | None = None  # why it did not become ready, once that is known
        self._gave_up = False  # it did not answer in time, and the launcher stopped it
        self._settled = threading.Event()  # set once it answers, fails to, or is stopped first
        self._stopping = threading.Event()
        self._stopper: threading.Thread | None = None
        self._log_read_at = 0  # how far new_log_lines has read
        threading.Thread(target=self._wait_for_answer, name="engine-launcher", daemon=True).start()

    @classmethod
    def start(cls, *, model: str, python: str = sys.executable, bind: str = DEFAULT_ADDRESS,
              args: Sequence[str] = (), cwd: str | Path | None = None, env: Mapping[str, str] | None = None,
              log_file: str | Path | None = None, ready_timeout_s: float = READY_TIMEOUT_S,
              auth: ClientKeys | None = None, module: str = "engine", ranks: int = 1) -> EngineProcess:
        """Start `python -m MODULE serve --model MODEL --bind BIND ARGS...`; returns at once.
        With ranks over 1, torchrun starts it over that many ranks (one GPU each: the DiT's
        blocks spread over them, engine/parallel/).

        env adds variables to this process's environment; auth are the keys to ping and stop an
        engine started with --keys; module is one whose command line is the engine's (tests start
        one that injects faults). Raises ValueError when bind is not a ZeroMQ address, OSError
        when python cannot be run."""
        check_address(bind, "bind")
        log_file = Path(log_file) if log_file is not None else log_path("engine")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        if log_file.exists():
            log_file.replace(log_file.with_name(log_file.stem + ".previous" + log_file.suffix))
        ready_file = log_file.with_suffix(".address")
        ready_file.unlink(missing_ok=True)  # a stale one would point at an engine long gone
        if ranks < 1:
            raise ValueError(f"ranks must be at least 1, got {ranks}")
        torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
        command = [str(python), *torchrun, "-m", module, "serve", "--model", model, "--bind", bind,
                   "--ready-file", str(ready_file), "--parent-pid", str(os.getpid()), *args]
        # PYTHONUNBUFFERED: its log arrives line by line. PYTHONHOME and PYTHONPATH of a host
        # application (TouchDesigner, OBS) would point the engine's Python at the host's library.
        environment = {name: value for name, value in os.environ.items() if name not in ("PYTHONHOME", "PYTHONPATH")}
        environment.update(env or {}, PYTHONUNBUFFERED="1")
        with open(log_file, "w", encoding="utf-8") as output:
            process = subprocess.Popen(command, cwd=cwd, env=environment, stdin=subprocess.DEVNULL, stdout=output,
                                       stderr=subprocess.STDOUT, **_PROCESS_GROUP)
        log.info("engine starting (pid %d): %s; its log: %s", process.pid, " ".join(command), log_file)
        return cls(process, log_file, ready_file, ready_timeout_s, auth)

    # -- state -------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs; its exit code once it has exited (negative: killed by that signal)."""
        return self.process.poll()

    @property
    def stopping(self) -> bool:
        """stop() was called: its exit is expected."""
        return self._stopping.is_set()

    def wait_until_ready(self, timeout_s: float | None = None) -> str:
        """Wait until the engine answers (at most ready_timeout_s from the start, or timeout_s
        from now); returns its address. Raises EngineStartError saying why it did not."""
        if not self._settled.wait(timeout_s):
            raise EngineStartError(f"the engine (pid {self.pid}) has not answered yet; it goes on starting")
        if self.start_error is not None:
            raise EngineStartError(self.start_error)
        if self.address is None:
            raise EngineStartError(f"the engine (pid {self.pid}) was stopped before it answered")
        return self.address

    def describe(self) -> str:
        """Its state in a few words, for a status line."""
        code = self.returncode
        if code is None:
            if self.stopping:
                return f"stopping (pid {self.pid})"
            if self.address is None:
                return f"starting (pid {self.pid})"
            return f"running (pid {self.pid}) at {self.address}"
        if self._gave_up:
            return f"did not answer within {self._ready_timeout_s:g} s, so it was stopped"
        if code < 0:
            ended = f"killed by signal {-code}"
        else:
            last = self.log_tail(1)
            ended = f"exited with code {code}" + (f": {last}" if last else "")
        return f"stopped ({ended})" if self.stopping else ended

    # -- its log -----------------------------------------------------------------------
    def new_log_lines(self) -> list[str]:
        """The log's complete lines written since the last call."""
        try:
            with open(self.log_path, "rb") as output:
                output.seek(self._log_read_at)
                written = output.read()
        except FileNotFoundError:
            return []
        complete = written[:written.rfind(b"\n") + 1]
        self._log_read_at += len(complete)
        return complete.decode("utf-8", errors="replace").splitlines()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The log's last lines (not blank ones)."""
        try:
            with open(self.log_path, "rb") as output:
                output.seek(max(0, output.seek(0, os.SEEK_END) - 64 * 1024))
                text = output.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])

    # -- stopping ----------------------------------------------------------------------
    def stop(self, timeout_s: float = STOP_TIMEOUT_S, wait: bool = True) -> int | None:
        """Ask the engine to stop through the protocol, give it timeout_s, then terminate it,
        and kill it as a last resort. Returns its exit code; with wait=False it does all that
        on a thread and returns None at once (returncode says when it has gone)."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._stopper = threading.Thread(target=self._stop, args=(timeout_s,), name="engine-stopper",
                                             daemon=True)
            self._stopper.start()
        if not wait:
            return None
        self._stopper.join()
        return self.process.returncode

    def _stop(self, timeout_s: float) -> None:
        if self.process.poll() is not None:
            return
        if self.address is not None and self._ask_to_stop():
            try:
                self.process.wait(timeout_s)
                return
            except subprocess.TimeoutExpired:
                log.warning("the engine (pid %d) did not stop within %g s of the shutdown request; terminating it",
                            self.pid, timeout_s)
        self._end_process(timeout_s)

    def _ask_to_stop(self) -> bool:
        try:
            with HostSocket(self.address, auth=self._auth) as socket:
                socket.request(Shutdown(), REQUEST_TIMEOUT_S)
        except (TimeoutError, RemoteError, AuthenticationError) as error:
            log.info("the engine at %s did not take the shutdown request (%s); terminating it", self.address, error)
            return False
        return True

    def _end_process(self, timeout_s: float) -> None:
        """Terminate (SIGTERM, a clean stop on POSIX; TerminateProcess on Windows), then kill."""
        self.process.terminate()
        try:
            self.process.wait(min(timeout_s, TERMINATE_TIMEOUT_S))
        except subprocess.TimeoutExpired:
            log.warning("the engine (pid %d) did not end when terminated; killing it", self.pid)
            self.process.kill()
            self.process.wait()

    # -- the launcher's thread ---------------------------------------------------------
    def _wait_for_answer(self) -> None:
        deadline = time.monotonic() + self._ready_timeout_s
        try:
            address = self._wait_for_address(deadline)
            if address is not None and self._ping(address, deadline):
                self.address = address
                log.info("the engine (pid %d) answers at %s", self.pid, address)
        finally:
            self._ready_file.unlink(missing_ok=True)
            self._settled.set()

    def _wait_for_address(self, deadline: float) -> str | None:
        while not self._ready_file.exists():
            if not self._still_starting(deadline):
                return None
            time.sleep(LOOK_EVERY_S)
        return self._ready_file.read_text().strip()

    def _ping(self, address: str, deadline: float) -> bool:
        with HostSocket(address, auth=self._auth) as socket:
            while self._still_starting(deadline):
                try:
                    socket.ping(min(REQUEST_TIMEOUT_S, max(deadline - time.monotonic(), 0.01)))
                    return True
                except TimeoutError:
                    continue
                except AuthenticationError as error:
                    self._fail(f"the engine at {address} refused the launcher's keys: {error}")
                    return False
        return False

    def _still_starting(self, deadline: float) -> bool:
        """False, with start_error set, once the engine exited or the deadline passed; False
        too once stop() was called."""
        if self._stopping.is_set():
            return False
        code = self.process.poll()
        if code is not None:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            self._fail(f"the engine {how} before it answered. Its log ({self.log_path}) ends:\n{self.log_tail()}\n"
                       "Fix what it says and start it again")
            return False
        if time.monotonic() >= deadline:
            self._gave_up = True
            self._fail(f"the engine (pid {self.pid}) did not answer within {self._ready_timeout_s:g} s, "
                       f"so it was stopped. Its log ({self.log_path}) ends:\n{self.log_tail()}\n"
                       "If it was still busy starting (a slow disk, a first run), give it longer; otherwise fix "
                       "what the log says")
            self._end_process(TERMINATE_TIMEOUT_S)
            return False
        return True

    def _fail(self, message: str) -> None:
        self.start_error = message
        log.warning("%s", message)
