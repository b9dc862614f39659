"""ZeroMQ transport: real sockets on 127.0.0.1, random free ports."""

import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from processes import PATIENCE_S
from bridge.protocol import (
    PARAM_SPECS,
    PROTOCOL_VERSION,
    ErrorCode,
    ErrorReply,
    FrameHeader,
    Hello,
    Ok,
    ParamsUpdate,
    ProtocolError,
    StatsRequest,
    ValueSpec,
    decode_message,
    encode_frame_header,
    encode_message,
)
from bridge.zmq_io import EngineSocket, HostSocket, RemoteError

pytestmark = pytest.mark.timeout(3 * PATIENCE_S)  # room for a test's waits to time out and say what never came

ANY_PORT = "tcp://127.0.0.1:*"


class EngineThread:
    """An EngineSocket served from its own thread (its socket is used there only).

    Requests are answered with handler(message) -> payload; a ProtocolError from the
    handler becomes an error reply.
    """

    def __init__(self, address=ANY_PORT, handler=lambda message: {"type": message.TYPE}, **engine_args):
        self._handler = handler
        self._stop = threading.Event()
        self._started = threading.Event()
        self._failure = None
        self.address = None
        self._thread = threading.Thread(target=self._serve, args=(address, engine_args), daemon=True)
        self._thread.start()
        assert self._started.wait(PATIENCE_S)
        if self._failure:
            raise self._failure

    def _serve(self, address, engine_args):
        try:
            with EngineSocket(address, **engine_args) as engine:
                self.address = engine.address
                self._started.set()
                while not self._stop.is_set():
                    for request in engine.poll(0.02).requests:
                        try:
                            engine.reply_ok(request, self._handler(request.message))
                        except ProtocolError as error:
                            engine.reply_error(request, error)
        except Exception as error:  # reported by stop()
            self._failure = error
            self._started.set()

    def stop(self):
        self._stop.set()
        self._thread.join(PATIENCE_S)
        if self._failure:
            raise self._failure


@pytest.fixture
def engine_thread():
    engine = EngineThread()
    yield engine
    engine.stop()


@pytest.fixture
def engine():
    with EngineSocket(ANY_PORT) as engine:
        yield engine


def frame(seq: int, session: str = "s1", size: int = 16) -> tuple[FrameHeader, np.ndarray]:
    """A frame whose every byte is seq % 256, so its content can be checked against its header."""
    pixels = np.full((size, size, 4), seq % 256, np.uint8)
    return FrameHeader.for_array(pixels, session=session, seq=seq, t_capture_ns=seq * 10), pixels


def send_once_connected(host: HostSocket, header: FrameHeader, pixels: np.ndarray) -> None:
    """Send a frame, retrying while the connection is still being set up (frames sent
    before that are dropped, not queued)."""
    deadline = time.monotonic() + PATIENCE_S
    while not host.send_frame(header, pixels):
        assert time.monotonic() < deadline, "the host never connected"
        time.sleep(0.01)


def poll_until(engine: EngineSocket, wanted, what: str):
    """Poll the engine until wanted(inbox) is true; return that inbox."""
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        inbox = engine.poll(0.05)
        if wanted(inbox):
            return inbox
    pytest.fail(f"the engine never received {what}")


def raw_dealer(address: str) -> zmq.Socket:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    return socket


# -------------------------------------------------------------------- control


def test_request_gets_its_reply_and_ping_measures_the_round_trip(engine_thread):
    with HostSocket(engine_thread.address) as host:
        assert host.request(Hello(model="tiny", width=64, height=64, prompt="a cat")) == {"type": "hello"}
        assert host.request(StatsRequest(session="abc")) == {"type": "stats"}
        assert host.ping() > 0


def test_an_error_reply_names_the_field_and_the_session_goes_on():
    def handler(message):
        if isinstance(message, ParamsUpdate) and message.session != "known":
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, "session", f"no session {message.session}")
        return {}

    # The engine's table may be narrower than the one a host checks against (serve's limits).
    engine_thread = EngineThread(handler=handler, params_schema={**PARAM_SPECS, "strength": ValueSpec(float, 0.1, 0.6)})
    try:
        with HostSocket(engine_thread.address) as host:
            with pytest.raises(RemoteError) as caught:
                host.request(ParamsUpdate(session="other", params={"strength": 0.5}))
            assert (caught.value.code, caught.value.field) == ("unknown_session", "session")
            with pytest.raises(RemoteError) as caught:  # refused by the protocol, before the handler
                host.request(ParamsUpdate(session="known", params={"strength": 0.7}))
            assert (caught.value.code, caught.value.field) == ("out_of_range", "params.strength")
            assert host.request(ParamsUpdate(session="known", params={"strength": 0.5})) == {}
    finally:
        engine_thread.stop()


def test_a_posted_request_does_not_wait_and_its_reply_comes_as_a_notice(engine_thread):
    with HostSocket(engine_thread.address) as host:
        host.ping(PATIENCE_S)  # connected
        heard = host.last_heard
        request_id = host.post(StatsRequest(session="s"))
        assert request_id is not None
        deadline = time.monotonic() + PATIENCE_S
        notices = []
        while not notices and time.monotonic() < deadline:
            time.sleep(0.01)
            notices = host.take_notices()
        assert [(type(n), n.id, dict(n.payload)) for n in notices] == [(Ok, request_id, {"type": "stats"})]
        assert host.last_heard > heard


def test_a_posted_request_without_an_engine_is_not_sent():
    engine = EngineSocket(ANY_PORT)
    address = engine.address
    engine.close()
    with HostSocket(address) as host:
        assert host.post(StatsRequest(session="s")) is None
        assert host.last_heard is None


def test_params_are_checked_against_the_engines_table():
    schema = {**PARAM_SPECS, "noise_scale": ValueSpec(float, 0.0, 1.0)}
    engine_thread = EngineThread(handler=lambda message: dict(message.params), params_schema=schema)
    try:
        with HostSocket(engine_thread.address) as host:
            assert host.request(ParamsUpdate(session="s", params={"noise_scale": 0.25})) == {"noise_scale": 0.25}
    finally:
        engine_thread.stop()


def test_each_host_gets_its_own_replies(engine_thread):
    with HostSocket(engine_thread.address) as first, HostSocket(engine_thread.address) as second:
        for _ in range(3):
            assert first.request(StatsRequest(session="first"))["type"] == "stats"
            assert second.request(Hello(model="m", width=8, height=8, prompt=""))["type"] == "hello"


def test_a_late_reply_to_an_abandoned_request_is_not_taken_for_the_next_one():
    def handler(message):
        if message.session == "slow":
            time.sleep(1.0)
        return {"session": message.session}

    engine_thread = EngineThread(handler=handler)
    try:
        with HostSocket(engine_thread.address) as host:
            with pytest.raises(TimeoutError):
                host.request(StatsRequest(session="slow"), timeout_s=0.2)
            assert host.request(StatsRequest(session="fast"), timeout_s=PATIENCE_S) == {"session": "fast"}
    finally:
        engine_thread.stop()


def test_no_engine_means_a_timeout_not_a_hang():
    engine = EngineSocket(ANY_PORT)
    address = engine.address
    engine.close()
    with HostSocket(address) as host:
        with pytest.raises(TimeoutError):
            host.request(StatsRequest(session="s"), timeout_s=0.3)
        with pytest.raises(TimeoutError):
            host.ping(timeout_s=0.3)
        assert host.send_frame(*frame(1)) is False  # nothing is queued for an absent engine


def test_the_host_reconnects_after_the_engine_restarts():
    first = EngineThread(handler=lambda message: {"engine": "first"})
    address = first.address
    with HostSocket(address) as host:
        assert host.request(StatsRequest(session="s")) == {"engine": "first"}
        first.stop()
        with pytest.raises(TimeoutError):
            host.request(StatsRequest(session="s"), timeout_s=0.3)
        second = EngineThread(address, handler=lambda message: {"engine": "second"})
        try:
            assert host.request(StatsRequest(session="s"), timeout_s=PATIENCE_S) == {"engine": "second"}
            assert host.ping(timeout_s=PATIENCE_S) > 0
        finally:
            second.stop()


def test_the_engine_serves_a_restarted_host_and_forgets_the_old_one(engine):
    first = HostSocket(engine.address)
    send_once_connected(first, *frame(1))
    old_identity = poll_until(engine, lambda inbox: inbox.frames, "the first host's frame").frames[0].sender
    first.close()

    with HostSocket(engine.address) as second:
        send_once_connected(second, *frame(2))
        new_identity = poll_until(engine, lambda inbox: inbox.frames, "the second host's frame").frames[0].sender
        assert new_identity != old_identity
        assert engine.send_frame(new_identity, *frame(3))
        assert second.recv_latest_frame(PATIENCE_S).header.seq == 3

        # Sending to the departed host is refused, not queued forever.
        deadline = time.monotonic() + PATIENCE_S
        while engine.send_frame(old_identity, *frame(4)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.send_frame(old_identity, *frame(4))

        time.sleep(0.3)
        second.send_frame(*frame(5))
        poll_until(engine, lambda inbox: inbox.frames, "the second host's frame")
        assert old_identity in engine.forget_silent_peers(timeout_s=0.25)
        assert old_identity not in engine.forget_silent_peers(timeout_s=0.0)  # forgotten once


# ------------------------------------------------------------------- bad input

HELLO = {"type": "hello", "version": PROTOCOL_VERSION, "model": "m", "width": 8, "height": 8, "prompt": "", "id": 5}
HEADER = {"session": "s", "seq": 1, "t_capture_ns": 1, "width": 2, "height": 2, "format": "rgba8"}


def pack(fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


BAD_INPUT = {
    "random bytes": ([b"\xc1\x07\xff\x00"], ErrorCode.BAD_MESSAGE, None, None),
    "truncated msgpack": ([pack(HELLO)[:-3]], ErrorCode.BAD_MESSAGE, None, None),
    "unknown message type": ([pack({"type": "reboot", "id": 5})], ErrorCode.UNKNOWN_TYPE, "type", 5),
    "wrong protocol version": ([pack({**HELLO, "version": 99})], ErrorCode.PROTOCOL_VERSION, "version", 5),
    "param of wrong type": ([pack({**HELLO, "params": {"steps": "two"}})], ErrorCode.BAD_TYPE, "params.steps", 5),
    "a reply sent as a request": ([encode_message(Ok(id=5))], ErrorCode.UNKNOWN_TYPE, "type", None),
    "three parts": ([b"a", b"b", b"c"], ErrorCode.BAD_MESSAGE, None, None),
    "pixels disagreeing with the header": ([pack(HEADER), bytes(15)], ErrorCode.SIZE_MISMATCH, "pixels", None),
    "100000x100000 frame": ([pack({**HEADER, "width": 100_000, "height": 100_000}), bytes(16)],
                            ErrorCode.OUT_OF_RANGE, "width", None),
    "unknown pixel format": ([pack({**HEADER, "format": "nv12"}), bytes(16)], ErrorCode.BAD_VALUE, "format", None),
}


@pytest.mark.parametrize("parts, code, field, request_id", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_gets_an_error_reply_naming_the_field_and_nothing_else_breaks(engine, parts, code, field, request_id):
    peer = raw_dealer(engine.address)
    try:
        peer.send_multipart(parts)
        inbox = poll_until(engine, lambda inbox: inbox.rejected, "the bad message")
        assert [(r.error.code, r.error.field) for r in inbox.rejected] == [(code, field)]
        assert peer.poll(PATIENCE_S * 1000)
        reply = decode_message(peer.recv())
        assert isinstance(reply, ErrorReply)
        assert (reply.code, reply.field, reply.id) == (code, field, request_id)

        # The same connection keeps working.
        peer.send(encode_message(StatsRequest(session="s", id=6)))
        inbox = poll_until(engine, lambda inbox: inbox.requests, "the good request")
        assert inbox.requests[0].message == StatsRequest(session="s", id=6)
    finally:
        peer.close()


def test_the_engine_can_report_a_problem_with_a_frame_to_its_host(engine):
    with HostSocket(engine.address) as host:
        send_once_connected(host, *frame(1, session="unknown"))
        received = poll_until(engine, lambda inbox: inbox.frames, "the frame").frames[0]
        engine.reply_error(received, ProtocolError(ErrorCode.UNKNOWN_SESSION, "session", "say hello first"))
        engine.notify(received.sender, ProtocolError(ErrorCode.SESSION_FAILED, None, "out of memory"))
        deadline = time.monotonic() + PATIENCE_S
        notices = []
        while len(notices) < 2 and time.monotonic() < deadline:
            host.recv_latest_frame(0.05)
            notices += host.take_notices()
        assert [(n.code, n.field, n.id) for n in notices] == [
            ("unknown_session", "session", None), ("session_failed", None, None)]


# ---------------------------------------------------------------------- frames


def test_a_frame_arrives_intact_with_its_header(engine):
    with HostSocket(engine.address) as host:
        header, pixels = frame(7, size=32)
        send_once_connected(host, header, pixels)
        received = poll_until(engine, lambda inbox: inbox.frames, "the frame").frames[0]
        assert received.header == header
        assert np.array_equal(received.pixels, pixels)
        assert received.dropped == 0

        assert engine.send_frame(received.sender, header, np.array(received.pixels))
        echoed = host.recv_latest_frame(PATIENCE_S)
        assert echoed.header == header and np.array_equal(echoed.pixels, pixels)
        assert host.recv_latest_frame(0.05) is None  # nothing more came


def test_the_engine_keeps_only_the_newest_frame(engine):
    with HostSocket(engine.address) as host:
        for seq in range(1, 41):  # frames pile up while the engine is busy elsewhere
            send_once_connected(host, *frame(seq))
        time.sleep(0.5)
        received, dropped = [], 0
        deadline = time.monotonic() + PATIENCE_S
        while received[-1:] != [40] and time.monotonic() < deadline:
            inbox = engine.poll(0.05)
            assert len(inbox.frames) <= 1  # one sender, one session: one frame per poll
            for f in inbox.frames:
                assert (f.pixels == f.header.seq % 256).all()
                received.append(f.header.seq)
                dropped += f.dropped
        assert received[-1:] == [40] and received == sorted(received)
        assert len(received) + dropped == 40  # every frame delivered or counted as dropped
        assert dropped > 0


def test_frames_of_different_sessions_do_not_replace_each_other(engine):
    with HostSocket(engine.address) as host:
        send_once_connected(host, *frame(1, "a"))
        send_once_connected(host, *frame(2, "b"))
        received = {}
        deadline = time.monotonic() + PATIENCE_S
        while len(received) < 2 and time.monotonic() < deadline:
            received.update((f.header.session, (f.header.seq, f.dropped)) for f in engine.poll(0.05).frames)
        assert received == {"a": (1, 0), "b": (2, 0)}


def test_the_host_keeps_only_the_newest_frame(engine):
    with HostSocket(engine.address) as host:
        send_once_connected(host, *frame(0))
        identity = poll_until(engine, lambda inbox: inbox.frames, "the host's first frame").frames[0].sender
        for seq in range(1, 41):
            deadline = time.monotonic() + PATIENCE_S
            while not engine.send_frame(identity, *frame(seq)):
                assert time.monotonic() < deadline, "the host's queue never had room"
                time.sleep(0.01)
        time.sleep(0.5)
        received, dropped = [], 0
        deadline = time.monotonic() + PATIENCE_S
        while received[-1:] != [40] and time.monotonic() < deadline:
            got = host.recv_latest_frame(0.05)
            if got is not None:
                assert (got.pixels == got.header.seq % 256).all()
                received.append(got.header.seq)
                dropped += got.dropped
        assert received[-1:] == [40] and received == sorted(received)
        assert len(received) + dropped == 40
        assert dropped > 0


def test_a_header_and_pixels_go_as_one_message(engine):
    # A raw two-part message is exactly what HostSocket.send_frame produces.
    header, pixels = frame(3)
    peer = raw_dealer(engine.address)
    try:
        peer.send_multipart([encode_frame_header(header), pixels.tobytes()])
        received = poll_until(engine, lambda inbox: inbox.frames, "the frame").frames[0]
        assert received.header == header and np.array_equal(received.pixels, pixels)
    finally:
        peer.close()
