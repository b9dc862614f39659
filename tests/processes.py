"""Helpers for tests that run hosts and engines as real processes."""

import os
import signal
import subprocess
import time
from multiprocessing import resource_tracker
from pathlib import Path

import pytest

from bridge.launcher import EngineProcess, EngineStartError
from bridge.zmq_io import ClientKeys

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PATIENCE_S = 60.0  # generous: the machine running the tests may be busy

# A host that streams black frames over shared memory until it is killed; it prints its
# session id, then "streaming" once outputs come back. argv[1] is the engine's address.
HOST_PROCESS = """
import sys
import numpy as np
from bridge.client import EngineClient

with EngineClient(sys.argv[1], transport="shm", width=64, height=64, prompt="about to be killed") as client:
    print(client.session, flush=True)
    frame = np.zeros((64, 64, 4), np.uint8)
    announced = False
    while True:
        client.send(frame)
        if client.receive(0.005) is not None and not announced:
            print("streaming", flush=True)
            announced = True
"""


def child_pids() -> set[int]:
    """This process's children, less the resource tracker Python keeps for shared memory."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == os.getpid():
            children.add(int(stat.parent.name))
    return children - {resource_tracker._resource_tracker._pid}


class ServedEngine:
    """`python -m engine serve --model tiny`, started by bridge.launcher in a child process
    of its own process group (so a test can kill it together with its resource tracker, as
    a crash or the OOM killer would); its log goes to a new file in log_dir. Extra flags
    follow the model size; auth are the keys to reach an engine started with --keys; module,
    one of tests/ with the engine's command line, replaces `engine` (faulty_engine)."""

    started: list["ServedEngine"] = []  # every engine the tests started, for leftover checks

    def __init__(self, log_dir: Path, *flags: str, address: str = "tcp://127.0.0.1:*", model_size: str = "32x32",
                 env: dict | None = None, expect_listening: bool = True, auth: ClientKeys | None = None,
                 module: str = "engine"):
        ServedEngine.started.append(self)
        if module != "engine":
            env = {"PYTHONPATH": str(TESTS), **(env or {})}
        self.launched = EngineProcess.start(model="tiny", bind=address, args=["--size", model_size, *flags], cwd=REPO,
                                            env=env, log_file=log_dir / f"engine-{time.monotonic_ns()}.log",
                                            ready_timeout_s=PATIENCE_S, auth=auth, module=module)
        self.process = self.launched.process
        try:
            self.address = self.launched.wait_until_ready()
        except EngineStartError as error:
            if expect_listening:
                self.stop()
                pytest.fail(str(error))
            self.address = None

    def log(self) -> str:
        return self.launched.log_path.read_text()

    def kill_with_its_tracker(self) -> None:
        """SIGKILL the engine's whole process group: nothing of it gets to clean up."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, sig: int | None = None) -> int:
        """Stop it as hosts do (a shutdown request; see bridge/launcher.py), or by the signal sig;
        returns its exit code."""
        if sig is None:
            return self.launched.stop(PATIENCE_S)
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=PATIENCE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.returncode
