"""EngineLink: the component's session on the engine, tended on a thread of its own.

EngineClient waits: for the engine to answer a hello, a parameter change or a stats
request, up to its timeout when the engine is busy, stalled or gone. TouchDesigner's
cook must never wait, so the client lives on this thread and the cook only swaps
arrays with it:

    post_frame(pixels, t)   the newest input (TouchDesigner's float RGBA, rows bottom to
                            top); one the thread has not sent yet is replaced (latest wins)
    take_picture()          the newest output not taken yet, ready for copyNumpyArray
    update_params(params)   parameter changes, sent between frames
    status(), take_notes()  state and counters for the Status page, lines for the log

The thread opens the session once the first frame shows its size, and opens a new one
when the size changes. It converts frames both ways, flipping rows on the way: the
engine's frames start at the top row, TouchDesigner's at the bottom. EngineClient
itself notices an engine going away and opens a new session when one answers again at
the same address.

Runs inside TouchDesigner: standard library, numpy and the project's bridge only.
"""

# No `from __future__ import annotations` here: with it, dataclasses look their module up in
# sys.modules, and a module TouchDesigner makes from a DAT need not be there.
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from bridge.client import EngineClient, describe_scheduler
from bridge.protocol import DEFAULT_PARAMS, ProtocolError
from bridge.zmq_io import RemoteError

REQUEST_TIMEOUT_S = 2.0  # how long the thread waits for the engine to answer one request
RETRY_S = 1.0  # between attempts to reach an engine that does not answer
REFUSED_RETRY_S = 5.0  # between hellos to an engine that refuses the session
RECEIVE_WAIT_S = 0.005  # the thread's wait for an output between looks at its inbox
STATS_EVERY_S = 1.0
RATE_WINDOW_S = 2.0  # output FPS and latency are averaged over this many seconds of outputs
MAX_NOTES = 100

MESSAGES = {
    "loading": "the engine is loading its model",
    "starting": "warming up: the first frames take a moment",
    "ready": "warming up: the first frames take a moment",
    "streaming": "",
}


@dataclass(frozen=True)
class LinkStatus:
    state: str  # waiting for input, connecting, or the session's: loading, starting, ready, streaming, error, disconnected
    message: str  # what is going on when it is not streaming, and what to do
    output_fps: float
    latency_ms: float  # glass to glass: from the input frame's cook to its output's arrival
    dropped_frames: int  # inputs never stylised: replaced before sending, or dropped by the engine as stale
    first_frame_ms: float | None  # from the session's first frame sent to its first output
    engine_params: dict  # the session's parameters as the engine last reported them
    scheduler: str = ""  # how the engine's scheduler serves the session (bridge.client.describe_scheduler)


def engine_frame(pixels: np.ndarray) -> np.ndarray:
    """TouchDesigner pixels (float, 0 to 1, rows bottom to top, 1 to 4 channels) as the
    engine takes them: uint8 RGB or RGBA, rows top to bottom."""
    rows_down = pixels[::-1]
    if rows_down.shape[2] < 3:  # a mono TOP: grey
        rows_down = np.repeat(rows_down[..., :1], 3, axis=2)
    return (np.clip(rows_down, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def td_picture(pixels: np.ndarray) -> np.ndarray:
    """An engine output (uint8, rows top to bottom) as copyNumpyArray takes it: rows bottom to top."""
    return np.ascontiguousarray(pixels[::-1])


class EngineLink:
    """A session on the engine at address, for frames of whatever size the first frame has.

    params are the session's parameters by their engine names; labels name them for
    messages; defaults are the values a parameter the engine lacks may be left at
    without a word (it is not asked for).
    """

    def __init__(self, address: str, *, model: str, params: dict[str, Any], labels: dict[str, str],
                 defaults: dict[str, Any]):
        self.address = address
        self._model = model
        self._labels = labels
        self._defaults = defaults
        self._lock = threading.Lock()
        self._frame_posted = threading.Event()
        self._stopping = threading.Event()
        # Shared with the thread, under _lock:
        self._input: tuple[np.ndarray, int] | None = None  # posted, not sent yet
        self._picture: np.ndarray | None = None  # received (rows bottom to top), not taken yet
        self._pending: dict[str, Any] = {}  # changed, not sent yet
        self._notes: deque[str] = deque(maxlen=MAX_NOTES)
        self._status = LinkStatus("connecting", f"connecting to the engine at {address}", 0.0, 0.0, 0, None, {})
        self._replaced = 0  # inputs replaced by a newer one before the thread sent them
        # The thread's own:
        self._params = dict(params)  # every value the session should have
        self._schema: dict[str, dict] = {}  # the engine's parameter table
        self._outputs: deque[tuple[float, float]] = deque()  # (arrival, latency_ms) within RATE_WINDOW_S
        self._engine_dropped = 0
        self._engine_params: dict = {}
        self._scheduler = ""
        self._first_sent_at: float | None = None
        self._first_frame_ms: float | None = None
        self._session: str | None = None
        self._next_stats = 0.0
        self._thread = threading.Thread(target=self._run, name="engine-link", daemon=True)
        self._thread.start()

    # -- TouchDesigner's side: none of these waits ----------------------------------------
    def post_frame(self, pixels: np.ndarray, t_capture_ns: int) -> None:
        """Hand over the newest input; the link owns pixels from now on."""
        with self._lock:
            if self._input is not None:
                self._replaced += 1
            self._input = (pixels, t_capture_ns)
        self._frame_posted.set()

    def take_picture(self) -> np.ndarray | None:
        """The newest output not taken yet: uint8 [height, width, 3 or 4], rows bottom to top."""
        with self._lock:
            picture, self._picture = self._picture, None
        return picture

    def update_params(self, params: dict[str, Any]) -> None:
        with self._lock:
            self._pending.update(params)

    def status(self) -> LinkStatus:
        with self._lock:
            return self._status

    def take_notes(self) -> list[str]:
        with self._lock:
            notes = list(self._notes)
            self._notes.clear()
        return notes

    def close(self, wait_s: float = 0.0) -> None:
        """Stop the thread, which then closes the session; wait_s bounds the wait for that."""
        self._stopping.set()
        self._frame_posted.set()
        if wait_s:
            self._thread.join(wait_s)

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        client = None
        while not self._stopping.is_set():
            try:
                if client is None:
                    client = self._open_session()
                elif not self._serve(client):
                    client = self._close(client)  # a new size: the next round opens a new session
            except Exception as error:  # noqa: BLE001 - a dead thread would freeze the picture without a word
                self._set_status("error", f"the link to the engine failed ({type(error).__name__}: {error}); "
                                          "press Restart")
                self._note(f"the link to the engine failed: {type(error).__name__}: {error}")
                client = self._close(client)
                self._stopping.wait(REFUSED_RETRY_S)
        self._close(client)

    def _open_session(self) -> EngineClient | None:
        with self._lock:
            frame = self._input
        if frame is None:
            self._set_status("waiting for input", "connect a TOP to the component's input")
            self._frame_posted.wait(0.1)
            self._frame_posted.clear()
            return None
        height, width = frame[0].shape[:2]
        with self._lock:  # changes made before the session opens go into its hello
            self._params.update(self._pending)
            self._pending.clear()
        hello_params = {name: value for name, value in self._params.items() if name in DEFAULT_PARAMS}
        client = EngineClient(self.address, transport="shm", width=width, height=height, model=self._model,
                              timeout_s=REQUEST_TIMEOUT_S, **hello_params)
        try:
            client.open()
        except TimeoutError:
            self._set_status("connecting", f"no engine answers at {self.address} yet; start one there, or set "
                                           "Engine to 'Start an engine here'")
            self._stopping.wait(RETRY_S)
            return None
        except (RemoteError, ProtocolError, OSError) as error:
            self._set_status("error", f"the engine at {self.address} refused the session: {error}")
            self._note(f"the engine refused the session: {error}")
            self._stopping.wait(REFUSED_RETRY_S)
            return None
        self._schema = client.info.get("schema", {})
        self._start_session(client)
        self._note(f"session {client.session} open: {width}x{height} frames, model {client.info.get('model')}")
        others = {name: value for name, value in self._params.items() if name not in DEFAULT_PARAMS}
        self._send_params(client, others, asked=False)
        return client

    def _serve(self, client: EngineClient) -> bool:
        """One round: send the newest input, apply parameter changes, take an output, now
        and then the stats. False when the input's size needs a new session."""
        with self._lock:
            frame, self._input = self._input, None
            changes, self._pending = self._pending, {}
        if frame is not None:
            pixels, t_capture_ns = frame
            if pixels.shape[:2] != (client.height, client.width):
                with self._lock:
                    self._input = self._input or frame  # it opens the next session
                self._note(f"the input is now {pixels.shape[1]}x{pixels.shape[0]}: opening a new session")
                return False
            client.send(engine_frame(pixels), t_capture_ns)
            if self._first_sent_at is None and client.session is not None:
                self._first_sent_at = time.monotonic()
        if changes:
            self._params.update(changes)
            self._send_params(client, changes, asked=True)
        output = client.receive(RECEIVE_WAIT_S)
        if client.session != self._session:
            self._start_session(client)
            if client.session is not None:
                self._note(f"session {client.session} open (the engine came back)")
        now = time.monotonic()
        if output is not None:
            self._count_output(output.latency_ms, now)
            with self._lock:
                self._picture = td_picture(output.pixels)
        if now >= self._next_stats:
            self._next_stats = now + STATS_EVERY_S
            self._read_stats(client)
        self._report(client, now)
        return True

    def _send_params(self, client: EngineClient, params: dict[str, Any], asked: bool) -> None:
        """Send what the engine's parameter table has; say which parameters it lacks (for
        those not asked for, only when they are away from their default)."""
        known = {name: value for name, value in params.items() if name in self._schema}
        lacking = [name for name, value in params.items()
                   if name not in known and (asked or value != self._defaults.get(name))]
        if lacking:
            self._note(f"this engine does not take {self._names(lacking)} yet; left as the engine has it")
        if not known:
            return
        try:
            reply = client.set(**known)
        except RemoteError as error:
            self._note(f"the engine refused {error.field or 'the change'}: {error.message}")
            return
        except TimeoutError:
            with self._lock:  # unanswered: maybe applied, maybe not; sent again with the next change
                self._pending = {**known, **self._pending}
            return
        if reply.get("restarts"):
            restarting = [name for name in known if self._schema[name].get("applies") == "reload"]
            self._note(f"{self._names(restarting) or 'A change'} changed: the stream restarts (the last frame "
                       "stays meanwhile)")
            self._first_sent_at = self._first_frame_ms = None

    def _start_session(self, client: EngineClient) -> None:
        self._session = client.session
        self._first_sent_at = self._first_frame_ms = None
        self._engine_dropped = 0
        self._engine_params = {}
        self._scheduler = ""

    def _count_output(self, latency_ms: float, now: float) -> None:
        if self._first_frame_ms is None and self._first_sent_at is not None:
            self._first_frame_ms = (now - self._first_sent_at) * 1000.0
        self._outputs.append((now, latency_ms))

    def _read_stats(self, client: EngineClient) -> None:
        try:
            stats = client.stats()
        except (ConnectionError, TimeoutError, RemoteError):
            return  # no session, or the engine is not answering: state and message say so
        self._engine_dropped = stats["frames_dropped"]
        self._engine_params = stats["params"]
        self._scheduler = describe_scheduler(stats)

    def _report(self, client: EngineClient, now: float) -> None:
        while self._outputs and now - self._outputs[0][0] > RATE_WINDOW_S:
            self._outputs.popleft()
        outputs = list(self._outputs)
        fps = (len(outputs) - 1) / (outputs[-1][0] - outputs[0][0]) if len(outputs) > 1 else 0.0
        latency = sum(latency for _, latency in outputs) / len(outputs) if outputs else 0.0
        state = client.state
        if state == "disconnected":
            message = (f"the engine at {self.address} stopped answering; the last frame stays until it is back "
                       "(see the log)")
        elif state == "error":
            reason = client.error.message if client.error is not None else "the engine ended the session"
            message = f"{reason}; press Restart"
        else:
            message = MESSAGES.get(state, state)
        with self._lock:
            self._status = LinkStatus(state, message, fps, latency, self._replaced + self._engine_dropped,
                                      self._first_frame_ms, self._engine_params, self._scheduler)

    def _set_status(self, state: str, message: str) -> None:
        with self._lock:
            old = self._status
            self._status = LinkStatus(state, message, 0.0, 0.0, old.dropped_frames, None, {})

    def _note(self, line: str) -> None:
        with self._lock:
            self._notes.append(line)

    def _names(self, names: list[str]) -> str:
        return ", ".join(self._labels.get(name, name) for name in names)

    def _close(self, client: EngineClient | None) -> None:
        """Close the session, if any; returns None, for `client = self._close(client)`."""
        if client is not None:
            client.close()  # says bye (briefly waiting, here on the thread) and frees its rings
        self._session = None
        return None
