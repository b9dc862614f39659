"""Hardening: authentication (CURVE), limits, and faults, against real engine processes.

Every socket is on 127.0.0.1: an engine given keys takes the authenticated path on
loopback exactly as it would on a wider address. Nothing here asserts timings; every
wait is a generous deadline.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from faulty_engine import OOM_PROMPT_ENV
from processes import HOST_PROCESS, PATIENCE_S, REPO, ServedEngine as Engine
from bridge.client import AuthenticationError, EngineClient, RemoteError
from bridge.protocol import PROTOCOL_VERSION, ErrorCode, ProtocolError
from bridge.shm import RingReader, RingWriter, list_rings, reclaim_abandoned_rings, session_ring_names
from bridge.zmq_io import ClientKeys, ServerKeys, make_keys
from engine import cli
from engine.models.weights import build_models
from engine.server import EngineServer, Limits

pytestmark = pytest.mark.timeout(180)

DEV_SHM = Path("/dev/shm")
linux_only = pytest.mark.skipif(not DEV_SHM.is_dir(), reason="needs /dev/shm and /proc (Linux)")
HOST_SIZE = 64


def client(address: str, transport: str = "zmq", **kwargs) -> EngineClient:
    kwargs.setdefault("timeout_s", PATIENCE_S)
    return EngineClient(address, transport=transport, width=HOST_SIZE, height=HOST_SIZE, **kwargs)


def stream_until_output(engine_client: EngineClient) -> None:
    """Send frames until one comes back, for up to PATIENCE_S: a time, not a number of frames,
    since a busy machine steps slower while frames go out as fast."""
    frame = np.zeros((HOST_SIZE, HOST_SIZE, 3), np.uint8)
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        engine_client.send(frame)
        if engine_client.receive(0.1) is not None:
            return
    pytest.fail(f"no output within {PATIENCE_S:g} s of streaming; the engine says {engine_client.stats()}")


def segments_owned_by(pid: int) -> list[str]:
    return [segment for ring in list_rings() if ring.owner_pid == pid for segment in ring.segments]


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.05)


# ---------------------------------------------------------------------- authentication


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    make_keys(directory, "studio")
    make_keys(directory / "elsewhere", "intruder")  # a valid pair the engine has never heard of
    return directory


def test_keys_are_made_once_private_and_the_engine_accepts_only_listed_clients(tmp_path, capsys):
    directory = tmp_path / "keys"
    cli.main(["keys", "--dir", str(directory), "--client", "studio"])
    assert "server.key" in capsys.readouterr().out
    server_public = (directory / "server.key").read_bytes()
    cli.main(["keys", "--dir", str(directory), "--client", "laptop"])  # a second host; the engine's pair stays
    assert (directory / "server.key").read_bytes() == server_public
    assert sorted(p.name for p in (directory / "authorized_clients").iterdir()) == ["laptop.key", "studio.key"]
    for path in directory.rglob("*.key*"):
        assert path.stat().st_mode & 0o777 == 0o600, path
    with pytest.raises(SystemExit, match="exists already"):
        cli.main(["keys", "--dir", str(directory), "--client", "studio"])
    # What each side loads: the engine its pair and the folder; a host the engine's public key and its pair.
    server = ServerKeys.from_dir(directory)
    host = ClientKeys.load(directory / "server.key", directory / "studio.key_secret")
    assert host.server_public == server.keys.public
    assert ClientKeys.load(server.keys.public.decode(), (host.keys.public, host.keys.secret)) == host


def test_a_wide_bind_without_keys_refuses_to_start_and_says_how_to_make_them():
    result = subprocess.run([sys.executable, "-m", "engine", "serve", "--bind", "tcp://0.0.0.0:5555"], cwd=REPO,
                            capture_output=True, text=True, timeout=PATIENCE_S)
    assert result.returncode == 1
    assert "python -m engine keys" in result.stderr and "--keys" in result.stderr
    assert "listening" not in result.stdout


@linux_only
def test_only_a_host_with_a_listed_key_gets_a_session(tmp_path, keys):
    server_key = keys / "server.key"
    engine = Engine(tmp_path, "--keys", str(keys), auth=ClientKeys.load(server_key, keys / "studio.key_secret"))
    try:
        refused = {
            "no keys": {},
            "a key the engine does not list": dict(server_key=server_key,
                                                   client_keys=keys / "elsewhere" / "intruder.key_secret"),
            "the wrong server key": dict(server_key=keys / "elsewhere" / "server.key",
                                         client_keys=keys / "studio.key_secret"),
        }
        for credentials in refused.values():
            for transport in ("zmq", "shm"):
                with pytest.raises(AuthenticationError):
                    client(engine.address, transport, **credentials).open()
        # A hand-made plain socket speaking the protocol gets no answer at all.
        context = zmq.Context()
        plain = context.socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(engine.address)
        hello = {"type": "hello", "version": PROTOCOL_VERSION, "model": "default", "width": HOST_SIZE,
                 "height": HOST_SIZE, "prompt": "", "transport": "shm", "id": 1}
        plain.send(msgpack.packb(hello))  # queued: the handshake never completes, so it never leaves
        assert not plain.poll(1000, zmq.POLLIN)
        plain.close()
        context.term()
        # Nothing was allocated for any of them: no session, no shared memory.
        assert "opened" not in engine.log()
        assert segments_owned_by(engine.process.pid) == []

        for transport in ("zmq", "shm"):
            with client(engine.address, transport, server_key=server_key,
                        client_keys=keys / "studio.key_secret") as studio:
                stream_until_output(studio)
                assert studio.state == "streaming"

        # Keys added or removed while the engine runs apply at the next connection.
        made = make_keys(keys, "latecomer")
        with client(engine.address, "zmq", server_key=server_key, client_keys=made["client_secret"]) as latecomer:
            stream_until_output(latecomer)
        made["authorized"].unlink()
        with pytest.raises(AuthenticationError):
            client(engine.address, "zmq", server_key=server_key, client_keys=made["client_secret"]).open()
    finally:
        assert engine.stop() == 0, engine.log()


def test_a_loopback_engine_needs_no_keys_and_says_so(tmp_path):
    engine = Engine(tmp_path)
    try:
        assert "no keys needed" in engine.log()
        with client(engine.address) as plain:
            stream_until_output(plain)
    finally:
        assert engine.stop() == 0, engine.log()


# ----------------------------------------------------------------------------- limits


@pytest.fixture(scope="module")
def limited_engine():
    limits = Limits(max_sessions=2, max_frame_width=128, max_frame_height=96, max_prompt_chars=20,
                    max_model_size=64)
    server = EngineServer(lambda: build_models("tiny"), model="tiny", address="tcp://127.0.0.1:*",
                          model_size=(32, 32), limits=limits)
    server.start()
    yield server
    server.close()
    assert not server.failed


LIMIT_REFUSALS = {
    "a frame wider than --max-frame-size": (dict(width=129, height=64), "out_of_range", "width", "--max-frame-size"),
    "a frame taller than --max-frame-size": (dict(width=64, height=97), "out_of_range", "height", "--max-frame-size"),
    "a prompt over --max-prompt-chars": (dict(prompt="x" * 21), "out_of_range", "prompt", "--max-prompt-chars"),
    "a model size over --max-model-size": (dict(model_width=80), "out_of_range", "params.model_width", "from 16 to 64"),
}


@pytest.mark.parametrize("hello, code, field, hint", LIMIT_REFUSALS.values(), ids=LIMIT_REFUSALS.keys())
def test_a_hello_over_a_limit_is_refused_naming_the_field_and_the_setting(limited_engine, hello, code, field, hint):
    hello = {"width": HOST_SIZE, "height": HOST_SIZE, **hello}
    with pytest.raises(RemoteError) as refused:
        EngineClient(limited_engine.address, transport="zmq", timeout_s=PATIENCE_S, **hello).open()
    assert (refused.value.code, refused.value.field) == (code, field)
    assert hint in refused.value.message


def test_limits_hold_for_a_running_session_and_for_the_number_of_sessions(limited_engine):
    with client(limited_engine.address) as first, client(limited_engine.address, "shm") as second:
        schema = first.info["schema"]
        assert schema["prompt"]["maximum"] == 20 and schema["model_width"]["maximum"] == 64
        for params, field in (({"prompt": "y" * 21}, "params.prompt"), ({"model_height": 128}, "params.model_height")):
            with pytest.raises(RemoteError) as refused:
                first.set(**params)
            assert (refused.value.code, refused.value.field) == ("out_of_range", field)
        with pytest.raises(RemoteError) as refused:
            client(limited_engine.address).open()
        assert refused.value.code == "too_large" and "--max-sessions" in refused.value.message
        stream_until_output(second)  # the sessions within the limits go on


@pytest.mark.parametrize("flags, message", [
    (["--max-frame-size", "1920"], "write --max-frame-size WIDTHxHEIGHT in pixels, e.g. --max-frame-size 1920x1080"),
    (["--max-sessions", "0"], "max_sessions must be from 1"),
    (["--max-model-size", "16", "--size", "32x32"], "over --max-model-size 16"),
], ids=["malformed size", "no sessions", "default size over the limit"])
def test_bad_limit_flags_stop_the_engine_before_it_listens(flags, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["serve", "--bind", "tcp://127.0.0.1:*", *flags])


# ------------------------------------------------------------------------------ faults


@linux_only
def test_an_engine_killed_outright_leaves_segments_the_next_start_removes_and_hosts_resume(tmp_path):
    first = Engine(tmp_path)
    second = None
    try:
        with client(first.address, "shm", prompt="outlives its engine") as over_shm, \
                client(first.address, "zmq", prompt="outlives its engine") as over_zmq:
            for engine_client in (over_shm, over_zmq):
                stream_until_output(engine_client)
            old_sessions = {over_shm.session, over_zmq.session}
            orphaned = segments_owned_by(first.process.pid)
            assert orphaned  # the output ring of the shm session

            first.kill_with_its_tracker()  # while the hosts stream: no handler, no resource tracker
            assert set(orphaned) <= {p.name for p in DEV_SHM.iterdir()}

            # Removed as the next engine starts (or sooner, by any other engine starting on this machine).
            second = Engine(tmp_path, address=first.address)
            assert not set(orphaned) & {p.name for p in DEV_SHM.iterdir()}
            for engine_client in (over_shm, over_zmq):
                wait_until(lambda: send_and_receive(engine_client) and engine_client.session not in old_sessions,
                           "the hosts streaming through the new engine")
                assert engine_client.stats()["params"]["prompt"] == "outlives its engine"
    finally:
        if second is not None:
            assert second.stop() == 0, second.log()
        first.stop()


@pytest.mark.slow
def test_an_engine_paused_longer_than_the_hosts_patience_survives_and_hosts_resume(tmp_path):
    """SIGSTOP stands for a debugger, a suspended laptop or a machine swapping hard. libzmq
    used to abort the whole engine on resume when ZMTP heartbeats had timed out meanwhile
    (in about half of the runs of this test)."""
    engine = Engine(tmp_path)
    try:
        with client(engine.address, "shm") as over_shm, client(engine.address, "zmq") as over_zmq:
            for engine_client in (over_shm, over_zmq):
                stream_until_output(engine_client)
            engine.process.send_signal(signal.SIGSTOP)
            paused_until = time.monotonic() + 12  # past the client's and the old heartbeat's timeouts
            frame = np.zeros((HOST_SIZE, HOST_SIZE, 3), np.uint8)
            while time.monotonic() < paused_until:
                for engine_client in (over_shm, over_zmq):
                    engine_client.send(frame)
                    engine_client.receive(0.02)
            engine.process.send_signal(signal.SIGCONT)
            for engine_client in (over_shm, over_zmq):
                wait_until(lambda: send_and_receive(engine_client), f"{engine_client.transport} streaming again")
            assert engine.process.poll() is None, engine.log()
    finally:
        assert engine.stop() == 0, engine.log()


RING_OWNER = """
import sys
from bridge.shm import RingWriter

ring = RingWriter.create(8, 8)
ring.resize(16, 16)
print(ring.name, flush=True)
sys.stdin.readline()
"""


@linux_only
def test_reclaiming_removes_the_rings_of_dead_owners_and_only_those(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", RING_OWNER], cwd=REPO, text=True, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, start_new_session=True)
    try:
        dead_ring = owner.stdout.readline().strip()
        os.killpg(owner.pid, signal.SIGKILL)  # with its resource tracker: the segments stay
        owner.wait()
    finally:
        if owner.poll() is None:
            os.killpg(owner.pid, signal.SIGKILL)
        owner.communicate()
    dead_segments = {dead_ring, f"{dead_ring}_2"}
    assert dead_segments <= {p.name for p in DEV_SHM.iterdir()}
    with RingWriter.create(8, 8) as live:
        removed = reclaim_abandoned_rings()
        present = {p.name for p in DEV_SHM.iterdir()}
        assert not dead_segments & present
        assert {live.name, f"{live.name}_1"} <= present and live.name not in removed


def send_and_receive(engine_client: EngineClient) -> bool:
    engine_client.send(np.zeros((HOST_SIZE, HOST_SIZE, 3), np.uint8))
    return engine_client.receive(0.05) is not None and engine_client.state == "streaming"


@linux_only
def test_a_host_killed_outright_loses_its_session_and_every_segment_of_it(tmp_path):
    engine = Engine(tmp_path, "--session-timeout", "1")
    try:
        host = subprocess.Popen([sys.executable, "-c", HOST_PROCESS, engine.address], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            session = host.stdout.readline().strip()
            assert host.stdout.readline().strip() == "streaming", host.stderr.read()
            input_ring, output_ring = session_ring_names(session)
            os.killpg(host.pid, signal.SIGKILL)  # the host and its resource tracker, mid-stream
            host.wait()
        finally:
            if host.poll() is None:
                os.killpg(host.pid, signal.SIGKILL)
            host.communicate()

        def session_segments() -> set[str]:
            return {p.name for p in DEV_SHM.iterdir() if p.name.startswith((input_ring, output_ring))}

        wait_until(lambda: not session_segments(), f"the segments of session {session} to go")
        assert f"session {session} closed: its host was silent" in engine.log()
        with client(engine.address, "shm") as survivor:
            stream_until_output(survivor)
    finally:
        assert engine.stop() == 0, engine.log()


def test_a_step_out_of_memory_ends_that_session_with_an_error_and_the_others_stream_on(tmp_path):
    engine = Engine(tmp_path, module="faulty_engine", env={OOM_PROMPT_ENV: "too big"})
    try:
        with client(engine.address, "shm", prompt="fine") as fine, \
                client(engine.address, "zmq", prompt="too big") as failing:
            doomed_rings = session_ring_names(failing.session)
            frame = np.zeros((HOST_SIZE, HOST_SIZE, 3), np.uint8)
            deadline = time.monotonic() + PATIENCE_S
            while failing.state != "error":
                assert time.monotonic() < deadline, "the failing session was never reported"
                failing.send(frame)
                failing.receive(0.05)
            assert failing.error.code == "session_failed"
            assert "out of memory" in failing.error.message and "smaller" in failing.error.message
            assert not {p.name for p in DEV_SHM.glob("sdb_*")} & set(doomed_rings)
            stream_until_output(fine)
            assert fine.state == "streaming"
        assert "Traceback" in engine.log()  # the failure is in the log with its cause
    finally:
        assert engine.stop() == 0, engine.log()


def test_a_session_whose_frames_cannot_be_moved_fails_alone(monkeypatch):
    """In-process, to make reading one session's input ring fail unexpectedly."""
    import engine.server

    class DamagedRing:
        @staticmethod
        def attach(name):
            raise RuntimeError("the ring is damaged")

    monkeypatch.setattr(engine.server, "RingReader", DamagedRing)  # the engine's reference only
    server = EngineServer(lambda: build_models("tiny"), model="tiny", address="tcp://127.0.0.1:*",
                          model_size=(32, 32))
    server.start()
    try:
        with client(server.address, "zmq") as healthy, client(server.address, "shm") as broken:
            # the state can turn to "error" (from stats) a moment before the error notice itself arrives
            wait_until(lambda: send_and_receive(broken) or broken.error is not None, "the broken session to fail")
            assert broken.error.code == "session_failed" and "the ring is damaged" in broken.error.message
            stream_until_output(healthy)
    finally:
        server.close()
    assert not server.failed


def test_a_ring_that_lies_is_told_to_its_host_once_and_its_session_streams_when_the_ring_is_honest(monkeypatch):
    """In-process, to make one session's input ring refuse what it holds for a while (a frame
    block or a frame no RingWriter makes: the host's own memory may hold anything)."""
    import engine.server

    refusals = []

    class LyingRing(RingReader):
        def read_latest(self, out=None):
            if len(refusals) < 20:  # the reads of the first 40 ms or so
                refusals.append(self.name)
                raise ProtocolError(ErrorCode.OUT_OF_RANGE, "height", "height must be from 1 to 8192, got 2**63")
            return super().read_latest(out)

    monkeypatch.setattr(engine.server, "RingReader", LyingRing)  # the engine's reference only
    notices = []
    server = EngineServer(lambda: build_models("tiny"), model="tiny", address="tcp://127.0.0.1:*",
                          model_size=(32, 32))
    notify = server._socket.notify
    monkeypatch.setattr(server._socket, "notify", lambda *args: (notices.append(args), notify(*args)))
    server.start()
    try:
        with client(server.address, "zmq") as healthy, client(server.address, "shm") as lying:
            wait_until(lambda: send_and_receive(lying) or lying.error is not None, "the host to hear of its ring")
            assert (lying.error.code, lying.error.field) == ("out_of_range", "height")
            stream_until_output(lying)  # the same session, once its ring is honest
            stream_until_output(healthy)
        assert len(notices) == 1  # once for that frame block, not at each of its 20 reads
    finally:
        server.close()
    assert not server.failed


def test_a_fault_handling_one_request_is_answered_and_every_session_goes_on(monkeypatch):
    """In-process, to make the engine fail taking one parameter change (a fault of its own,
    not bad input): the host hears why, and the engine, that session included, serves on."""
    import engine.session

    change = engine.session.Session.change
    faulty = set()  # sessions whose next change fails

    def change_failing_once(session, *args, **kwargs):
        if session.id in faulty:
            faulty.discard(session.id)
            raise KeyError("guidance")
        return change(session, *args, **kwargs)

    monkeypatch.setattr(engine.session.Session, "change", change_failing_once)
    server = EngineServer(lambda: build_models("tiny"), model="tiny", address="tcp://127.0.0.1:*",
                          model_size=(32, 32))
    server.start()
    try:
        with client(server.address, "zmq") as first, client(server.address, "shm") as second:
            faulty.add(first.session)
            with pytest.raises(RemoteError) as answered:
                first.set(prompt="a fault")
            assert answered.value.code == "internal" and "ParamsUpdate" in answered.value.message
            assert "KeyError" in answered.value.message and "goes on serving" in answered.value.message
            assert first.set(prompt="asked again")["params"]["prompt"] == "asked again"  # the same session
            stream_until_output(first)
            stream_until_output(second)
    finally:
        server.close()
    assert not server.failed


def test_a_reply_that_cannot_be_encoded_is_answered_as_a_fault_and_the_engine_serves_on(monkeypatch):
    """In-process, to make a stats reply hold a number msgpack cannot carry (a lying ring's
    frame counts once did, and the IO thread died of it)."""
    import engine.session

    stats = engine.session.Session.stats
    monkeypatch.setattr(engine.session.Session, "stats", lambda session: {**stats(session), "frames_dropped": 2**64})
    server = EngineServer(lambda: build_models("tiny"), model="tiny", address="tcp://127.0.0.1:*",
                          model_size=(32, 32))
    server.start()
    try:
        with client(server.address, "zmq") as host:
            with pytest.raises(RemoteError) as answered:
                host.stats()
            assert answered.value.code == "internal" and "cannot encode" in answered.value.message
            monkeypatch.undo()
            stream_until_output(host)
    finally:
        server.close()
    assert not server.failed


def test_a_session_that_fails_to_open_part_way_leaves_nothing_behind(monkeypatch):
    """The fault comes after the session was registered (its virtual camera): its host never
    learns its id, so the engine must close it, or it would hold a slot and its memory."""
    import engine.session

    def broken_camera(camera, on, fps):
        raise RuntimeError("the camera driver crashed")

    monkeypatch.setattr(engine.session.SessionCamera, "turn", broken_camera)
    server = EngineServer(lambda: build_models("tiny"), model="tiny", address="tcp://127.0.0.1:*",
                          model_size=(32, 32), limits=Limits(max_sessions=1))
    server.start()
    try:
        rings_before = {ring.name for ring in list_rings()}
        with pytest.raises(RemoteError) as answered:
            client(server.address, "shm").open()
        assert answered.value.code == "internal" and "the camera driver crashed" in answered.value.message
        assert {ring.name for ring in list_rings()} <= rings_before  # its output ring is gone too
        monkeypatch.undo()
        with client(server.address, "shm") as healthy:  # the one session allowed: its slot is free
            stream_until_output(healthy)
    finally:
        server.close()
    assert not server.failed


@pytest.mark.parametrize("weights, message", [
    ("missing", "does not exist"),
    ("empty", "failed to load"),
], ids=["a model folder that is not there", "a model folder without the model's files"])
def test_a_model_that_cannot_be_read_stops_the_engine_with_the_reason(tmp_path, weights, message):
    folder = tmp_path / weights
    if weights == "empty":
        folder.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--model", "wan2.1-1.3b", "--device", "cpu", "--weights",
         str(folder), "--bind", "tcp://127.0.0.1:*"],
        cwd=REPO, capture_output=True, text=True, timeout=PATIENCE_S)
    assert result.returncode == 1
    assert message in result.stderr and str(folder) in result.stderr
    assert "python -m engine download" in result.stderr or weights == "missing"  # says what to do next
    assert "Traceback" not in result.stderr.split("error:")[-1]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any folder")
def test_an_unreadable_model_folder_stops_the_engine_before_it_listens(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0)
    try:
        with pytest.raises(SystemExit, match="not readable"):
            cli.main(["serve", "--model", "wan2.1-1.3b", "--weights", str(folder), "--bind", "tcp://127.0.0.1:*"])
    finally:
        folder.chmod(0o700)
