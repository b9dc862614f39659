"""A fake bridge.client.EngineClient, and the engine behind it, for unit tests of bridge/background.py
and obs_scripts/.

It behaves as bridge/client.py documents EngineClient:
- EngineClient(address, *, transport, width, height, model, timeout_s, **params):
  transport is "shm", "zmq" or "spout" (anything else is a ValueError); the prompt is
  one of the params. A spout session's frames go through Spout, not the client: send()
  raises RuntimeError and receive() returns None.
- open() raises TimeoutError when no engine answers at the address, and RemoteError
  when the engine refuses the session (code unknown_param, field params.NAME, for a
  parameter it does not have; model_unavailable for a model other than the one it
  serves or "default"); close() may be called twice. info then holds the model the
  engine serves as "model" and its parameter table as "schema": bridge/params.py's,
  less the parameters an older engine lacks (each parameter's "applies").
- send(frame, t_capture_ns) never blocks; the frame must be uint8 [height, width, 3|4].
  While there is no session the frame is dropped.
- receive(timeout) returns the newest finished frame not returned yet, as an Output
  echoing its input's seq and t_capture_ns, or None.
- set(**params) returns {"params", "restarts"}, restarts when a reload parameter
  (steps, low_latency_start) changed; it raises RemoteError naming a parameter the engine refuses (an
  unknown one, or a strength outside 0.1 to 1), and
  TimeoutError when the engine does not answer. While there is no session the
  parameters are kept for the next one and {} is returned.
- stats() returns the session's state, parameters and counters; ConnectionError without a session.
- counters (a FrameCounters) says where frames went: sent, not_sent (dropped here,
  with no session), received, skipped.
- state is the session's state, "disconnected" once the engine stopped answering,
  "error" once the engine ended the session (error then says why). A client whose
  engine answers again opens a new session with the same parameters by itself.

The engine here "stylises" a frame by inverting its colours, and finishes it at once.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from bridge.client import FrameCounters, Output
from bridge.params import PARAMS, RELOAD
from bridge.zmq_io import RemoteError


@dataclass
class FakeEngine:
    """An engine process at an address: it can be down, refuse sessions, or end one."""

    address: str
    model: str = "tiny"  # the model it serves, as the real engines of the tests do
    lacking: frozenset = frozenset()  # parameters of the table this (older) engine does not take
    running: bool = True
    refuse: str | None = None  # the message a refused hello gets
    sessions_opened: int = 0
    sessions_closed: int = 0
    hellos: list[dict] = field(default_factory=list)  # what each session was opened with
    params_received: list[dict] = field(default_factory=list)  # each set() call's parameters
    frames_received: list[np.ndarray] = field(default_factory=list)
    failed_sessions: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        ENGINES[self.address] = self

    @property
    def schema(self) -> dict[str, dict]:
        return {name: {"applies": param.applies} for name, param in PARAMS.items() if name not in self.lacking}

    def kill(self) -> None:
        self.running = False

    def start(self) -> None:
        self.running = True

    def fail_session(self, session: str) -> None:
        """A step failed: the engine ends the session and says so."""
        self.failed_sessions.add(session)

    def wait_for(self, predicate, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError("the fake engine did not see what the test waited for")
            time.sleep(0.005)


ENGINES: dict[str, FakeEngine] = {}
_session_ids = itertools.count(1)


class FakeEngineClient:
    def __init__(self, address, *, transport="shm", width, height, model="default", timeout_s=5.0, **params):
        if transport not in ("shm", "zmq", "spout"):
            raise ValueError(f"transport must be one of shm, zmq, spout, got {transport!r}")
        self.address, self.transport, self.width, self.height, self.model = address, transport, width, height, model
        self.params = dict(params)
        self.session: str | None = None
        self.info: dict = {}
        self.error: RemoteError | None = None
        self._state = "closed"
        self._newest: Output | None = None
        self._seq = itertools.count()
        self.counters = FrameCounters()

    # -- lifecycle
    def open(self):
        engine = ENGINES.get(self.address)
        if engine is None or not engine.running:
            raise TimeoutError(f"no reply from the engine at {self.address} within 2 s")
        if engine.refuse:
            raise RemoteError("model_unavailable", "model", engine.refuse)
        if self.model not in (engine.model, "default"):
            raise RemoteError("model_unavailable", "model",
                              f"this engine serves {engine.model!r}, not {self.model!r}; ask for 'default', or "
                              f"start an engine with python -m engine serve --model {self.model}")
        unknown = sorted(set(self.params) - set(engine.schema))
        if unknown:
            raise RemoteError("unknown_param", f"params.{unknown[0]}", f"unknown parameter {unknown[0]!r}")
        self._open_session(engine)
        return self

    def close(self):
        engine = ENGINES.get(self.address)
        if self.session is not None and engine is not None and engine.running:
            engine.sessions_closed += 1
        self.session, self._state = None, "closed"

    @property
    def state(self) -> str:
        return self._state

    # -- frames
    def send(self, frame, t_capture_ns=None, *, format=None) -> int:
        if self.transport == "spout":
            raise RuntimeError("a spout session's frames come from the Spout sender named by spout_input")
        if frame.dtype != np.uint8 or frame.shape[:2] != (self.height, self.width) or frame.shape[2] not in (3, 4):
            raise ValueError(f"frame must be uint8 ({self.height}, {self.width}, 3|4), got {frame.shape}")
        seq = next(self._seq)
        self.counters.sent += 1
        engine = self._tend()
        if engine is None:
            self.counters.not_sent += 1
            return seq
        with engine.lock:
            engine.frames_received.append(frame.copy())
        stylised = frame.copy()
        stylised[..., :3] = 255 - frame[..., :3]
        t_capture_ns = time.monotonic_ns() if t_capture_ns is None else t_capture_ns
        self._newest = Output(stylised, seq, t_capture_ns, (time.monotonic_ns() - t_capture_ns) / 1e6)
        self._state = "streaming"
        return seq

    def receive(self, timeout=0.0):
        self._tend()
        output, self._newest = self._newest, None
        if output is not None:
            self.counters.received += 1
        return output

    # -- control
    def set(self, **params):
        engine = ENGINES.get(self.address)
        if self.session is None:
            self.params.update(params)
            return {}
        if engine is None or not engine.running:
            raise TimeoutError(f"no reply from the engine at {self.address} within 2 s")
        unknown = set(params) - set(engine.schema)
        if unknown:
            name = sorted(unknown)[0]
            raise RemoteError("unknown_param", f"params.{name}", f"unknown parameter {name!r}")
        if not 0.1 <= params.get("strength", 0.5) <= 1.0:
            raise RemoteError("bad_value", "params.strength", "params.strength must be from 0.1 to 1")
        with engine.lock:
            engine.params_received.append(dict(params))
        self.params.update(params)
        return {"params": dict(self.params), "restarts": any(PARAMS[name].applies == RELOAD for name in params),
                "lag_frames": 0, "first_chunk_frames": 1}

    def stats(self):
        self._tend()
        if self.session is None:
            raise ConnectionError(f"no session: the engine at {self.address} is {self._state}")
        return {"state": self._state, "params": dict(self.params), "frames_dropped": 3, "outputs_dropped": 1,
                "scheduler": {"stream_batch": False, "chunk_frames": 4, "spare_frames": 2, "frame_rate_cap": None,
                              "predicted_step_ms": 120.0, "predicted_latency_ms": 410.0, "state": "meeting targets"}}

    # -- the connection, tended on every call as EngineClient does
    def _tend(self) -> FakeEngine | None:
        """The engine, when this client has a session on it now."""
        engine = ENGINES.get(self.address)
        alive = engine is not None and engine.running
        if self.session is not None and not alive:
            self.session, self._state = None, "disconnected"
        elif self.session is None and self._state == "disconnected" and alive:
            self._open_session(engine)  # the engine is back: a new session, same parameters
        elif self.session is not None and self.session in engine.failed_sessions:
            self.error = RemoteError("session_failed", None, "out of memory in a step")
            self.session, self._state = None, "error"
        return engine if self.session is not None else None

    def _open_session(self, engine: FakeEngine) -> None:
        self.session = f"s{next(_session_ids)}"
        self._state = "ready"
        self.info = {"session": self.session, "model": engine.model, "lag_frames": 0, "schema": engine.schema}
        with engine.lock:
            engine.sessions_opened += 1
            engine.hellos.append({"session": self.session, "transport": self.transport, "width": self.width,
                                  "height": self.height, "model": self.model, "params": dict(self.params)})
