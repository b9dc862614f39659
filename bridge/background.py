"""BackgroundClient: a host's session on the engine, tended on a thread of its own.

EngineClient waits: for the engine to answer a hello, a parameter change or a stats
request, up to its timeout when the engine is busy, stalled or gone. A host's render
loop (TouchDesigner's cook, OBS's graphics thread) must never wait, so the client lives
on this thread and the host only hands things over; none of these calls waits:

    offer(frame, t_capture_ns)  the newest input; one the thread has not sent yet is
                                replaced by it (latest wins)
    take()                      the newest output not taken yet (or on_output gets each
                                one on the thread, the moment it arrives)
    set(**params)               parameter changes, sent once they have been still for
                                DEBOUNCE_S (hosts call it on every key typed)
    configure(config)           a new SessionConfig (address, size, ...): the session is
                                replaced once it has been still for DEBOUNCE_S
    status()                    one Status snapshot, which defines each figure a host shows

The session opens at the configured size, or with width and height 0 at the size of
the frames offered (a frame of another size then opens a new session at its size).
A Spout session takes no frames from its host: one offered to it (while a host switches
transports, say) is dropped. Hosts convert pixels on the thread with convert_input and
convert_output; messages name parameters by their labels in the table. While no
engine answers it tries again every RETRY_S; EngineClient itself notices an engine
going away and opens a new session when one answers again at the same address; a
session the engine ended (a failed step) is replaced.

Logging: expected states (no engine yet, the engine lost, a session opened) are INFO;
real faults (a refused session or value, a failed session) WARNING, a bug ERROR.
LogLines hands the bridge's log records to a host's own thread.

No torch here: this module loads in TouchDesigner, OBS and any plain Python.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from .client import EngineClient, FrameCounters, Output, describe_scheduler
from .params import PARAMS
from .protocol import ENGINE_SIDE_TRANSPORTS, ErrorCode, ProtocolError
from .zmq_io import AuthenticationError, RemoteError

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 2.0  # how long the thread waits for the engine to answer one request
RETRY_S = 1.0  # between attempts to reach an engine that does not answer, or to replace a failed session
REFUSED_RETRY_S = 5.0  # between hellos to an engine that refuses the session
DEBOUNCE_S = 0.2  # parameters and configurations are sent once they have been still this long
POLL_S = 0.002  # the longest a finished frame waits in shared memory before the thread looks
STATS_EVERY_S = 1.0  # how often the engine's counters and scheduler are read
RATE_WINDOW_S = 2.0  # output FPS and latency are over the outputs of this many seconds
NOTICE_S = 10.0  # how long a notice stays in the status
CLOSE_WAIT_S = 2 * REQUEST_TIMEOUT_S + 1  # close() waits at most this for a request in progress and the bye

MESSAGES = {  # what each state means for the host, with {address}
    "waiting for frames": "waiting for the first frame: the session opens at its size",
    "connecting": "connecting to the engine at {address}",
    "unreachable": "no engine answers at {address}: start one there, or check the address",
    "loading": "the engine is loading its model",
    "starting": "warming up: the first frames take a moment",
    "ready": "warming up: the first frames take a moment",
    "streaming": "",
    "disconnected": "the engine at {address} stopped answering; the last frame stays until it is back",
    "error": "the engine ended the session; opening a new one",
    "stopped": "stopped",
}


@dataclass(frozen=True)
class SessionConfig:
    """What a session is opened with; a change to any of it needs a new session."""

    address: str
    transport: str = "shm"
    model: str = "default"
    width: int = 0  # 0 (with height 0): the size of the frames offered
    height: int = 0
    transport_params: tuple[tuple[str, Any], ...] = ()  # parameters only this transport takes (Spout's sender names)

    @property
    def follows_frames(self) -> bool:
        return not (self.width and self.height)


@dataclass(frozen=True)
class DroppedFrames:
    """Frames offered that were never shown, by where they were dropped (latest wins everywhere,
    so a slow engine drops frames rather than lag)."""

    replaced: int = 0  # offered, then replaced by a newer one before the thread sent it
    not_sent: int = 0  # dropped before the engine: no session (the engine away), its queue full, another size
    by_engine: int = 0  # stale inputs the engine skipped, and finished frames it replaced by newer ones
    outputs_skipped: int = 0  # outputs a newer one replaced before the thread took them

    @property
    def total(self) -> int:
        return self.replaced + self.not_sent + self.by_engine + self.outputs_skipped


@dataclass(frozen=True)
class Status:
    """What the host sees now. Every figure has one definition, here."""

    # The session's state as the engine reports it (loading, starting, ready, streaming, error), or
    # waiting for frames, connecting, unreachable (no engine answers), refused, disconnected (the
    # engine stopped answering), stopped.
    state: str
    message: str  # what the state means and what to do; "" while streaming
    error: str  # the faults that stand now ("" when none); each clears when its cause does
    notice: str  # the latest news (a change restarted the stream, ...), for NOTICE_S
    output_fps: float  # outputs received in the last RATE_WINDOW_S, per second
    latency_ms: float | None  # glass to glass, their mean: input's t_capture_ns to output's arrival; None: no outputs
    first_frame_ms: float | None  # from the session's (or stream restart's) first frame sent to its first output
    frames_sent: int  # frames that went to the engine
    frames_shown: int  # outputs handed to the host
    dropped: DroppedFrames
    scheduler: str  # how the engine's scheduler serves the session (describe_scheduler); "" without a session
    engine_params: Mapping[str, Any]  # the session's parameters as the engine last reported them
    model: str  # the model the engine serves, as its hello reply says; "" before a session opens
    config: SessionConfig  # the session's configuration (the size of its frames, once known)


class BackgroundClient:
    """A session on the engine for a host. start() it, close() it; everything else from any thread.

    params: the session's parameters by their protocol names. convert_input(frame) runs on the
    thread and returns the engine's uint8 RGB or RGBA pixels (rows top to bottom);
    convert_output(pixels) turns an output into what the host takes. on_output, when given,
    gets each output on the thread instead of take().
    """

    def __init__(self, config: SessionConfig, params: Mapping[str, Any] | None = None, *,
                 convert_input: Callable[[Any], np.ndarray] | None = None,
                 convert_output: Callable[[np.ndarray], Any] | None = None,
                 on_output: Callable[[Any], None] | None = None):
        self._convert_input = convert_input
        self._convert_output = convert_output
        self._on_output = on_output
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-background-client", daemon=True)
        self._lock = threading.Lock()  # guards what the host's threads and the thread share, below
        self._frame_offered = threading.Condition(self._lock)
        self._config = config
        self._pending_config: SessionConfig | None = None
        self._pending_params: dict[str, Any] = {}
        self._changed_at = 0.0  # when parameters or the configuration last changed
        self._frame: tuple[Any, int] | None = None  # offered, not sent yet
        self._output: Any = None  # received, not taken yet
        self._state = "connecting"
        self._errors: dict[str, str] = {}  # cause -> message: "open", "session", "link", "output", "param:NAME"
        self._notice = ("", 0.0)  # (text, time.monotonic() it was said)
        self._arrivals: deque[tuple[float, float]] = deque()  # (time.monotonic(), latency_ms) within RATE_WINDOW_S
        self._first_frame_ms: float | None = None
        self._frames_shown = self._replaced = self._unsent = 0  # _unsent: another size, or to a Spout session
        self._engine_dropped = self._engine_dropped_before = 0  # this session's, and the sessions' before
        self._scheduler = ""
        self._engine_params: dict[str, Any] = {}
        self._model = ""
        self._client: EngineClient | None = None
        self._counted_before = FrameCounters()  # what the clients closed so far counted
        # The thread's own:
        self._params = dict(params or {})  # the values the session should have
        self._not_taken: set[str] = set()  # parameters the engine refused to know
        self._schema: dict[str, dict] = {}  # the engine's parameter table
        self._session_id: str | None = None
        self._first_sent_at: float | None = None

    # -- the host's side ---------------------------------------------------------------
    def start(self) -> BackgroundClient:
        self._thread.start()
        return self

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """End the thread, which closes the session (saying bye); waits at most wait_s for that."""
        self._stopping.set()
        with self._frame_offered:
            self._frame_offered.notify()
        if wait_s > 0 and self._thread.is_alive():
            self._thread.join(wait_s)

    def offer(self, frame: Any, t_capture_ns: int) -> None:
        """The newest input (the thread owns it from now on), captured at t_capture_ns (time.monotonic_ns)."""
        with self._frame_offered:
            if self._frame is not None:
                self._replaced += 1
            self._frame = (frame, t_capture_ns)
            self._frame_offered.notify()

    def take(self) -> Any:
        """The newest output not taken yet (after convert_output), or None."""
        with self._lock:
            output, self._output = self._output, None
        return output

    def set(self, **params: Any) -> None:
        """Parameter changes; sent once none has come for DEBOUNCE_S."""
        if not params:
            return
        with self._lock:
            self._pending_params.update(params)
            self._changed_at = time.monotonic()

    def configure(self, config: SessionConfig) -> None:
        """A new session configuration; the session is replaced once it has been still for DEBOUNCE_S."""
        with self._lock:
            self._pending_config = None if config == self._config else config
            self._changed_at = time.monotonic()

    def status(self) -> Status:
        with self._lock:
            now = time.monotonic()
            while self._arrivals and now - self._arrivals[0][0] > RATE_WINDOW_S:
                self._arrivals.popleft()
            latencies = [latency for _, latency in self._arrivals]
            sent, not_sent, skipped = self._counts()
            notice, said_at = self._notice
            if self._state == "refused":
                message = self._errors.get("open", "")
            else:
                message = MESSAGES.get(self._state, "").format(address=self._config.address)
            return Status(
                state=self._state,
                message=message,
                error="; ".join(self._errors.values()),
                notice=notice if now - said_at < NOTICE_S else "",
                output_fps=len(latencies) / RATE_WINDOW_S,
                latency_ms=sum(latencies) / len(latencies) if latencies else None,
                first_frame_ms=self._first_frame_ms,
                frames_sent=sent - not_sent,
                frames_shown=self._frames_shown,
                dropped=DroppedFrames(self._replaced, not_sent + self._unsent,
                                      self._engine_dropped_before + self._engine_dropped, skipped),
                scheduler=self._scheduler,
                engine_params=dict(self._engine_params),
                model=self._model,
                config=self._config,
            )

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            client = self._open()
            if client is None:
                continue
            try:
                self._stream(client)
            except Exception as error:  # a bug or a surprise: say so, and start over with a new session
                log.exception("the session's thread failed; opening a new session")
                self._set_error("link", f"the link to the engine failed ({type(error).__name__}: {error}); "
                                        "trying again")
                self._stopping.wait(RETRY_S)
            finally:
                self._close(client)
        with self._lock:
            self._state = "stopped"

    def _open(self) -> EngineClient | None:
        """A session on the engine, or None (having waited before the next attempt)."""
        with self._lock:  # whatever changed before the session opens goes with it
            if self._pending_config is not None:
                if self._pending_config.address != self._config.address:
                    self._not_taken.clear()  # another engine
                self._config, self._pending_config = self._pending_config, None
            self._params.update(self._pending_params)
            self._pending_params.clear()
            config, frame = self._config, self._frame
        width, height = config.width, config.height
        if config.follows_frames:
            if frame is None:
                self._set_state("waiting for frames")
                with self._frame_offered:
                    self._frame_offered.wait_for(lambda: self._frame is not None or self._stopping.is_set(), RETRY_S)
                return None
            height, width = frame[0].shape[:2]
        params = {name: value for name, value in self._params.items() if name not in self._not_taken}
        try:
            client = EngineClient(config.address, transport=config.transport, width=width, height=height,
                                  model=config.model, timeout_s=REQUEST_TIMEOUT_S,
                                  **params | dict(config.transport_params))
            client.open()
        except TimeoutError:
            if self._set_state("unreachable"):
                log.info("no engine answers at %s yet; trying again every %g s", config.address, RETRY_S)
            self._stopping.wait(RETRY_S)
            return None
        except RemoteError as error:
            name = (error.field or "").removeprefix("params.")
            if error.code == ErrorCode.UNKNOWN_PARAM and name in params:  # an older engine: open without it
                self._not_taken.add(name)
                self._say(f"this engine does not take {self._names([name])} yet; left as the engine has it")
                return None
            self._refused(f"the engine at {config.address} refused the session: {error.message}")
            return None
        except (AuthenticationError, ProtocolError, ValueError, OSError) as error:  # a bad setting, shared memory full
            self._refused(f"cannot open a session on the engine at {config.address}: {error}")
            return None
        with self._lock:
            self._errors.pop("open", None)
            self._client = client
        self._follow_session(client)
        return client

    def _refused(self, message: str) -> None:
        self._set_state("refused")
        self._set_error("open", message)
        self._stopping.wait(REFUSED_RETRY_S)

    def _stream(self, client: EngineClient) -> None:
        """Serve the session until it must be replaced: a settled new configuration, frames of
        another size, or the engine ended it."""
        next_stats = time.monotonic()
        while not self._stopping.is_set():
            with self._lock:
                if self._pending_config is not None and self._settled():
                    return
            frame = self._take_frame(POLL_S)
            if frame is not None and not self._send(client, frame):
                return
            output = client.receive(0)
            if output is not None:
                self._deliver(output)
            self._follow_session(client)
            self._send_settled_params(client)
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + STATS_EVERY_S
                self._read_stats(client)
            if client.state == "error":  # the engine ended the session (a failed step): open a new one
                reason = client.error.message if client.error is not None else "no reason given"
                self._set_error("session", f"the engine ended the session: {reason}")
                self._stopping.wait(RETRY_S)
                return

    def _take_frame(self, timeout_s: float) -> tuple[Any, int] | None:
        with self._frame_offered:
            if self._frame is None and not self._stopping.is_set():
                self._frame_offered.wait(timeout_s)
            frame, self._frame = self._frame, None
            return frame

    def _send(self, client: EngineClient, frame: tuple[Any, int]) -> bool:
        """Send a frame; False when it needs a session of its own size."""
        pixels, t_capture_ns = frame
        if client.transport in ENGINE_SIDE_TRANSPORTS:
            with self._lock:
                self._unsent += 1  # its frames travel by Spout (offered while the host switched transports)
            return True
        if tuple(pixels.shape[:2]) != (client.height, client.width):
            if not self._config.follows_frames:
                with self._lock:
                    self._unsent += 1  # captured for the size of the session before
                return True
            with self._lock:
                self._frame = self._frame or frame  # the next session opens at its size
            log.info("the frames are %dx%d now: opening a session of that size", pixels.shape[1], pixels.shape[0])
            return False
        client.send(self._convert_input(pixels) if self._convert_input else pixels, t_capture_ns)
        if self._first_sent_at is None and client.session is not None:
            self._first_sent_at = time.monotonic()
        return True

    def _deliver(self, output: Output) -> None:
        pixels = self._convert_output(output.pixels) if self._convert_output else output.pixels
        if self._on_output is not None:
            try:
                self._on_output(pixels)
            except Exception as error:  # noqa: BLE001 - the host refused the frame; the stream goes on
                self._set_error("output", f"cannot show a stylised frame: {type(error).__name__}: {error}")
                return
        now = time.monotonic()
        with self._lock:
            if self._on_output is None:
                self._output = pixels
            self._frames_shown += 1
            self._arrivals.append((now, output.latency_ms))
            if self._first_frame_ms is None and self._first_sent_at is not None:
                self._first_frame_ms = (now - self._first_sent_at) * 1000.0
            for cause in ("output", "session", "link"):  # frames come back: whatever stood in the way is gone
                self._errors.pop(cause, None)

    def _follow_session(self, client: EngineClient) -> None:
        """Keep up with the client's session, which it replaces by itself when the engine comes back."""
        if client.session != self._session_id:
            self._session_changed(client.session)
            self._schema = client.info.get("schema", self._schema)  # the engine's parameter table
        with self._lock:
            self._model = client.info.get("model", self._model)
            self._state = client.state

    def _session_changed(self, session_id: str | None) -> None:
        """The figures of a session start afresh; the engine's drops of the one before are kept."""
        self._session_id = session_id
        self._first_sent_at = None
        with self._lock:
            self._first_frame_ms = None
            self._engine_dropped_before += self._engine_dropped
            self._engine_dropped = 0
            self._engine_params = {}
            self._scheduler = ""

    def _send_settled_params(self, client: EngineClient) -> None:
        """Send what the engine's parameter table has; say which parameters it lacks."""
        with self._lock:
            if not self._pending_params or not self._settled():
                return
            changes, self._pending_params = self._pending_params, {}
        known = {name: value for name, value in changes.items() if name in self._schema}
        lacking = [name for name in changes if name not in known]
        if lacking:
            self._not_taken.update(lacking)
            self._say(f"this engine does not take {self._names(lacking)} yet; left as the engine has it")
        if not known:
            return
        try:
            reply = client.set(**known)
        except (RemoteError, ProtocolError) as error:  # a value out of bounds, say: the others were not applied
            name = error.field.removeprefix("params.") if error.field else ", ".join(known)
            self._set_error(f"param:{name}", f"the engine refused {self._names([name])}: {error.message}")
            return
        except TimeoutError:  # unanswered: maybe applied, maybe not; sent again with the next change
            with self._lock:
                self._pending_params = {**known, **self._pending_params}
            return
        self._params.update(known)
        with self._lock:
            for name in known:
                self._errors.pop(f"param:{name}", None)
        if reply.get("restarts"):
            restarting = [name for name in known if self._schema[name].get("applies") == "reload"] or list(known)
            self._say(f"{self._names(restarting)} changed: the stream restarts (the last frame stays meanwhile)")
            self._first_sent_at = None
            with self._lock:
                self._first_frame_ms = None

    def _read_stats(self, client: EngineClient) -> None:
        if client.session is None:
            return
        try:
            stats = client.stats()
        except (ConnectionError, TimeoutError, RemoteError):
            return  # no session, or the engine is not answering: the state says so
        with self._lock:
            if client.session == self._session_id:
                self._engine_dropped = stats["frames_dropped"] + stats["outputs_dropped"]
                self._engine_params = stats["params"]
                self._scheduler = describe_scheduler(stats)

    def _close(self, client: EngineClient) -> None:
        client.close()  # says bye (briefly waiting) and frees its rings
        self._session_changed(None)
        with self._lock:
            for name, count in client.counters.as_dict().items():
                setattr(self._counted_before, name, getattr(self._counted_before, name) + count)
            self._client = None
            self._state = "connecting"

    # -- shared bookkeeping, holding _lock where it says so ---------------------------------
    def _counts(self) -> tuple[int, int, int]:
        """(sent, not_sent, skipped) over every client so far; holding _lock."""
        before, now = self._counted_before, self._client.counters if self._client is not None else FrameCounters()
        return before.sent + now.sent, before.not_sent + now.not_sent, before.skipped + now.skipped

    def _settled(self) -> bool:
        """Whether the pending changes have been still for DEBOUNCE_S; holding _lock."""
        return time.monotonic() - self._changed_at >= DEBOUNCE_S

    def _set_state(self, state: str) -> bool:
        """Set the state; True when it changed."""
        with self._lock:
            changed, self._state = self._state != state, state
        return changed

    def _set_error(self, cause: str, message: str) -> None:
        """Record a fault (logged when it is news) until its cause clears."""
        with self._lock:
            news = self._errors.get(cause) != message
            self._errors[cause] = message
        if news:
            log.warning("%s", message)

    def _say(self, notice: str) -> None:
        with self._lock:
            self._notice = (notice, time.monotonic())
        log.info("%s", notice)

    def _names(self, names: list[str]) -> str:
        return ", ".join(PARAMS[name].label if name in PARAMS else name for name in names)


class LogLines(logging.Handler):
    """The bridge's log records (INFO and up) kept for a host's own thread, for hosts whose
    log view may only be written from there (TouchDesigner's DATs, OBS's script log):
    attach() once, then take() the (level, line) pairs each frame."""

    LOGGER = "bridge"

    def __init__(self, capacity: int = 200):
        super().__init__(logging.INFO)
        self._records: deque[tuple[int, str]] = deque(maxlen=capacity)
        self._level_before: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self._records.append((record.levelno, self.format(record)))

    def attach(self) -> None:
        logger = logging.getLogger(self.LOGGER)
        self._level_before = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)  # the expected states are INFO
        logger.addHandler(self)

    def detach(self) -> None:
        logger = logging.getLogger(self.LOGGER)
        logger.removeHandler(self)
        if self._level_before is not None and not any(isinstance(other, LogLines) for other in logger.handlers):
            logger.setLevel(self._level_before)

    def take(self) -> list[tuple[int, str]]:
        lines = []
        while self._records:
            lines.append(self._records.popleft())
        return lines
