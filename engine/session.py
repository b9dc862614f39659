"""A session: one host's stream inside the engine, and the parameters it takes.

The IO thread (engine/server.py) and the worker (engine/worker.py) meet here. The IO
thread puts received frames into the session's inbox and sends what the worker leaves
in its outbox; the worker takes a chunk of frames from the inbox, runs it through the
session's pipeline, and leaves the finished frames in the outbox, each with the `seq`
and `t_capture_ns` of the input frame it came from. Everything the two threads share
is guarded by the session's lock; the pipeline itself belongs to the worker alone.

Both boxes are bounded and latest wins. The inbox holds at most the frames the next
chunk needs: a frame arriving when it is full pushes out the oldest, so a session
whose frames come faster than its steps run loses stale frames rather than falling
behind. The outbox holds one chunk's finished frames, released at the cadence their
inputs were captured (a host showing the newest frame sees every one, not one in
four); a frame the host has no room for yet waits there, and a newer chunk replaces
frames still waiting.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

from bridge.protocol import DEFAULT_PARAMS, ErrorCode, ProtocolError, ValueSpec
from bridge.shm import RingReader, RingWriter

from .flow import PUBLISHED_STEPS
from .pipeline import LIVE_SETTINGS, StreamSettings

# What a session reports to its host, in the order a healthy session goes through them.
STATES = ("starting", "loading", "ready", "streaming", "error")

MAX_MODEL_SIZE = 2048
# Frames of one chunk are released at most this far apart, whatever their capture times say.
MAX_FRAME_SPACING_NS = 1_000_000_000

# The parameters a session takes: the protocol's table with the engine's bounds, and
# the size the model works at (a multiple of 16; frames are fitted to it and back).
PARAMS: Mapping[str, ValueSpec] = {
    **DEFAULT_PARAMS,
    "steps": ValueSpec(int, 1, len(PUBLISHED_STEPS)),
    "model_width": ValueSpec(int, 16, MAX_MODEL_SIZE),
    "model_height": ValueSpec(int, 16, MAX_MODEL_SIZE),
    "low_latency_start": ValueSpec(bool),
}
# Targets for the scheduler, not settings of the pipeline. They are recorded and reported
# in stats; the round-robin scheduler does not act on them yet.
TARGETS = ("target_fps", "latency_ms")
# Protocol names of StreamSettings fields, where the two differ.
_SETTING_FIELDS = {"model_width": "width", "model_height": "height"}


def applies(name: str) -> str:
    """'live' for a parameter applied at the next step, 'reload' for one that restarts the stream."""
    return "live" if name in TARGETS or _SETTING_FIELDS.get(name, name) in LIVE_SETTINGS else "reload"


def params_schema() -> dict[str, dict]:
    """The parameter table as plain data for hosts: each entry's type, bounds and whether it is live."""
    return {name: {**spec.describe(), "applies": applies(name)} for name, spec in PARAMS.items()}


def apply_params(
    settings: StreamSettings, targets: Mapping[str, float], params: Mapping[str, Any]
) -> tuple[StreamSettings, dict[str, float]]:
    """New (settings, targets) with params (already checked against PARAMS) applied.

    Raises ProtocolError naming the parameter when the pipeline refuses a value
    (a model size that is not a multiple of 16, a strength of 0).
    """
    targets = dict(targets)
    for name, value in params.items():
        if name in TARGETS:
            targets[name] = value
            continue
        try:
            settings = replace(settings, **{_SETTING_FIELDS.get(name, name): value})
        except ValueError as error:
            raise ProtocolError(ErrorCode.BAD_VALUE, f"params.{name}", str(error)) from None
    return settings, targets


def current_params(settings: StreamSettings, targets: Mapping[str, float]) -> dict[str, Any]:
    """A session's parameters by their protocol names."""
    values = {name: getattr(settings, _SETTING_FIELDS.get(name, name)) for name in PARAMS if name not in TARGETS}
    return {**values, **targets}


# ------------------------------------------------------------------------ frames


@dataclass(frozen=True)
class InputFrame:
    rgb: np.ndarray  # [height, width, 3] uint8, red first (may be a view of the received pixels)
    format: str  # the host's pixel format; the output of this frame goes back in it
    seq: int
    t_capture_ns: int


@dataclass(frozen=True)
class OutputFrame:
    pixels: np.ndarray  # [height, width, channels] uint8 in `format`
    format: str
    seq: int
    t_capture_ns: int
    due_ns: int  # time.monotonic_ns() from which it may be sent


def to_rgb(pixels: np.ndarray, format: str) -> np.ndarray:
    """A no-copy [h, w, 3] RGB view of [h, w, c] pixels in a protocol format."""
    return pixels[..., 2::-1] if format == "bgra8" else pixels[..., :3]


def from_rgb(rgb: np.ndarray, format: str) -> np.ndarray:
    """[h, w, 3] RGB as [h, w, c] pixels in a protocol format (opaque alpha)."""
    if format == "rgb8":
        return rgb
    pixels = np.empty((*rgb.shape[:2], 4), np.uint8)
    pixels[..., :3] = rgb[..., ::-1] if format == "bgra8" else rgb
    pixels[..., 3] = 255
    return pixels


def paced_outputs(inputs: list[InputFrame], rgb: np.ndarray, now_ns: int) -> list[OutputFrame]:
    """The finished frames of a chunk, due at the spacing their inputs were captured at."""
    outputs, due = [], now_ns
    for index, (frame, pixels) in enumerate(zip(inputs, rgb)):
        if index:
            spacing = frame.t_capture_ns - inputs[index - 1].t_capture_ns
            due += min(max(spacing, 0), MAX_FRAME_SPACING_NS)
        outputs.append(OutputFrame(from_rgb(pixels, frame.format), frame.format, frame.seq, frame.t_capture_ns, due))
    return outputs


# ---------------------------------------------------------------------- session


class Session:
    """One host's stream. Made by the IO thread on hello; see the module doc for who does what."""

    def __init__(
        self,
        id: str,
        owner: bytes,
        transport: str,
        width: int,
        height: int,
        settings: StreamSettings,
        targets: Mapping[str, float],
        state: str,
    ):
        self.id = id
        self.owner = owner  # the host's identity on the engine's ZeroMQ socket
        self.transport = transport
        self.width, self.height = width, height  # of the host's frames, fixed for the session's life
        self.lock = threading.Lock()
        # Changed under lock (single reads need none):
        self.settings = settings  # as the host last set them
        self.targets = dict(targets)
        self.state = state
        self.failure: str | None = None  # why the worker gave up on the session
        self.closed = False
        self._pending: dict[str, Any] = {}  # StreamSettings changes the worker has not applied yet
        self._frames_needed = settings.first_chunk_frames  # by the next chunk
        self._inbox: deque[InputFrame] = deque()
        self._outbox: deque[OutputFrame] = deque()
        self._frames_in = self._frames_dropped = self._frames_processed = 0
        self._frames_out = self._outputs_dropped = 0
        self._steps, self._step_seconds = 0, 0.0
        # Owned by the IO thread:
        self.input_ring: RingReader | None = None
        self.output_ring: RingWriter | None = None
        self.bad_ring_generation = 0  # input ring generation already reported as the wrong size
        self.opened_at = time.monotonic()

    # -- IO thread ---------------------------------------------------------------
    def put(self, frame: InputFrame, dropped_before: int = 0) -> bool:
        """Add a received frame (dropped_before: stale ones the transport discarded).
        Returns whether the next chunk is now complete."""
        with self.lock:
            if self.closed:
                return False
            self._frames_dropped += dropped_before
            while len(self._inbox) >= self._frames_needed:
                self._inbox.popleft()
                self._frames_dropped += 1
            self._inbox.append(frame)
            self._frames_in += 1
            return len(self._inbox) >= self._frames_needed

    def change(self, settings: StreamSettings, targets: Mapping[str, float]) -> bool:
        """Take new parameters; the worker applies them between steps. Returns whether
        the stream restarts for them (a reload parameter changed)."""
        with self.lock:
            changed = {
                field: getattr(settings, field)
                for field in StreamSettings.__dataclass_fields__
                if getattr(settings, field) != getattr(self.settings, field)
            }
            restarts = any(field not in LIVE_SETTINGS for field in changed)
            self._pending.update(changed)
            self.settings, self.targets = settings, dict(targets)
            return restarts

    def due_output(self, now_ns: int) -> OutputFrame | None:
        """The oldest finished frame that is due, left in the outbox until output_sent."""
        with self.lock:
            return self._outbox[0] if self._outbox and self._outbox[0].due_ns <= now_ns else None

    def output_sent(self, output: OutputFrame) -> None:
        with self.lock:
            self._frames_out += 1
            if self._outbox and self._outbox[0] is output:  # unless a newer chunk replaced it meanwhile
                self._outbox.popleft()

    def close(self) -> None:
        """Stop taking frames and drop what is queued; the worker frees the pipeline."""
        with self.lock:
            self.closed = True
            self._inbox.clear()
            self._outbox.clear()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            ring_skipped = self.input_ring.skipped if self.input_ring is not None else 0
            return {
                "session": self.id,
                "state": self.state,
                "transport": self.transport,
                "width": self.width,
                "height": self.height,
                "params": current_params(self.settings, self.targets),
                "lag_frames": self.settings.lag_frames,
                "first_chunk_frames": self.settings.first_chunk_frames,
                "frames_in": self._frames_in,  # received into the inbox
                "frames_dropped": self._frames_dropped + ring_skipped,  # stale frames discarded before a step
                "frames_processed": self._frames_processed,  # taken into steps
                "next_chunk_frames": self._frames_needed,  # how many frames the next step takes
                "frames_out": self._frames_out,  # finished frames sent back
                "outputs_dropped": self._outputs_dropped,  # finished frames replaced by newer ones before sending
                "steps": self._steps,
                "step_ms": 1000 * self._step_seconds / self._steps if self._steps else None,
                "uptime_s": time.monotonic() - self.opened_at,
            }

    # -- worker --------------------------------------------------------------------
    def is_active(self) -> bool:
        """Neither closed nor failed."""
        with self.lock:
            return not self.closed and self.failure is None

    def has_work(self) -> bool:
        """Parameters to apply, or a complete chunk."""
        with self.lock:
            active = not self.closed and self.failure is None
            return active and (bool(self._pending) or len(self._inbox) >= self._frames_needed)

    def take_pending(self) -> dict[str, Any]:
        with self.lock:
            pending, self._pending = self._pending, {}
            return pending

    def expect_frames(self, frames_needed: int) -> None:
        """Set how many frames the next chunk takes (the pipeline says, after each step
        and restart); frames beyond that, the oldest, are dropped."""
        with self.lock:
            self._frames_needed = frames_needed
            while len(self._inbox) > frames_needed:
                self._inbox.popleft()
                self._frames_dropped += 1

    def take_chunk(self, frames_after: int) -> list[InputFrame] | None:
        """The next chunk's frames, or None until enough have come. frames_after is how
        many the chunk after it takes, set now so that frames arriving during the step
        are kept for it."""
        with self.lock:
            if len(self._inbox) < self._frames_needed:
                return None
            chunk = list(self._inbox)
            self._inbox.clear()
            self._frames_processed += len(chunk)
            self._frames_needed = frames_after
            return chunk

    def set_state(self, state: str) -> None:
        with self.lock:
            if self.state != "error":
                self.state = state

    def add_outputs(self, outputs: list[OutputFrame], step_seconds: float) -> None:
        """Record a step; its finished frames (if any) replace frames still waiting."""
        with self.lock:
            self._steps += 1
            self._step_seconds += step_seconds
            if outputs and not self.closed:
                self._outputs_dropped += len(self._outbox)
                self._outbox.clear()
                self._outbox.extend(outputs)
                self.state = "streaming"

    def fail(self, message: str) -> None:
        with self.lock:
            self.failure = message
            self.state = "error"
            self._inbox.clear()
            self._outbox.clear()
