"""The script's connection to the engine: an EngineClient on a thread of its own.

OBS runs script timers on its graphics thread, which must never wait on the network,
and EngineClient's calls can wait (opening a session, changing parameters, asking for
stats, each up to REQUEST_TIMEOUT_S when the engine is away). So EngineLink owns the
client on a separate thread:

- the capture timer hands it frames with offer(), which never blocks; when the link
  has not sent the previous frame yet, the newer one replaces it (latest wins);
- each stylised frame is handed to `show` the moment it arrives, from the link's
  thread, so it reaches OBS without waiting for the next timer tick;
- parameter changes are sent once they have been still for DEBOUNCE_S: OBS calls
  script_update on every key typed into the prompt. A new session configuration
  (address, size, ...) likewise closes the session and opens a new one once it has
  been still that long, so no call from the script's UI ever waits on the engine;
- while no engine answers, it tries again every RETRY_S; EngineClient itself notices
  an engine that goes away and opens a new session when one answers again;
- status() is a snapshot for the script's properties: the session's state, output
  frame rate, glass-to-glass latency, dropped frames and the last error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from bridge.client import EngineClient, Output, describe_scheduler
from bridge.zmq_io import RemoteError

log = logging.getLogger(__name__)

RETRY_S = 1.0  # between attempts to open a session while no engine answers
DEBOUNCE_S = 0.3  # parameters are sent once they have not changed for this long
STATS_EVERY_S = 1.0  # how often the engine's counters are fetched
POLL_S = 0.002  # the longest a finished frame waits in shared memory before the link looks
REQUEST_TIMEOUT_S = 2.0  # bounds each request to the engine
RATE_WINDOW_S = 2.0  # frame rate and latency are averaged over this long


@dataclass(frozen=True)
class SessionConfig:
    """What a session is opened with; a change to any of it needs a new session."""

    address: str
    transport: str
    model: str
    width: int
    height: int
    transport_params: tuple[tuple[str, Any], ...] = ()  # parameters only this transport takes (Spout's sender names)


@dataclass(frozen=True)
class LinkStatus:
    # The session's state as the engine reports it (starting, loading, ready, streaming, error), or
    # connecting, unreachable (no engine answers), refused, disconnected (the engine stopped answering), stopped.
    engine: str
    output_fps: float  # stylised frames shown per second
    latency_ms: float | None  # glass to glass: from a frame's capture to its stylised frame's arrival
    frames_sent: int
    frames_shown: int
    # Where frames were dropped (latest wins everywhere, so a slow engine drops frames rather than lag):
    replaced_before_send: int  # captured frames a newer one replaced before the link sent them
    not_sent: int  # frames the client dropped: no session (the engine away) or its queue full
    dropped_by_engine: int  # stale inputs the engine skipped, and finished frames it replaced by newer ones
    outputs_skipped: int  # stylised frames a newer one replaced before the link took them
    last_error: str
    notice: str  # the last thing worth telling (a parameter restarted the stream, ...)
    scheduler: str  # how the engine's scheduler serves the session (bridge.client.describe_scheduler)


class EngineLink:
    """Start with start(), end with stop(). offer() and update_params() from any thread."""

    def __init__(
        self,
        session: SessionConfig,
        params: dict[str, Any],
        show: Callable[[np.ndarray], None],
    ):
        self._session = session
        self._params = dict(params)  # the parameters a new session opens with
        self._show = show
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamdiffusion-engine-link", daemon=True)
        self._frame_ready = threading.Condition()
        self._frame: tuple[np.ndarray, int] | None = None  # (pixels, t_capture_ns) not sent yet
        self._lock = threading.Lock()  # guards everything below
        self._pending_params: dict[str, Any] = {}
        self._pending_session: SessionConfig | None = None
        self._changed_at = 0.0  # when parameters or the session configuration last changed
        self._state = "connecting"
        self._arrivals: deque[tuple[float, float]] = deque()  # (time.monotonic(), latency_ms) of recent outputs
        self._frames_sent = self._frames_shown = self._replaced = 0
        self._not_sent = self._dropped_by_engine = self._outputs_skipped = 0  # of the current session
        self._last_error = ""
        self._scheduler = "no session yet"
        self._last_error_message = ""  # without its time, to tell a new error from one repeating
        self._notice = ""

    # -- any thread ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 2 * REQUEST_TIMEOUT_S + 1) -> None:
        """Close the session and end the thread; waits for a request in progress to end."""
        self._stopping.set()
        with self._frame_ready:
            self._frame_ready.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("the engine link did not stop within %.0f s", timeout_s)

    def offer(self, pixels: np.ndarray, t_capture_ns: int) -> None:
        """A captured RGBA frame for the engine. Never waits for the engine."""
        with self._frame_ready:
            if self._frame is not None:
                with self._lock:
                    self._replaced += 1
            self._frame = (pixels, t_capture_ns)
            self._frame_ready.notify()

    def update_params(self, changed: dict[str, Any]) -> None:
        """Engine parameters that changed; sent once they have been still for DEBOUNCE_S."""
        if not changed:
            return
        with self._lock:
            self._pending_params.update(changed)
            self._changed_at = time.monotonic()

    def update_session(self, session: SessionConfig) -> None:
        """A new session configuration; the session is replaced once it has been still for DEBOUNCE_S."""
        with self._lock:
            if session == self._session and self._pending_session is None:
                return
            self._pending_session = session
            self._changed_at = time.monotonic()

    @property
    def session(self) -> SessionConfig:
        """The configuration of the session now open (or being opened)."""
        with self._lock:
            return self._session

    def status(self) -> LinkStatus:
        with self._lock:
            now = time.monotonic()
            while self._arrivals and now - self._arrivals[0][0] > RATE_WINDOW_S:
                self._arrivals.popleft()
            latencies = [latency for _, latency in self._arrivals]
            return LinkStatus(
                engine=self._state,
                output_fps=len(self._arrivals) / RATE_WINDOW_S,
                latency_ms=sum(latencies) / len(latencies) if latencies else None,
                frames_sent=self._frames_sent,
                frames_shown=self._frames_shown,
                replaced_before_send=self._replaced,
                not_sent=self._not_sent,
                dropped_by_engine=self._dropped_by_engine,
                outputs_skipped=self._outputs_skipped,
                last_error=self._last_error,
                notice=self._notice,
                scheduler=self._scheduler,
            )

    # -- the link's thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            client = self._open_client()
            if client is None:
                self._stopping.wait(RETRY_S)
                continue
            try:
                self._stream(client)
            except Exception as error:  # a bug or a surprise: report it, start over with a new session
                log.exception("the engine link failed; opening a new session")
                self._set_error(f"{type(error).__name__}: {error}")
                self._stopping.wait(RETRY_S)
            finally:
                client.close()
        self._set(state="stopped")

    def _open_client(self) -> EngineClient | None:
        with self._lock:  # whatever changed before the session opens goes with it
            if self._pending_session is not None:
                self._session, self._pending_session = self._pending_session, None
            session = self._session
            self._params.update(self._pending_params)
            self._pending_params.clear()
            params = self._params | dict(session.transport_params)
        try:
            client = EngineClient(
                session.address, transport=session.transport, width=session.width, height=session.height,
                model=session.model, timeout_s=REQUEST_TIMEOUT_S, **params,
            )
            client.open()
        except TimeoutError:
            self._set(state="unreachable")
            self._set_error(f"no engine answers at {session.address}: start one (Start local engine) "
                            "or check the engine address")
            return None
        except RemoteError as error:
            self._set(state="refused")
            self._set_error(f"the engine refused the session: {error.message}")
            return None
        except Exception as error:  # a bad setting, shared memory full, ...
            self._set(state="refused")
            self._set_error(f"cannot open a session: {error}")
            return None
        with self._lock:
            self._state = client.state
            self._last_error_message = ""  # from now on the same error is news again
        log.info("session open on the engine at %s (%s, %dx%d)", session.address, session.transport,
                 session.width, session.height)
        return client

    def _stream(self, client: EngineClient) -> None:
        next_stats = time.monotonic()
        size = (client.height, client.width)
        while not self._stopping.is_set():
            if self._settled(self._pending_session is not None):
                return  # to open a session with the new configuration
            frame = self._take_frame(POLL_S)
            if frame is not None and frame[0].shape[:2] == size:  # not one captured for another session's size
                client.send(*frame)
                with self._lock:
                    self._frames_sent += 1
            output = client.receive(0)
            if output is not None:
                self._shown(output)
            self._send_settled_params(client)
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + STATS_EVERY_S
                self._refresh_stats(client)
            if client.state == "error":  # the engine ended the session (a failed step); open a new one
                reason = client.error.message if client.error is not None else "no reason given"
                self._set_error(f"the engine ended the session: {reason}")
                return

    def _take_frame(self, timeout_s: float) -> tuple[np.ndarray, int] | None:
        with self._frame_ready:
            if self._frame is None and not self._stopping.is_set():
                self._frame_ready.wait(timeout_s)
            frame, self._frame = self._frame, None
            return frame

    def _shown(self, output: Output) -> None:
        try:
            self._show(output.pixels)
        except Exception as error:  # OBS refused the frame; the stream goes on
            self._set_error(f"cannot show a stylised frame: {error}")
            return
        with self._lock:
            self._frames_shown += 1
            self._arrivals.append((time.monotonic(), output.latency_ms))
            self._state = "streaming"

    def _settled(self, pending: bool) -> bool:
        """Whether a pending change has been still for DEBOUNCE_S."""
        with self._lock:
            return pending and time.monotonic() - self._changed_at >= DEBOUNCE_S

    def _send_settled_params(self, client: EngineClient) -> None:
        if not self._settled(bool(self._pending_params)):
            return
        with self._lock:
            params, self._pending_params = self._pending_params, {}
        try:
            reply = client.set(**params)
        except RemoteError as error:
            self._set_error(f"the engine refused {error.field or 'a parameter'}: {error.message}")
            return
        except TimeoutError:  # the engine went away: sent again (or with a new session) once it is back
            with self._lock:
                self._pending_params = params | self._pending_params
            return
        with self._lock:
            self._params.update(params)  # for a session opened later with another configuration
        if reply.get("restarts"):
            self._set(notice=f"{', '.join(sorted(params))} changed: the engine restarted the stream")

    def _refresh_stats(self, client: EngineClient) -> None:
        with self._lock:
            self._not_sent, self._outputs_skipped = client.counters.not_sent, client.counters.skipped
            was_disconnected = self._state == "disconnected"
        if client.state == "disconnected":
            if not was_disconnected:
                self._set_error(f"the engine at {client.address} stopped answering; reconnecting")
            self._set(state="disconnected")
            with self._lock:
                self._scheduler = "no session"
            return
        try:
            stats = client.stats()
        except (TimeoutError, ConnectionError, RemoteError):
            self._set(state=client.state)
            return
        with self._lock:
            self._state = stats["state"]
            self._dropped_by_engine = stats["frames_dropped"] + stats["outputs_dropped"]
            self._scheduler = describe_scheduler(stats)

    def _set(self, *, state: str | None = None, notice: str | None = None) -> None:
        with self._lock:
            if state is not None:
                self._state = state
            if notice is not None:
                self._notice = notice

    def _set_error(self, message: str) -> None:
        """Record (and log) an error; the same one again, as each retry meets it, keeps its first time."""
        with self._lock:
            if message == self._last_error_message:
                return
            self._last_error_message = message
            self._last_error = f"{time.strftime('%H:%M:%S')} {message}"
        log.warning("%s", message)
