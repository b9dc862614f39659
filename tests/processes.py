"""Helpers for tests that run hosts and engines as real processes."""

import os
import signal
import subprocess
import time
from multiprocessing import resource_tracker
from pathlib import Path

import numpy as np
import pytest

from bridge.client import EngineClient
from bridge.launcher import EngineProcess, EngineStartError
from bridge.zmq_io import ClientKeys

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PATIENCE_S = 60.0  # generous: the machine running the tests may be busy
FRAMES_PER_CHUNK = 4  # frames of a chunk after the first

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


def child_pids(parent: int | None = None) -> set[int]:
    """The children of parent (this process's, less the resource tracker Python keeps for shared memory)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == (os.getpid() if parent is None else parent):
            children.add(int(stat.parent.name))
    return children - {resource_tracker._resource_tracker._pid} if parent is None else children


class ServedEngine:
    """`python -m engine serve --model tiny`, started by bridge.launcher in a child process
    of its own process group (so a test can kill it together with its resource tracker, as
    a crash or the OOM killer would); its log goes to a new file in log_dir. Extra flags
    follow the model size; auth are the keys to reach an engine started with --keys; module,
    one of tests/ with the engine's command line, replaces `engine` (faulty_engine)."""

    started: list["ServedEngine"] = []  # every engine the tests started, for leftover checks

    def __init__(self, log_dir: Path, *flags: str, address: str = "tcp://127.0.0.1:*", model_size: str = "32x32",
                 env: dict | None = None, expect_listening: bool = True, auth: ClientKeys | None = None,
                 module: str = "engine", ranks: int = 1):
        ServedEngine.started.append(self)
        if module != "engine":
            env = {"PYTHONPATH": str(TESTS), **(env or {})}
        self.launched = EngineProcess.start(model="tiny", bind=address, args=["--size", model_size, *flags], cwd=REPO,
                                            env=env, log_file=log_dir / f"engine-{time.monotonic_ns()}.log",
                                            ready_timeout_s=PATIENCE_S, auth=auth, module=module, ranks=ranks)
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


class Host:
    """Streams frames through an EngineClient one at a time and records what comes back.

    send_without_drops waits, before each frame, until the engine has taken in every
    earlier frame and the chunk being collected has room: frames are then never
    dropped as stale, so every input is processed and the outputs are predictable.
    """

    def __init__(self, client: EngineClient):
        self.client = client
        self.sent: dict[int, int] = {}  # seq -> t_capture_ns
        self.outputs = []  # (Output, the newest seq sent when it arrived)

    def collect(self, timeout: float = 0.0) -> None:
        output = self.client.receive(timeout)
        if output is not None:
            self.outputs.append((output, max(self.sent, default=-1)))

    def send_without_drops(self, frame: np.ndarray) -> None:
        deadline = time.monotonic() + PATIENCE_S
        while True:
            stats = self.client.stats()
            waiting = len(self.sent) - stats["frames_processed"]
            if stats["frames_in"] == len(self.sent) and waiting < stats["next_chunk_frames"]:
                break
            assert time.monotonic() < deadline, f"the engine stopped taking frames: {stats}"
            self.collect(0.002)
        t_capture_ns = time.monotonic_ns()
        self.sent[self.client.send(frame, t_capture_ns)] = t_capture_ns
        self.collect()

    def wait_for_output(self, seq: int) -> None:
        deadline = time.monotonic() + PATIENCE_S
        while not self.outputs or self.outputs[-1][0].seq < seq:
            assert time.monotonic() < deadline, (
                f"output {seq} never came; got {self.seqs()[-5:]}, engine says {self.client.stats()}")
            self.collect(0.05)

    def seqs(self) -> list[int]:
        return [output.seq for output, _ in self.outputs]

    def frame(self, seq: int) -> np.ndarray:
        return next(output.pixels for output, _ in self.outputs if output.seq == seq)


def last_finished_seq(frames_sent: int, first_chunk: int, lag: int) -> int:
    """The newest input whose output can be out once frames_sent frames went in: the last
    complete chunk, less the lag."""
    return first_chunk + FRAMES_PER_CHUNK * ((frames_sent - first_chunk) // FRAMES_PER_CHUNK) - 1 - lag
