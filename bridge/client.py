"""EngineClient: what a host application uses to stream frames through the engine.

    from bridge.client import EngineClient

    with EngineClient("tcp://127.0.0.1:5555", transport="shm", width=640, height=480,
                      prompt="a watercolour painting", strength=0.7) as engine:
        while running:
            engine.send(camera_frame)               # uint8 [480, 640, 3 or 4]
            output = engine.receive(timeout=0.01)   # the newest stylised frame, or None
            if output is not None:
                show(output.pixels, f"{output.latency_ms:.0f} ms glass to glass")

Frames go through shared memory (transport="shm": same machine, fastest) or ZeroMQ
(transport="zmq"); control messages always go over ZeroMQ. Latest wins everywhere:
send never blocks, a frame the engine has no time for is dropped there, and receive
returns the newest finished frame. Outputs trail inputs by `lag_frames`.

With transport="spout" (an engine on Windows) no frames pass through the client: the
engine reads the Spout sender named by the session parameter spout_input ("" for the
active sender) and publishes its output as the sender spout_output, at width x height
(frames of another size are fitted to it). send() then raises, and receive() returns
None after its wait; call receive() or stats() now and then all the same, since they
keep the session alive.

    with EngineClient(transport="spout", width=512, height=512, prompt="ink",
                      spout_input="TouchDesigner", spout_output="StreamDiffusion") as engine:
        while running:
            engine.receive(timeout=0.5)   # tends the session; the frames go through Spout

The client needs no thread of its own. Every call also tends the connection: twice a
second it asks the engine for the session's stats, which keeps the session open and
keeps `state` current. When the engine stops answering, `state` becomes
"disconnected" (and says so in the log); once an engine answers again at the same
address the client opens a new session with the same parameters and carries on. A
host that makes no call for longer than the engine's session timeout loses its session
the same way, and gets a new one on its next call. Use a client from one thread (or
bridge.background.BackgroundClient, which tends one on a thread of its own).
Expected states (the engine gone, a new session opening) are logged at INFO, faults
(a refused session, a failed step) at WARNING.

An engine on another machine requires keys (CURVE, see bridge/zmq_io.py): pass
server_key (the engine's server.key, or its text) and client_keys (this host's
<name>.key_secret file, or its (public, secret) texts). A refused key raises
AuthenticationError from open().

`counters` says where every frame went, so nothing is lost without a trace: sent
(frames given to send), not_sent (dropped here: no session, or the queue to the engine
full), received (outputs receive returned) and skipped (outputs a newer one replaced
before receive took them). Frames the engine dropped are in its stats().

No torch here: this module loads in TouchDesigner, OBS and any plain Python.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .protocol import (
    ENGINE_SIDE_TRANSPORTS,
    FORMATS,
    Bye,
    ErrorCode,
    ErrorReply,
    FrameHeader,
    Hello,
    Ok,
    ParamsUpdate,
    Ping,
    ProtocolError,
    StatsRequest,
    check_geometry,
    check_params,
)
from .shm import RingReader, RingWriter
from .zmq_io import (DEFAULT_ADDRESS, AuthenticationError, ClientKeys, HostSocket, KeySource, RemoteError,
                     check_address)

log = logging.getLogger(__name__)

TRANSPORTS = ("shm", "zmq", "spout", "ndi", "syphon")
KEEPALIVE_S = 0.5  # how often the client asks for stats (and so shows the engine it is alive)
ENGINE_TIMEOUT_S = 3.0  # no answer for this long: the engine is gone
POLL_S = 0.001  # receive's wait between looks at the output ring
TEND_EVERY_S = 0.05  # the longest receive waits without tending the connection
MAX_STATS_POSTED = 16


@dataclass(frozen=True)
class Output:
    pixels: np.ndarray  # [height, width, channels] uint8, in the format its input was sent in
    seq: int  # the seq of the input frame it was made from
    t_capture_ns: int  # that input's capture time, as sent
    latency_ms: float  # glass to glass: from t_capture_ns to its arrival here (same clock: time.monotonic_ns)


@dataclass
class FrameCounters:
    """Where this client's frames went, over its whole life (all its sessions)."""

    sent: int = 0  # frames given to send()
    not_sent: int = 0  # of those, dropped here: no session, or the queue to the engine was full
    received: int = 0  # outputs receive() returned
    skipped: int = 0  # outputs replaced by a newer one before receive() took them

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class EngineClient:
    """A session on an engine. Open it with `with` (or open() and close())."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        transport: str = "shm",
        width: int,
        height: int,
        model: str = "default",
        timeout_s: float = 5.0,
        engine_timeout_s: float = ENGINE_TIMEOUT_S,
        server_key: KeySource | None = None,
        client_keys: KeySource | tuple[KeySource, KeySource] | None = None,
        **session_params: Any,
    ):
        """width and height are the size of the frames you will send (for spout, of the frames
        the engine publishes); session_params are the engine's parameters (prompt,
        strength, steps, seed, fit, model_width, virtualcam, spout_input, ...: see
        `info["schema"]` once open). timeout_s bounds each request to the engine.
        server_key and client_keys, both or neither, authenticate to an engine that
        requires keys (see the module doc)."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if (server_key is None) != (client_keys is None):
            raise ValueError("give both server_key (the engine's server.key) and client_keys (this host's "
                             "<name>.key_secret), or neither")
        self._auth = None if server_key is None else ClientKeys.load(server_key, client_keys)
        self.address = check_address(address)  # wrong now rather than at open()
        self.transport = transport
        self.width, self.height, _, _ = check_geometry(width, height, "rgba8")
        self.model = model
        self.timeout_s = timeout_s
        self.engine_timeout_s = engine_timeout_s
        self._prompt = str(session_params.pop("prompt", ""))
        self._params = check_params(session_params, None)  # the engine checks them against its table
        self._socket: HostSocket | None = None
        self.session: str | None = None
        self.info: dict[str, Any] = {}  # the engine's answer to hello: lag_frames, schema, ...
        self.error: RemoteError | None = None  # the last error the engine reported
        self._state = "closed"
        self._next_seq = 0
        self._input_ring: RingWriter | None = None
        self._output_ring: RingReader | None = None
        # request id -> (session, outputs received when posted), for stats requests not answered yet
        self._stats_posted: dict[int, tuple[str, int]] = {}
        self._last_keepalive = 0.0
        self._waiting_since: float | None = None  # time of the oldest request the engine has not answered
        self._lost_at = 0.0
        self.counters = FrameCounters()

    # -- lifecycle ------------------------------------------------------------------------
    def open(self) -> EngineClient:
        """Connect and open a session. Raises TimeoutError when no engine answers,
        AuthenticationError when it refuses our keys, and RemoteError when it refuses
        the session (the message says why)."""
        if self._socket is None:
            self._socket = HostSocket(self.address, auth=self._auth)
        try:
            self._open_session()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Close the session (telling the engine) and the connection. Safe to call twice."""
        if self._socket is None:
            return
        if self.session is not None and self._state != "disconnected":
            try:
                self._socket.request(Bye(session=self.session), timeout_s=min(self.timeout_s, 1.0))
            except (TimeoutError, RemoteError):
                pass  # the engine is gone, or forgot the session already
        self._drop_session()
        self._socket.close()
        self._socket = None
        self._state = "closed"

    def __enter__(self) -> EngineClient:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def state(self) -> str:
        """The session's state as the engine last reported it (starting, loading, ready,
        streaming, error), or disconnected (no engine answers) or closed."""
        return self._state

    # -- frames -----------------------------------------------------------------------------
    def send(self, frame: np.ndarray, t_capture_ns: int | None = None, *, format: str | None = None) -> int:
        """Send a uint8 [height, width, 3 or 4] frame; returns its seq. Never blocks.

        format is rgb8 for 3 channels and rgba8 for 4 unless given (bgra8). t_capture_ns
        defaults to now on time.monotonic_ns, the clock latency_ms is measured with.
        While there is no session (the engine is away) the frame is dropped. A spout
        session takes no frames from here: it raises RuntimeError.
        """
        self._check_open()
        if self.transport in ENGINE_SIDE_TRANSPORTS:
            raise RuntimeError(f"a {self.transport} session's frames come from the {self.transport} source named "
                               f"by {self.transport}_input, not from send()")
        if not isinstance(frame, np.ndarray):
            raise ValueError(f"frame must be a numpy array, got {type(frame).__name__}")
        format = format or ("rgb8" if frame.shape[-1:] == (3,) else "rgba8")
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        expected = (self.height, self.width, FORMATS[format])
        if frame.dtype != np.uint8 or frame.shape != expected:
            raise ValueError(
                f"frame must be uint8 {expected} ({format}) for this client, got {frame.dtype} {frame.shape}"
            )
        seq = self._next_seq
        self._next_seq += 1
        t_capture_ns = time.monotonic_ns() if t_capture_ns is None else t_capture_ns
        self.counters.sent += 1
        self._tend()
        if self.session is None:
            self.counters.not_sent += 1
            return seq
        if self.transport == "shm":
            self._input_ring_for(format).write(frame, seq, t_capture_ns)
        else:
            header = FrameHeader.for_array(frame, session=self.session, seq=seq, t_capture_ns=t_capture_ns,
                                           format=format)
            if not self._socket.send_frame(header, frame):
                self.counters.not_sent += 1
        return seq

    def receive(self, timeout: float = 0.0) -> Output | None:
        """The newest finished frame not returned yet, waiting up to timeout seconds for one.
        A spout session's frames go to its Spout sender: None, after the wait."""
        self._check_open()
        deadline = time.monotonic() + timeout
        while True:
            self._tend()
            remaining = deadline - time.monotonic()
            output = self._take_output(min(max(remaining, 0.0), TEND_EVERY_S))
            if output is not None:
                self._state = "streaming"  # before the next stats reply says so
                self.counters.received += 1
                return output
            if time.monotonic() >= deadline:
                return None

    # -- control ------------------------------------------------------------------------------
    def set(self, **params: Any) -> dict[str, Any]:
        """Change session parameters; they apply between steps. Returns the engine's answer:
        params (all current values) and restarts (whether a reload parameter restarted the
        stream). Raises RemoteError naming the parameter the engine refused. While there
        is no session they are kept for the next one, and {} is returned; when the engine
        no longer knows the session (it restarted), a new one opens with them."""
        self._check_open()
        params = check_params(params, None)
        self._tend()
        reply: dict[str, Any] = {}
        forgotten = False
        if self.session is not None:
            try:
                reply = self._socket.request(ParamsUpdate(session=self.session, params=params), self.timeout_s)
                self.info.update(lag_frames=reply["lag_frames"], first_chunk_frames=reply["first_chunk_frames"])
            except RemoteError as error:
                if error.code != ErrorCode.UNKNOWN_SESSION:
                    raise
                forgotten = True
        # Kept, so that a session opened after an engine restart starts with them.
        self._prompt = params.pop("prompt", self._prompt)
        self._params.update(params)
        if forgotten:
            self._session_forgotten()
        return reply

    def stats(self) -> dict[str, Any]:
        """The session's state, parameters and counters, from the engine. When the engine
        no longer knows the session (it restarted), those of the new session opened for it."""
        self._check_open()
        self._tend()
        for attempt in range(2):
            if self.session is None:
                raise ConnectionError(f"no session: the engine at {self.address} is {self._state}")
            try:
                stats = self._socket.request(StatsRequest(session=self.session), self.timeout_s)
            except RemoteError as error:
                if error.code != ErrorCode.UNKNOWN_SESSION or attempt:
                    raise
                self._session_forgotten()
                continue
            self._state = stats["state"]
            return stats

    # -- the connection --------------------------------------------------------------------------
    def _open_session(self) -> None:
        hello = Hello(model=self.model, width=self.width, height=self.height, prompt=self._prompt,
                      transport=self.transport, params=self._params)
        reply = self._socket.request(hello, self.timeout_s)
        self.session = reply["session"]
        self.info = reply
        self._state = reply["state"]
        self.error = None
        self._waiting_since = None
        if self.transport == "shm":
            try:
                self._output_ring = RingReader.attach(reply["output_ring"])
            except FileNotFoundError:
                # The engine ended the session between its reply and now; the session_failed
                # notice on its way says why (it sets error). No frames will come back.
                log.warning("session %s ended on the engine as it opened", self.session)
                self._state = "error"
                return
        log.info("session %s open on the engine at %s", self.session, self.address)

    def _tend(self) -> None:
        """Take in the engine's notices, keep the session alive, notice the engine going and coming back."""
        now = time.monotonic()
        for notice in self._socket.take_notices():
            self._take_notice(notice)
        if now - self._last_keepalive >= KEEPALIVE_S:
            self._last_keepalive = now
            self._post_keepalive()
            if self._waiting_since is None:
                self._waiting_since = now
        heard = self._socket.last_heard or 0.0
        if self._waiting_since is not None and heard >= self._waiting_since:
            self._waiting_since = None
        if self._state == "disconnected":
            if heard > self._lost_at:  # an engine answers again
                self._reopen()
        elif self._waiting_since is not None and now - self._waiting_since > self.engine_timeout_s:
            log.info("the engine at %s stopped answering; its session is lost. A new one opens when an "
                     "engine answers there again", self.address)
            self._drop_session()
            self._state = "disconnected"
            self._lost_at = now

    def _post_keepalive(self) -> None:
        """Ask for the session's stats without waiting (a ping while there is no session)."""
        if self.session is None:
            self._socket.post(Ping())
            return
        request_id = self._socket.post(StatsRequest(session=self.session))
        if request_id is not None:
            self._stats_posted[request_id] = (self.session, self.counters.received)
            while len(self._stats_posted) > MAX_STATS_POSTED:  # the oldest will never be answered
                del self._stats_posted[next(iter(self._stats_posted))]

    def _take_notice(self, notice: Ok | ErrorReply) -> None:
        if notice.id is not None:  # the reply to a posted request
            session, received_when_posted = self._stats_posted.pop(notice.id, (None, 0))
            if session is None or session != self.session:
                return  # a ping's, or about an earlier session
            if isinstance(notice, Ok):
                # An output that came meanwhile is newer news than this reply (streaming, not ready).
                if self.counters.received == received_when_posted:
                    self._state = notice.payload.get("state", self._state)
                return
            if notice.code == ErrorCode.UNKNOWN_SESSION:
                self._session_forgotten()
                return
        if notice.code == ErrorCode.UNKNOWN_SESSION and self.session is None:
            return  # about a frame sent before we learnt that the session had ended
        error = RemoteError(notice.code, notice.field, notice.message)
        if notice.code == ErrorCode.SESSION_FAILED:
            log.warning("the engine ended session %s: %s", self.session, notice.message)
            self._drop_session()
            self._state = "error"
        else:
            log.warning("the engine reported: %s", error)
        self.error = error

    def _session_forgotten(self) -> None:
        """No such session any more: a new engine, or we were silent too long."""
        log.info("the engine at %s no longer knows session %s; opening a new one", self.address, self.session)
        self._drop_session()
        self._reopen()

    def _reopen(self) -> None:
        try:
            self._open_session()
        except (TimeoutError, AuthenticationError, RemoteError, ProtocolError, FileNotFoundError) as error:
            # No engine yet is what a restarting engine looks like; anything else is a fault.
            log.log(logging.INFO if isinstance(error, TimeoutError) else logging.WARNING,
                    "could not open a new session on the engine at %s: %s", self.address, error)
            self.error = error if isinstance(error, RemoteError) else None
            self._state = "disconnected"
            self._lost_at = time.monotonic()

    def _drop_session(self) -> None:
        """Forget the session and free its rings (the engine frees its side)."""
        self.session = None
        if self._input_ring is not None:
            self._input_ring.close()
            self._input_ring = None
        if self._output_ring is not None:
            self._output_ring.close()
            self._output_ring = None

    def _input_ring_for(self, format: str) -> RingWriter:
        """The ring to the engine, made on the first frame and remade for a new format."""
        ring = self._input_ring
        if ring is None:
            ring = self._input_ring = RingWriter.create(self.width, self.height, format, name=self.info["input_ring"])
        elif ring.format != format:
            ring.resize(self.width, self.height, format)
        return ring

    def _take_output(self, wait_s: float) -> Output | None:
        no_frames_here = self.transport in ENGINE_SIDE_TRANSPORTS or (self.transport == "shm" and self._output_ring is None)
        if self.session is None or no_frames_here:
            time.sleep(wait_s)
            return None
        if self.transport == "zmq":
            frame = self._socket.recv_latest_frame(wait_s)
            if frame is None:
                return None
            self.counters.skipped += frame.dropped
            if frame.header.session != self.session:  # from a session closed since
                self.counters.skipped += 1
                return None
            return _output(np.array(frame.pixels), frame.header.seq, frame.header.t_capture_ns)
        ring = self._output_ring
        skipped_before = ring.skipped
        deadline = time.monotonic() + wait_s
        while (frame := ring.read_latest()) is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
        self.counters.skipped += ring.skipped - skipped_before
        return None if frame is None else _output(frame.pixels, frame.seq, frame.t_capture_ns)

    def _check_open(self) -> None:
        if self._socket is None:
            raise RuntimeError("the client is not open: use it in a with block, or call open() first")


def describe_scheduler(stats: dict[str, Any]) -> str:
    """How the engine's scheduler serves a session, in a few words for a status line, from
    the session's stats: whether it meets its targets, its mode and chunk size, any cap."""
    choice = stats.get("scheduler")
    if not choice:
        return "no plan yet"
    words = [choice["state"], "stream-batched" if choice["stream_batch"] else "steps in turn",
             f"chunks of {choice['chunk_frames']} frames"]
    if choice.get("frame_rate_cap") is not None:
        words.append(f"capped at {choice['frame_rate_cap']:g} fps")
    if choice.get("predicted_latency_ms") is not None:
        words.append(f"{choice['predicted_latency_ms']:.0f} ms predicted")
    return ", ".join(words)


def _output(pixels: np.ndarray, seq: int, t_capture_ns: int) -> Output:
    return Output(pixels, seq, t_capture_ns, (time.monotonic_ns() - t_capture_ns) / 1e6)
