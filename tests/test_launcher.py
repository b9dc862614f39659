"""bridge/launcher.py against real engine processes: start, ready, shutdown, and the ways it goes wrong.

Real processes, real sockets, real shared memory. Every wait is a generous deadline in
seconds; the engine is the tiny model on the CPU.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from processes import PATIENCE_S, REPO, child_pids
from bridge.client import EngineClient
from bridge.launcher import EngineProcess, EngineStartError
from bridge.shm import list_rings, session_ring_names

pytestmark = pytest.mark.timeout(180)

DEV_SHM = Path("/dev/shm")
linux_only = pytest.mark.skipif(not DEV_SHM.is_dir(), reason="needs /dev/shm and /proc (Linux)")


def segments_owned_by(pid: int) -> list[str]:
    return [segment for ring in list_rings() if ring.owner_pid == pid for segment in ring.segments]


def session_segments(session: str) -> list[str]:
    prefix = os.path.commonprefix(session_ring_names(session))
    return [path.name for path in DEV_SHM.glob(prefix + "*")]


def stream_until_output(client: EngineClient) -> None:
    frame = np.zeros((32, 32, 3), np.uint8)
    deadline = time.monotonic() + PATIENCE_S
    while client.receive(0.05) is None:
        assert time.monotonic() < deadline, f"no output within {PATIENCE_S:g} s; the engine says {client.stats()}"
        client.send(frame)


def has_ended(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie nobody reaps still counts as ended


def wait_until(condition, what: str, patience_s: float = PATIENCE_S) -> None:
    deadline = time.monotonic() + patience_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.05)


@linux_only
def test_start_ready_and_shutdown_leave_no_process_and_no_shared_memory(tmp_path):
    children_before = child_pids()
    engine = EngineProcess.start(model="tiny", bind="tcp://127.0.0.1:*", args=["--size", "32x32"], cwd=REPO,
                                 log_file=tmp_path / "engine.log")
    try:
        address = engine.wait_until_ready(PATIENCE_S)
        assert address.startswith("tcp://127.0.0.1:") and not address.endswith("*")  # the port it picked
        assert engine.describe() == f"running (pid {engine.pid}) at {address}"
        assert not (tmp_path / "engine.address").exists()  # the ready file is read once, then removed
        with EngineClient(address, transport="shm", width=32, height=32, timeout_s=PATIENCE_S) as client:
            stream_until_output(client)  # the engine holds shared memory now
            session = client.session
            assert segments_owned_by(engine.pid)
    finally:
        started_stopping = time.monotonic()
        code = engine.stop()
    assert code == 0, engine.log_path.read_text()
    assert time.monotonic() - started_stopping < 10  # asked, not waited out and killed
    log = engine.log_path.read_text()
    assert "a host asked the engine to stop (a shutdown request)" in log and "engine stopped" in log
    assert engine.describe() == "stopped (exited with code 0: engine stopped)"
    assert child_pids() - children_before == set()
    assert segments_owned_by(engine.pid) == [] and session_segments(session) == []


def test_an_engine_that_exits_before_answering_says_why_and_what_to_do(tmp_path):
    engine = EngineProcess.start(model="tiny", args=["--no-such-flag"], cwd=REPO, log_file=tmp_path / "engine.log")
    started = time.monotonic()
    with pytest.raises(EngineStartError) as failed:
        engine.wait_until_ready(PATIENCE_S)
    assert time.monotonic() - started < PATIENCE_S
    message = str(failed.value)
    assert message.startswith("the engine exited with code 2 before it answered")
    assert "unrecognized arguments: --no-such-flag" in message  # the end of its log, quoted
    assert "Fix what it says" in message and str(engine.log_path) in message
    assert engine.describe().startswith("exited with code 2: ")


# Stand-ins for `python -m engine` (run from their folder, which -m searches first): one that
# hangs before it listens, one that says where it listens but never answers there.
HANGS = "import time\ntime.sleep(600)\n"
NEVER_ANSWERS = """
import sys, time
from pathlib import Path
Path(sys.argv[sys.argv.index("--ready-file") + 1]).write_text("tcp://127.0.0.1:9\\n")  # discard: nothing answers
time.sleep(600)
"""


@pytest.mark.parametrize("stand_in", [HANGS, NEVER_ANSWERS], ids=["hangs before listening", "never answers"])
def test_an_engine_that_never_answers_is_stopped_and_said_so_within_its_timeout(tmp_path, stand_in):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "__main__.py").write_text(stand_in)
    engine = EngineProcess.start(model="tiny", cwd=tmp_path, log_file=tmp_path / "engine.log", ready_timeout_s=3)
    started = time.monotonic()
    with pytest.raises(EngineStartError) as failed:
        engine.wait_until_ready()
    assert time.monotonic() - started < 3 + PATIENCE_S  # its timeout and the time to stop it, not the stand-in's 600 s
    assert engine.returncode is not None  # stopped, not left hanging
    message = str(failed.value)
    assert message.startswith(f"the engine (pid {engine.pid}) did not answer within 3 s, so it was stopped")
    assert "give it longer" in message
    assert engine.describe() == "did not answer within 3 s, so it was stopped"


# An application that starts an engine, streams through it until the engine holds shared
# memory, says so, and waits to be killed.
APPLICATION = """
import sys, time
import numpy as np
from bridge.client import EngineClient
from bridge.launcher import EngineProcess

engine = EngineProcess.start(model="tiny", args=["--size", "32x32"], bind="tcp://127.0.0.1:*", log_file=sys.argv[1])
client = EngineClient(engine.wait_until_ready(60), transport="shm", width=32, height=32, timeout_s=60).open()
while client.receive(0.05) is None:
    client.send(np.zeros((32, 32, 3), np.uint8))
print(engine.pid, flush=True)
time.sleep(600)
"""


@linux_only
def test_an_engine_whose_application_dies_stops_by_itself_and_unlinks_its_shared_memory(tmp_path):
    """TouchDesigner and OBS crash too; the engine (given --parent-pid) must not outlive them holding the GPU."""
    application = subprocess.Popen([sys.executable, "-c", APPLICATION, str(tmp_path / "engine.log")], cwd=REPO,
                                   stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        engine_pid = int(application.stdout.readline())
        assert segments_owned_by(engine_pid)
    finally:
        application.kill()  # the application crashes; the engine is not killed with it
        application.wait()
        application.stdout.close()
    try:
        wait_until(lambda: has_ended(engine_pid), "the engine to notice its application is gone")
    finally:
        if not has_ended(engine_pid):
            os.kill(engine_pid, signal.SIGKILL)
    assert "(pid %d) has ended; stopping" % application.pid in (tmp_path / "engine.log").read_text()
    assert segments_owned_by(engine_pid) == []


def test_logs_go_to_one_file_per_name_overwritten_at_each_start(tmp_path):
    for attempt in range(3):
        engine = EngineProcess.start(model="tiny", args=[f"--attempt-{attempt}"], cwd=REPO,
                                     log_file=tmp_path / "obs-engine.log")
        with pytest.raises(EngineStartError):
            engine.wait_until_ready(PATIENCE_S)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["obs-engine.log", "obs-engine.previous.log"]
    assert "--attempt-2" in (tmp_path / "obs-engine.log").read_text()
    assert "--attempt-1" in (tmp_path / "obs-engine.previous.log").read_text()
