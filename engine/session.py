"""A session: one host's stream inside the engine, and the parameters it takes.

The IO thread (engine/server.py) and the worker's thread meet here. The IO thread puts
received frames into the session's inbox and sends what is left in its outbox; on the
worker's thread the scheduler (engine/scheduler.py) takes a chunk of frames from the
inbox for a step (``claim``), the worker runs it through the session's pipeline, and the
scheduler leaves the finished frames in the outbox (``record``), each with the `seq` and
`t_capture_ns` of the input frame it came from. Everything the two threads share is
guarded by the session's lock; the pipeline belongs to the worker alone.

Both boxes are bounded and latest wins. The inbox holds the frames the next chunk
needs and the start of the one after, and as many more (at most 8) as can still make
their deadline by the SLO policy's prediction (engine/slo.py's inbox_limit): a frame arriving
when it is full pushes out the oldest, so a session whose frames come faster than its
steps run loses stale frames rather than falling behind; when the SLO policy caps the
session's frame rate, frames beyond the cap are dropped on arrival. The outbox holds
one chunk's finished frames, released at the cadence their inputs were captured (a
host showing the newest frame sees every one, not one in four); a frame the host has
no room for yet waits there. When a newer chunk finishes, the newest frames still
waiting (up to as many as the new chunk brings) go out at once ahead of it, and any
older ones are dropped.

The session also keeps what the SLO policy plans with (input rate, waits for the
device) and what stats reports against the targets (time to first frame, output
frame rate, latency percentiles from capture to sending, deadline misses).

Besides its host, a session's frames can come from and go to other places, its
routes: a virtual camera (engine/camera.py) and, for transport "spout", a Spout
sender read and another published (engine/spout_io.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Mapping, Sequence

import numpy as np

from bridge import params as table
from bridge.params import LIVE, OPEN, RELOAD
from bridge.protocol import FORMATS, PARAM_SPECS, ErrorCode, ProtocolError, ValueSpec
from bridge.shm import RingReader, RingWriter

from .camera import SessionCamera
from .pipeline import LIVE_SETTINGS, StreamSettings
from .slo import (Choice, FrameRateGate, RateMeter, SessionLoad, WaitMeter,
                  excused_wait_start, inbox_limit, percentile)

# What a session reports to its host, in the order a healthy session goes through them.
STATES = ("starting", "loading", "ready", "streaming", "error")

# Frames of one chunk are released at most this far apart, whatever their capture times say.
MAX_FRAME_SPACING_NS = 1_000_000_000

# The parameters a session takes (bridge/params.py's table, checked as it says). Most
# are settings of its pipeline; these are not:
# targets for the SLO scheduler (engine/slo.py) ...
TARGETS = ("target_fps", "latency_ms")
# ... and routes, where frames come from and go besides the host. The Spout ones are a
# Spout session's only, and are fixed when it opens (engine/spout_io.py says why).
# NDI's and Syphon's likewise (engine/endpoints.py).
ENDPOINT_ROUTES = {"spout": ("spout_input", "spout_output"), "ndi": ("ndi_input", "ndi_output"),
                   "syphon": ("syphon_input", "syphon_output")}
ROUTES = ("virtualcam", *(name for names in ENDPOINT_ROUTES.values() for name in names))
SPOUT_ROUTES = ENDPOINT_ROUTES["spout"]
PARAMS: Mapping[str, ValueSpec] = PARAM_SPECS
LATENCY_SAMPLES = 1000  # latest outputs whose latency the percentiles in stats cover
OUTPUT_FPS_WINDOW_NS = 2_000_000_000  # output frame rate in stats: over the last two seconds ...
OUTPUT_FPS_SHORTEST_NS = 250_000_000  # ... or since the first output, once that is this long ago
# Protocol names of StreamSettings fields, where the two differ.
_SETTING_FIELDS = {"model_width": "width", "model_height": "height"}


def applies(name: str) -> str:
    """LIVE for a parameter applied at the next step, RELOAD for one that restarts the
    stream, OPEN for one a session takes only when it opens (in its hello)."""
    return table.PARAMS[name].applies


def session_routes(transport: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The routes a new session of this transport has, at the engine's defaults."""
    names = ("virtualcam", *ENDPOINT_ROUTES.get(transport, ()))
    return {name: defaults[name] for name in names}


def session_settings(values: Mapping[str, Any]) -> StreamSettings:
    """Stream settings from parameter values by their protocol names (targets and routes left out)."""
    return StreamSettings(**{_SETTING_FIELDS.get(name, name): value for name, value in values.items()
                             if name not in TARGETS and name not in ROUTES})


def apply_params(
    settings: StreamSettings, targets: Mapping[str, float], routes: Mapping[str, Any], params: Mapping[str, Any]
) -> tuple[StreamSettings, dict[str, float], dict[str, Any]]:
    """New (settings, targets, routes) with params (already checked against PARAMS) applied.

    Raises ProtocolError naming the parameter when the pipeline refuses a value
    (a model size that is not a multiple of 16, a strength of 0), or when it is a
    route the session does not have (spout_input on a session that is not Spout's).
    """
    targets, routes = dict(targets), dict(routes)
    for name, value in params.items():
        if name in TARGETS:
            targets[name] = value
            continue
        if name in ROUTES:
            if name not in routes:
                raise ProtocolError(ErrorCode.BAD_VALUE, f"params.{name}",
                                    f"{name} is for sessions with transport {name.split('_')[0]} only")
            routes[name] = value
            continue
        try:
            settings = replace(settings, **{_SETTING_FIELDS.get(name, name): value})
        except ValueError as error:
            raise ProtocolError(ErrorCode.BAD_VALUE, f"params.{name}", str(error)) from None
    return settings, targets, routes


def current_params(settings: StreamSettings, targets: Mapping[str, float], routes: Mapping[str, Any]
                   ) -> dict[str, Any]:
    """A session's parameters by their protocol names."""
    values = {name: getattr(settings, _SETTING_FIELDS.get(name, name))
              for name in PARAMS if name not in TARGETS and name not in ROUTES}
    stated_or_default = {name: targets.get(name, table.PARAMS[name].default) for name in TARGETS}
    return {**values, **stated_or_default, **routes}


# ------------------------------------------------------------------------ frames


@dataclass(frozen=True)
class InputFrame:
    rgb: np.ndarray  # [height, width, 3] uint8, red first (may be a view of the received pixels)
    format: str  # the host's pixel format; the output of this frame goes back in it
    seq: int
    t_capture_ns: int


@dataclass
class OutputFrame:
    """A finished frame, converted to its host's format only as it goes out: straight into
    a shared-memory session's output ring (write_pixels), or for ZeroMQ, Spout and the
    virtual camera into an array of its own (pixels)."""

    rgb: np.ndarray  # [height, width, 3] uint8, red first
    format: str  # the host's pixel format
    seq: int
    t_capture_ns: int
    due_ns: int  # time.monotonic_ns() from which it may be sent (brought forward under the session's lock)

    @cached_property
    def pixels(self) -> np.ndarray:
        """[height, width, channels] uint8 in `format`."""
        if self.format == "rgb8":
            return self.rgb
        pixels = np.empty((*self.rgb.shape[:2], FORMATS[self.format]), np.uint8)
        self.write_pixels(pixels)
        return pixels

    def write_pixels(self, out: np.ndarray) -> None:
        """Write the frame in `format` into out, [height, width, channels] uint8."""
        from_rgb(self.rgb, self.format, out)


def to_rgb(pixels: np.ndarray, format: str) -> np.ndarray:
    """A no-copy [h, w, 3] RGB view of [h, w, c] pixels in a protocol format."""
    return pixels[..., 2::-1] if format == "bgra8" else pixels[..., :3]


def from_rgb(rgb: np.ndarray, format: str, out: np.ndarray) -> None:
    """[h, w, 3] RGB into out, [h, w, c] pixels in a protocol format (opaque alpha). A channel
    at a time: numpy copies [h, w] planes several times faster than [h, w, 3] blocks."""
    for channel, source in enumerate((2, 1, 0) if format == "bgra8" else (0, 1, 2)):
        out[..., channel] = rgb[..., source]
    if out.shape[-1] == 4:
        out[..., 3] = 255


def paced_outputs(inputs: list[InputFrame], rgb: np.ndarray, now_ns: int) -> list[OutputFrame]:
    """The finished frames of a chunk, due at the spacing their inputs were captured at."""
    outputs, due = [], now_ns
    for index, (frame, pixels) in enumerate(zip(inputs, rgb)):
        if index:
            spacing = frame.t_capture_ns - inputs[index - 1].t_capture_ns
            due += min(max(spacing, 0), MAX_FRAME_SPACING_NS)
        outputs.append(OutputFrame(pixels, frame.format, frame.seq, frame.t_capture_ns, due))
    return outputs


@dataclass(frozen=True)
class Claim:
    """What the scheduler takes from a session for a step (engine/scheduler.py)."""

    choice: Choice | None = None  # the policy's: frame-rate cap and inbox room, and for stats
    changes: Mapping[str, Any] = field(default_factory=dict)  # the parameter changes it applies now
    stream_batch: bool | None = None  # the mode the stream runs in from this step
    returned: Sequence[InputFrame] = ()  # frames in flight in a stream that restarts: back to the inbox's front
    frames_needed: int | None = None  # frames the next chunk takes (None: as before)
    take_chunk: bool = False  # take that chunk now, if it is complete
    frames_after: int | None = None  # frames the chunk after it takes (None: as many)
    stale_before_ns: int | None = None  # frames captured before are dropped first, while a full chunk stays


# ---------------------------------------------------------------------- session


class Session:
    """One host's stream. Made by the IO thread on hello; see the module doc for who does what."""

    def __init__(
        self,
        id: str,
        owner: bytes | None,
        transport: str,
        width: int,
        height: int,
        settings: StreamSettings,
        targets: Mapping[str, float],
        routes: Mapping[str, Any],
        state: str,
    ):
        self.id = id
        self.owner = owner  # the host's identity on the engine's ZeroMQ socket; None for the engine's own session
        self.transport = transport
        self.width, self.height = width, height  # of the host's frames, fixed for the session's life
        self.lock = threading.Lock()
        # Changed under lock (single reads need none):
        self.settings = settings  # as the host last set them
        self.targets = dict(targets)  # only those stated: the policy treats a stated budget differently
        self.routes = dict(routes)
        self.state = state
        self.failure: str | None = None  # why the worker gave up on the session
        self.closed = False
        self._pending: dict[str, Any] = {}  # StreamSettings changes the worker has not applied yet
        self._frames_needed = settings.first_chunk_frames  # by the next chunk
        self._inbox: deque[InputFrame] = deque()
        self._outbox: deque[OutputFrame] = deque()
        self._frames_in = self._frames_dropped = self._frames_processed = 0
        self._frames_out = self._outputs_dropped = 0
        self._steps, self._steps_shared, self._step_seconds = 0, 0, 0.0
        # For the SLO scheduler and its stats:
        self._input_rate = RateMeter()  # of the frames as they arrive, before the rate cap
        self._rate_gate = FrameRateGate()
        self._frames_over_rate = 0  # dropped for the rate cap (also in _frames_dropped)
        self._dropped_stale = False  # since the scheduler last looked
        self._ready_since_ns: int | None = None  # when the inbox last held a complete chunk
        self._waits = WaitMeter()  # complete chunks' waits for the device
        self._had_output = False
        self._first_frame_ns: int | None = None  # arrival of the first frame
        self._first_output_ns: int | None = None
        self._time_to_first_frame_ns: int | None = None
        self._latencies_ms: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._sent_ns: deque[int] = deque()  # send times within the output frame-rate window
        self._deadline_misses = 0
        self._choice: Choice | None = None
        self._spare_frames = 0  # the scheduler's room in the inbox beyond a chunk and the start of the next
        # Owned by the IO thread (the camera is opened and closed there; any thread sending outputs submits to it):
        self.input_ring: RingReader | None = None
        self.output_ring: RingWriter | None = None
        self.camera = SessionCamera(width, height)
        self.bad_ring_generation = 0  # the input ring's frame block already reported as refused or the wrong size
        self.opened_at = time.monotonic()

    # -- IO thread ---------------------------------------------------------------
    def put(self, frame: InputFrame, dropped_before: int = 0) -> bool:
        """Add a received frame (dropped_before: stale ones the transport discarded).
        Returns whether the next chunk is now complete."""
        with self.lock:
            if self.closed:
                return False
            self._frames_dropped += dropped_before
            self._frames_in += 1
            self._input_rate.add(frame.t_capture_ns)
            if self._first_frame_ns is None:
                self._first_frame_ns = time.monotonic_ns()
            if not self._rate_gate.admit(frame.t_capture_ns):
                self._frames_dropped += 1
                self._frames_over_rate += 1
                return False
            while len(self._inbox) >= inbox_limit(self._frames_needed, self._spare_frames):
                self._drop_oldest()
            self._inbox.append(frame)
            ready = len(self._inbox) >= self._frames_needed
            if ready and self._ready_since_ns is None:
                self._ready_since_ns = time.monotonic_ns()
            return ready

    def change(self, settings: StreamSettings, targets: Mapping[str, float], routes: Mapping[str, Any]) -> bool:
        """Take new parameters; the worker applies them between steps. Returns whether
        the stream restarts for them (a reload parameter changed)."""
        with self.lock:
            changed = {
                name: getattr(settings, name)
                for name in StreamSettings.__dataclass_fields__
                if getattr(settings, name) != getattr(self.settings, name)
            }
            restarts = any(name not in LIVE_SETTINGS for name in changed)
            self._pending.update(changed)
            self.settings, self.targets, self.routes = settings, dict(targets), dict(routes)
            return restarts

    def due_output(self, now_ns: int) -> OutputFrame | None:
        """The oldest finished frame that is due, left in the outbox until output_sent."""
        with self.lock:
            return self._outbox[0] if self._outbox and self._outbox[0].due_ns <= now_ns else None

    def output_sent(self, output: OutputFrame) -> None:
        now_ns = time.monotonic_ns()
        with self.lock:
            self._frames_out += 1
            latency_ms = (now_ns - output.t_capture_ns) / 1e6
            self._latencies_ms.append(latency_ms)
            self._deadline_misses += latency_ms > self.latency_ms
            if self._first_output_ns is None:
                self._first_output_ns = now_ns
                self._time_to_first_frame_ns = now_ns - self._first_frame_ns
            self._sent_ns.append(now_ns)
            self._forget_sent_before(now_ns - OUTPUT_FPS_WINDOW_NS)
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
                "params": current_params(self.settings, self.targets, self.routes),
                "lag_frames": self.settings.lag_frames,
                "first_chunk_frames": self.settings.first_chunk_frames,
                "frames_in": self._frames_in,  # received into the inbox
                "frames_dropped": self._frames_dropped + ring_skipped,  # stale frames discarded before a step
                "frames_processed": self._frames_processed,  # taken into steps
                "frames_waiting": len(self._inbox),  # in the inbox, for the next step
                "next_chunk_frames": self._frames_needed,  # how many frames the next step takes
                "frames_out": self._frames_out,  # finished frames sent back
                "outputs_dropped": self._outputs_dropped,  # finished frames replaced by newer ones before sending
                "steps": self._steps,
                "steps_shared": self._steps_shared,  # of those, steps run together with other sessions
                "step_ms": 1000 * self._step_seconds / self._steps if self._steps else None,
                "uptime_s": time.monotonic() - self.opened_at,
                # Against the targets (engine/slo.py): latencies from capture to the output's sending.
                "time_to_first_frame_ms": _ms(self._time_to_first_frame_ns),
                "output_fps": self._output_fps(time.monotonic_ns()),
                "latency_ms": {f"p{p}": _round(percentile(list(self._latencies_ms), p)) for p in (50, 95, 99)},
                "deadline_misses": self._deadline_misses,  # outputs sent later than latency_ms after capture
                "frames_over_rate": self._frames_over_rate,  # of frames_dropped: beyond the frame-rate cap
                "scheduler": self._choice.as_dict() if self._choice is not None else None,
                "virtualcam": self.camera.describe(),
            }

    @property
    def target_fps(self) -> float:
        return self.targets.get("target_fps", table.PARAMS["target_fps"].default)

    @property
    def latency_ms(self) -> float:
        return self.targets.get("latency_ms", table.PARAMS["latency_ms"].default)

    def _output_fps(self, now_ns: int) -> float | None:
        if self._first_output_ns is None or now_ns - self._first_output_ns < OUTPUT_FPS_SHORTEST_NS:
            return None
        self._forget_sent_before(now_ns - OUTPUT_FPS_WINDOW_NS)
        return round(len(self._sent_ns) * 1e9 / min(OUTPUT_FPS_WINDOW_NS, now_ns - self._first_output_ns), 2)

    def _forget_sent_before(self, t_ns: int) -> None:
        while self._sent_ns and self._sent_ns[0] < t_ns:
            self._sent_ns.popleft()

    def _drop_oldest(self) -> None:
        self._inbox.popleft()
        self._frames_dropped += 1
        self._dropped_stale = True

    # -- scheduler -------------------------------------------------------------------
    def is_active(self) -> bool:
        """Neither closed nor failed."""
        with self.lock:
            return not self.closed and self.failure is None

    def load(self, stream_batched: bool | None, in_flight_capture_ns: int | None, latents: int = 1
             ) -> tuple[SessionLoad, dict[str, Any]] | None:
        """What the SLO policy needs of this session, and the parameter changes not applied yet;
        None once closed or failed. The scheduler adds what it knows of the stream: its mode
        (None until it is built), the capture time of its oldest frame in flight, the latent
        frames of its chunks."""
        with self.lock:
            if self.closed or self.failure is not None:
                return None
            # A step to run: a stream to build, parameters to apply, or a complete chunk.
            ready = stream_batched is None or bool(self._pending) or len(self._inbox) >= self._frames_needed
            oldest = in_flight_capture_ns
            if oldest is None and self._inbox:
                oldest = self._inbox[0].t_capture_ns
            dropping, self._dropped_stale = self._dropped_stale, False
            load = SessionLoad(self.id, self.target_fps, self.latency_ms / 1000, self.settings.steps, stream_batched,
                               "latency_ms" in self.targets, self._had_output, ready, oldest, self._input_rate.fps,
                               self._waits.longest, dropping, latents, self.settings.first_chunk_frames,
                               self.settings.ranks)
            return load, dict(self._pending)

    def claim(self, claim: Claim) -> list[InputFrame] | None:
        """Take the scheduler's choice and, when the session steps, its work: the changes the
        scheduler planned with (any made since wait for the next step), the mode, the frames a
        restarted stream had in flight, and the next chunk, if complete. Returns that chunk."""
        with self.lock:
            if claim.choice is not None:
                self._choice = claim.choice
                self._spare_frames = claim.choice.spare_frames
                self._rate_gate.set_cap(claim.choice.frame_rate_cap)
            for name, value in claim.changes.items():
                if name in self._pending and self._pending[name] is value:
                    del self._pending[name]
            if claim.stream_batch is not None:  # lag_frames follows the mode
                self.settings = replace(self.settings, stream_batch=claim.stream_batch)
            if claim.returned or claim.frames_needed not in (None, self._frames_needed):
                self._expect_frames(claim.frames_needed or self._frames_needed, claim.returned)
            if not claim.take_chunk:
                return None
            return self._take_chunk(claim.frames_after or self._frames_needed, claim.stale_before_ns)

    def excuse_wait(self, start_ns: int, end_ns: int) -> None:
        """Leave the device's time from start_ns to end_ns (first chunks) out of the wait of the
        chunk now complete or completing (see slo.WaitMeter)."""
        with self.lock:
            self._ready_since_ns = excused_wait_start(self._ready_since_ns, start_ns, end_ns)

    def record(self, *, built: bool = False, outputs: Sequence[OutputFrame] = (), step_seconds: float = 0.0,
               shared: bool = False) -> None:
        """A step's outcome: the stream built (the session is ready), or a chunk's step (shared:
        with other sessions) and the frames it finished, if any. Those follow the frames still
        waiting in the outbox, up to as many as they are, which are due at once; any older ones
        are dropped."""
        with self.lock:
            if built:
                if self.state != "error":
                    self.state = "ready"
                return
            self._steps += 1
            self._steps_shared += shared
            self._step_seconds += step_seconds
            if outputs and not self.closed:
                self._had_output = True
                now_ns = time.monotonic_ns()
                waiting = list(self._outbox)[-len(outputs):]
                self._outputs_dropped += len(self._outbox) - len(waiting)
                for output in waiting:  # the same objects: a sender may hold one (output_sent compares)
                    output.due_ns = min(output.due_ns, now_ns)
                self._outbox.clear()
                self._outbox.extend(waiting)
                self._outbox.extend(outputs)
                self.state = "streaming"

    def _expect_frames(self, frames_needed: int, returned: Sequence[InputFrame]) -> None:
        """How many frames the next chunk takes; frames beyond that, the oldest, are dropped.
        ``returned`` go back to the front of the inbox first."""
        self._inbox.extendleft(reversed(returned))
        self._frames_processed -= len(returned)
        self._frames_needed = frames_needed
        while len(self._inbox) > inbox_limit(frames_needed, self._spare_frames):
            self._drop_oldest()
        self._ready_since_ns = time.monotonic_ns() if len(self._inbox) >= frames_needed else None

    def _take_chunk(self, frames_after: int, stale_before_ns: int | None) -> list[InputFrame] | None:
        """The next chunk's frames, the oldest, or None until enough have come. Frames captured
        before stale_before_ns are dropped first while a full chunk stays. frames_after is how
        many the chunk after it takes, set now so that frames arriving during the step are kept
        for it."""
        if len(self._inbox) < self._frames_needed:
            return None
        while (stale_before_ns is not None and len(self._inbox) > self._frames_needed
               and self._inbox[0].t_capture_ns < stale_before_ns):
            self._drop_oldest()
        now_ns = time.monotonic_ns()
        self._waits.add((now_ns - self._ready_since_ns) / 1e9 if self._ready_since_ns is not None else 0.0)
        chunk = [self._inbox.popleft() for _ in range(self._frames_needed)]
        self._frames_processed += len(chunk)
        self._frames_needed = frames_after
        self._ready_since_ns = now_ns if len(self._inbox) >= frames_after else None
        return chunk

    def fail(self, message: str) -> None:
        with self.lock:
            self.failure = message
            self.state = "error"
            self._inbox.clear()
            self._outbox.clear()


def _ms(nanoseconds: int | None) -> float | None:
    return None if nanoseconds is None else round(nanoseconds / 1e6, 1)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
