"""The engine as hosts use it: `python -m engine serve` as a real child process, EngineClient
and raw ZeroMQ peers on 127.0.0.1 (free ports), real shared memory, the tiny model.

Nothing here asserts timings: every wait is a generous deadline, so a busy machine
makes the tests slower, never wrong.
"""

import gc
import itertools
import logging
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq

from processes import HOST_PROCESS, PATIENCE_S, REPO, Host, ServedEngine as Engine, child_pids, last_finished_seq
from bridge.client import EngineClient, RemoteError
from bridge.protocol import FORMATS, PROTOCOL_VERSION, ErrorReply, Ok, decode_message
from bridge.shm import RingReader, RingWriter, session_ring_names
from engine import cli
from engine.models.weights import build_models
from engine.pipeline import StreamPipeline
from engine.server import EngineServer, check_bind
from engine.session import InputFrame, paced_outputs

pytestmark = pytest.mark.timeout(180)

DEV_SHM = Path("/dev/shm")
linux_only = pytest.mark.skipif(not DEV_SHM.is_dir(), reason="needs /dev/shm and /proc (Linux)")
HOST_SIZE = 64  # the hosts' frames are 64x64; the engines' model works at 32x32
FRAMES_PER_CHUNK = 4


# ------------------------------------------------------------------------- helpers


def client(engine: Engine, transport: str = "shm", **params) -> EngineClient:
    return EngineClient(engine.address, transport=transport, width=HOST_SIZE, height=HOST_SIZE, timeout_s=PATIENCE_S,
                        **params)


def ring_segments() -> set[str]:
    return {p.name for p in DEV_SHM.glob("sdb_*")} if DEV_SHM.is_dir() else set()


def segments_of(session: str) -> set[str]:
    """The shared-memory segments of a session's rings: control blocks and frame blocks."""
    prefix = os.path.commonprefix(session_ring_names(session))
    return {name for name in ring_segments() if name.startswith(prefix)}


def socket_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass  # the descriptor listdir itself used
    return count


def leftovers() -> dict:
    # Only the segments of sessions these tests opened: other test runs may share /dev/shm.
    sessions = {id for engine in Engine.started for id in re.findall(r"session (\w+) opened", engine.log())}
    segments = set().union(*map(segments_of, sessions))
    return {"shared memory": segments, "child processes": child_pids(), "sockets": socket_fds()}


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind():
    """After every test here: no shared-memory segment, socket or child process remains.
    (The in-process engine's test checks its own segments.)"""
    before = leftovers()
    yield
    deadline = time.monotonic() + PATIENCE_S  # killed processes' segments go when their resource tracker notices
    while leftovers() != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers() == before


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = Engine(tmp_path_factory.mktemp("engine"))
    yield engine
    assert engine.stop() == 0, engine.log()


# ----------------------------------------------------------------------- round trip


@pytest.mark.parametrize("transport", ["shm", "zmq"])
def test_every_output_echoes_its_inputs_seq_and_capture_time_in_order_after_the_lag(engine, transport):
    frames = cli.test_pattern(100, HOST_SIZE, HOST_SIZE)
    with client(engine, transport, prompt="a watercolour painting") as engine_client:
        assert engine_client.state in ("starting", "loading", "ready")
        host = Host(engine_client)
        for frame in frames:
            host.send_without_drops(frame)
        first, lag = engine_client.info["first_chunk_frames"], engine_client.info["lag_frames"]
        last = last_finished_seq(len(frames), first, lag)
        host.wait_for_output(last)
        host.collect(0.5)  # nothing newer may follow
        stats = engine_client.stats()

    seqs = host.seqs()
    assert seqs == sorted(set(seqs)) and seqs[-1] == last  # in order, each once, up to the lag
    for output, newest_sent in host.outputs:
        assert output.t_capture_ns == host.sent[output.seq]
        assert output.pixels.shape == (HOST_SIZE, HOST_SIZE, 3) and output.pixels.dtype == np.uint8
        assert output.latency_ms > 0
        # An output exists only once its chunk, and lag frames after it, went in.
        assert newest_sent >= (first - 1 if output.seq < first else output.seq + lag)
    assert stats["state"] == "streaming"
    assert stats["frames_dropped"] == 0 and stats["frames_processed"] == last + 1 + lag
    # Every finished frame was sent, or replaced by a newer one before it was due.
    assert stats["frames_out"] + stats["outputs_dropped"] == last + 1


def test_parameters_apply_between_steps_live_or_by_restarting_the_stream(engine):
    frames = cli.test_pattern(60, HOST_SIZE, HOST_SIZE)
    # A budget no step misses on a busy machine: the restart puts the chunk in flight back in
    # the inbox, and a session over its budget would drop those frames as stale.
    with client(engine, prompt="a cat", latency_ms=60_000) as engine_client:
        schema = engine_client.info["schema"]
        assert schema["strength"]["applies"] == "live" and schema["prompt"]["applies"] == "live"
        assert schema["steps"]["applies"] == "reload" and schema["model_width"]["applies"] == "reload"
        host = Host(engine_client)
        for frame in frames[:20]:
            host.send_without_drops(frame)

        reply = engine_client.set(prompt="a dog", strength=0.5)
        assert reply["restarts"] is False
        assert reply["params"]["prompt"] == "a dog" and reply["params"]["strength"] == 0.5
        for frame in frames[20:40]:
            host.send_without_drops(frame)
        assert engine_client.stats()["frames_processed"] == 37  # the stream went on: 5 + 8 chunks of 4

        restart_at = engine_client.stats()["frames_processed"]
        reply = engine_client.set(steps=1)
        assert reply["restarts"] is True and reply["lag_frames"] == 0
        for frame in frames[40:]:
            host.send_without_drops(frame)
        # The restarted stream begins with a first chunk again (from the frames not yet
        # processed) and, at one step, has no lag.
        last = restart_at + last_finished_seq(len(frames) - restart_at, reply["first_chunk_frames"], 0)
        host.wait_for_output(last)
        host.collect(0.5)
        assert host.seqs()[-1] == last

        with pytest.raises(RemoteError) as refused:
            engine_client.set(model_width=40)
        assert (refused.value.code, refused.value.field) == ("bad_value", "params.model_width")
        assert engine_client.stats()["params"]["prompt"] == "a dog"


# ---------------------------------------------------------------------- two hosts


def test_two_hosts_have_their_own_sessions_and_closing_one_leaves_the_other_alone(engine):
    frames = cli.test_pattern(81, HOST_SIZE, HOST_SIZE)
    with client(engine, "shm", prompt="a red fox") as fox, client(engine, "zmq", prompt="a red fox") as fox_again:
        whale = client(engine, "zmq", prompt="a blue whale").open()
        try:
            hosts = [Host(fox), Host(fox_again), Host(whale)]
            assert len({fox.session, fox_again.session, whale.session}) == 3
            for frame in frames[:41]:
                for host in hosts:
                    host.send_without_drops(frame)
            first, lag = fox.info["first_chunk_frames"], fox.info["lag_frames"]
            last = last_finished_seq(41, first, lag)
            for host in hosts:
                host.wait_for_output(last)
            # Same frames and prompt: the same picture (each session has its own caches; a
            # forward shared with other sessions may round a value the other way); another
            # prompt: another picture.
            assert_same_picture(hosts[0].frame(last), hosts[1].frame(last))
            assert np.abs(hosts[0].frame(last).astype(int) - hosts[2].frame(last)).mean() > 0.2
            assert whale.stats()["params"]["prompt"] == "a blue whale"
        finally:
            whale.close()

        for frame in frames[41:]:
            for host in hosts[:2]:
                host.send_without_drops(frame)
        last = last_finished_seq(len(frames), first, lag)
        for host in hosts[:2]:
            host.wait_for_output(last)
        assert_same_picture(hosts[0].frame(last), hosts[1].frame(last))
        assert fox.stats()["frames_dropped"] == 0 and fox.state == "streaming"


def assert_same_picture(a: np.ndarray, b: np.ndarray) -> None:
    """Equal but for the float rounding of forwards shared with other sessions: a level here
    and there (0.0001 levels on average here; a prompt changes half the pixels, 0.5 levels on average)."""
    assert np.abs(a.astype(int) - b).mean() < 0.05


# ---------------------------------------------------------------------- bad input


def pack(fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


HELLO = {"type": "hello", "version": PROTOCOL_VERSION, "model": "tiny", "width": HOST_SIZE, "height": HOST_SIZE,
         "prompt": "", "id": 7}


def header(session: str, **changes) -> dict:
    return {"session": session, "seq": 1, "t_capture_ns": 1, "width": HOST_SIZE, "height": HOST_SIZE,
            "format": "rgba8", **changes}


FRAME_BYTES = HOST_SIZE * HOST_SIZE * 4

# name: (parts to send, given the bad host's own session and the healthy host's; code; field)
BAD_INPUT = {
    "random bytes": (lambda own, other: [b"\xc1\x07\xff\x00\x93"], "bad_message", None),
    "truncated msgpack": (lambda own, other: [pack(HELLO)[:-3]], "bad_message", None),
    "pixels disagreeing with the header": (
        lambda own, other: [pack(header(own)), bytes(FRAME_BYTES - 1)], "size_mismatch", "pixels"),
    "100000x100000 frame": (
        lambda own, other: [pack(header(own, width=100_000, height=100_000)), bytes(16)], "out_of_range", "width"),
    "unknown pixel format": (lambda own, other: [pack(header(own, format="nv12")), bytes(16)], "bad_value", "format"),
    "unknown message type": (lambda own, other: [pack({"type": "reboot", "id": 7})], "unknown_type", "type"),
    "wrong protocol version": (lambda own, other: [pack({**HELLO, "version": 99})], "protocol_version", "version"),
    "params of a wrong type": (
        lambda own, other: [pack({"type": "params", "session": own, "params": {"strength": "high"}, "id": 7})],
        "bad_type", "params.strength"),
    "unknown parameter": (
        lambda own, other: [pack({"type": "params", "session": own, "params": {"colour": 1}, "id": 7})],
        "unknown_param", "params.colour"),
    "a frame of another size than the session's": (
        lambda own, other: [pack(header(own, width=32, height=32)), bytes(32 * 32 * 4)], "size_mismatch", "width"),
    "a frame for no session": (lambda own, other: [pack(header("nobody")), bytes(FRAME_BYTES)],
                               "unknown_session", "session"),
    "another host's session": (
        lambda own, other: [pack({"type": "params", "session": other, "params": {"seed": 1}, "id": 7})],
        "unknown_session", "session"),
    "a model the engine does not serve": (
        lambda own, other: [pack({**HELLO, "model": "wan2.1-14b"})], "model_unavailable", "model"),
    "a model size that is not a multiple of 16": (
        lambda own, other: [pack({**HELLO, "params": {"model_width": 40}})], "bad_value", "params.model_width"),
}


@pytest.fixture(scope="module")
def healthy(engine):
    """A session streaming beside the bad input."""
    with client(engine, prompt="a healthy stream") as engine_client:
        yield Host(engine_client)


@pytest.fixture
def raw_host(engine):
    """A host speaking the protocol by hand over a plain DEALER socket, with a session of its own."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(engine.address)
    try:
        socket.send(pack(HELLO))
        reply = receive_reply(socket)
        assert isinstance(reply, Ok), reply
        session = reply.payload["session"]
        yield socket, session
        socket.send(pack({"type": "bye", "session": session, "id": 9}))
        assert isinstance(receive_reply(socket), Ok)
    finally:
        socket.close()
        context.term()


def receive_reply(socket: zmq.Socket):
    assert socket.poll(PATIENCE_S * 1000), "the engine did not answer"
    return decode_message(socket.recv())


@pytest.mark.parametrize("make_parts, code, field", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_gets_an_error_naming_the_field_while_other_sessions_stream_on(
    healthy, raw_host, make_parts, code, field
):
    frames = cli.test_pattern(12, HOST_SIZE, HOST_SIZE)
    socket, own_session = raw_host
    newest_before = healthy.seqs()[-1] if healthy.outputs else -1

    socket.send_multipart(make_parts(own_session, healthy.client.session))
    reply = receive_reply(socket)
    assert isinstance(reply, ErrorReply)
    assert (reply.code, reply.field) == (code, field)
    assert reply.message

    # The bad host's own session goes on ...
    socket.send(pack({"type": "stats", "session": own_session, "id": 8}))
    assert isinstance(receive_reply(socket), Ok)
    # ... and so does everyone else's.
    for frame in frames:
        healthy.send_without_drops(frame)
    healthy.wait_for_output(newest_before + 1)
    assert healthy.client.state == "streaming"


def test_the_engine_listens_beyond_this_machine_only_with_keys():
    for address in ("tcp://127.0.0.1:5555", "tcp://localhost:*", "tcp://[::1]:5555", "ipc:///tmp/engine"):
        check_bind(address, authenticated=False)
    for address in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.2:5555"):
        with pytest.raises(ValueError, match="python -m engine keys"):
            check_bind(address, authenticated=False)
        check_bind(address, authenticated=True)


# --------------------------------------------------------------------------- faults


@linux_only
def test_a_killed_hosts_session_is_closed_after_the_timeout_and_its_memory_freed(tmp_path):
    engine = Engine(tmp_path, "--session-timeout", "1")
    try:
        host = subprocess.Popen([sys.executable, "-c", HOST_PROCESS, engine.address], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            session = host.stdout.readline().strip()
            assert host.stdout.readline().strip() == "streaming", host.stderr.read()
            assert set(session_ring_names(session)) <= segments_of(session)
            host.kill()  # in the middle of writing frames
            host.wait()
        finally:
            host.kill()
            host.communicate()

        deadline = time.monotonic() + PATIENCE_S
        while segments_of(session) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not segments_of(session)
        assert f"session {session} closed: its host was silent" in engine.log()

        with client(engine) as survivor:  # the engine serves on
            healthy = Host(survivor)
            for frame in cli.test_pattern(9, HOST_SIZE, HOST_SIZE):
                healthy.send_without_drops(frame)
            healthy.wait_for_output(0)
    finally:
        assert engine.stop() == 0, engine.log()


def test_clients_report_a_killed_engine_and_resume_with_a_new_one(tmp_path, caplog):
    caplog.set_level(logging.INFO, "bridge.client")  # an engine going away is an expected state: INFO
    frames = cli.test_pattern(9, HOST_SIZE, HOST_SIZE)
    first_engine = Engine(tmp_path)
    second_engine = None
    try:
        with client(first_engine, "shm", prompt="survives restarts") as over_shm, \
                client(first_engine, "zmq", prompt="survives restarts") as over_zmq:
            clients = [over_shm, over_zmq]
            for engine_client in clients:
                host = Host(engine_client)
                for frame in frames:
                    host.send_without_drops(frame)
                host.wait_for_output(0)
            old_sessions = {engine_client.session for engine_client in clients}

            first_engine.stop(signal.SIGKILL)
            keep_streaming(clients, frames, until=lambda: all(c.state == "disconnected" for c in clients))
            assert caplog.text.count("stopped answering") >= 2  # and they said so

            second_engine = Engine(tmp_path, address=first_engine.address)
            sent_before = {engine_client: engine_client.send(frames[0]) for engine_client in clients}
            newest = {}
            keep_streaming(clients, frames, newest,
                           until=lambda: all(newest.get(c, -1) > sent_before[c] for c in clients))
            for engine_client in clients:
                assert engine_client.session not in old_sessions | {None}
                assert engine_client.state == "streaming"
                assert engine_client.stats()["params"]["prompt"] == "survives restarts"
    finally:
        if second_engine is not None:
            assert second_engine.stop() == 0, second_engine.log()
        first_engine.stop()


def keep_streaming(clients: list, frames: np.ndarray, newest: dict | None = None, *, until) -> None:
    """Each client in turn sends a frame and looks for an output, until until() is true;
    newest, when given, keeps the seq of each client's newest output."""
    deadline = time.monotonic() + PATIENCE_S
    for index in itertools.count():
        if until():
            return
        assert time.monotonic() < deadline, f"gave up waiting; the clients are {[c.state for c in clients]}"
        for engine_client in clients:
            engine_client.send(frames[index % len(frames)])
            output = engine_client.receive(0.02)
            if output is not None and newest is not None:
                newest[engine_client] = output.seq


@linux_only
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_engine_cleanly_and_unlinks_its_shared_memory(tmp_path, sig):
    engine = Engine(tmp_path)
    with client(engine) as engine_client:
        host = Host(engine_client)
        for frame in cli.test_pattern(9, HOST_SIZE, HOST_SIZE):
            host.send_without_drops(frame)
        host.wait_for_output(0)
        output_ring = engine_client.info["output_ring"]
        assert output_ring in ring_segments()
        assert engine.stop(sig) == 0, engine.log()
        # Gone as the engine exits, removed by the engine itself: its resource tracker
        # found nothing left to clean up.
        assert not any(name.startswith(output_ring) for name in ring_segments())
        assert "leaked" not in engine.log()


def test_a_closed_sessions_pipeline_is_freed_at_once_without_a_garbage_collection(monkeypatch):
    """The worker frees a closed session's pipeline by reference counting alone: a full
    collection would stall every other session, and hosts come and go."""
    chunk_steps = StreamPipeline.chunk_steps
    pipelines = []

    def chunk_steps_noted(pipeline, frames):
        pipelines.append(weakref.ref(pipeline))
        return (yield from chunk_steps(pipeline, frames))

    monkeypatch.setattr(StreamPipeline, "chunk_steps", chunk_steps_noted)
    server = EngineServer(lambda: build_models("tiny"), model="tiny", address="tcp://127.0.0.1:*",
                          model_size=(32, 32))
    server.start()
    gc.disable()  # what is freed now is freed by reference counting
    try:
        with client(server) as leaving:
            host = Host(leaving)
            for frame in cli.test_pattern(9, HOST_SIZE, HOST_SIZE):
                host.send_without_drops(frame)
            host.wait_for_output(0)
        deadline = time.monotonic() + PATIENCE_S
        while any(ref() is not None for ref in pipelines):
            assert time.monotonic() < deadline, "the closed session's pipeline is still alive, in a reference cycle"
            time.sleep(0.05)
        assert pipelines
    finally:
        gc.enable()
        server.close()
    assert not server.failed


def test_a_failing_step_ends_only_its_session_and_the_engine_serves_on(monkeypatch):
    """In-process, to make one session's steps fail as if the device ran out of memory."""
    chunk_steps = StreamPipeline.chunk_steps
    failed_pipelines = []

    def chunk_steps_or_run_out_of_memory(pipeline, frames):  # the worker steps sessions through chunk_steps
        if pipeline.settings.prompt == "too big":
            failed_pipelines.append(weakref.ref(pipeline))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return (yield from chunk_steps(pipeline, frames))

    monkeypatch.setattr(StreamPipeline, "chunk_steps", chunk_steps_or_run_out_of_memory)
    server = EngineServer(lambda: build_models("tiny"), model="tiny", address="tcp://127.0.0.1:*",
                          model_size=(32, 32))
    server.start()
    try:
        frames = cli.test_pattern(30, HOST_SIZE, HOST_SIZE)
        with client(server, prompt="fine") as fine, client(server, prompt="too big") as failing:
            output_ring, doomed_session = failing.info["output_ring"], failing.session
            healthy, doomed = Host(fine), Host(failing)
            for frame in frames[:5]:
                healthy.send_without_drops(frame)
                doomed.send_without_drops(frame)
            deadline = time.monotonic() + PATIENCE_S
            while failing.error is None:  # the notice: the state can say "error" (from stats) a moment before it
                assert time.monotonic() < deadline, "the failing session was never reported"
                failing.receive(0.05)
            assert failing.error.code == "session_failed"
            assert "out of memory" in failing.error.message and "smaller" in failing.error.message
            assert output_ring not in ring_segments()  # the session is closed ...
            gc.collect()
            assert failed_pipelines and all(ref() is None for ref in failed_pipelines)  # ... its caches freed

            for frame in frames[5:]:
                healthy.send_without_drops(frame)
            healthy.wait_for_output(last_finished_seq(len(frames), fine.info["first_chunk_frames"],
                                                      fine.info["lag_frames"]))
            assert fine.state == "streaming"
            sessions = [fine.session, doomed_session]
    finally:
        server.close()
    assert not server.failed
    assert not set().union(*map(segments_of, sessions))


def test_the_client_loads_without_torch_or_the_engine():
    code = "import sys, bridge.client; print(sorted({'torch', 'engine'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("format, order", [("rgba8", [0, 1, 2]), ("bgra8", [2, 1, 0]), ("rgb8", [0, 1, 2])])
def test_an_output_goes_back_in_its_inputs_format_into_an_array_or_straight_into_a_ring(format, order):
    rgb = np.random.default_rng(0).integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)  # a chunk's finished frames
    outputs = paced_outputs([InputFrame(frame, format, seq, seq) for seq, frame in enumerate(rgb)], rgb, 0)
    with RingWriter.create(6, 4, format) as ring, RingReader.attach(ring.name) as reader:
        ring.write_in_place(outputs[1].write_pixels, 1, 1)
        from_the_ring = reader.read_latest().pixels
    for pixels in (outputs[1].pixels, from_the_ring):
        assert pixels.shape == (4, 6, FORMATS[format])
        assert np.array_equal(pixels[..., :3], rgb[1][..., order])
        assert FORMATS[format] == 3 or (pixels[..., 3] == 255).all()  # opaque
