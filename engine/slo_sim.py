"""The engine's scheduling on a simulated clock and device: no model, no sleeping.

It follows the worker and session mechanics step for step (sessions stepping
together with their rows in shared forwards, an inbox of a chunk, the start of the
next and the policy's spare frames where the newest frame wins, frame-rate caps,
stale frames dropped, mode changes restarting the stream, the stream batch's lag,
outputs paced at their capture spacing, a newer chunk replacing outputs not yet due),
so tests and bench/slo.py can run the SLO policy (engine/slo.py) over minutes of
traffic in milliseconds, and compare it with the published fixed policy: one 4-frame
chunk per step, stream batching always on, sessions in turn, and every frame queued
until its turn.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .slo import (FRAMES_PER_CHUNK, WARM_UP_STEPS, CostModel, FrameRateGate, RateMeter, SessionLoad, SloPolicy,
                  StepShape, WaitMeter, excused_wait_start, inbox_limit, percentile)

NS = 1_000_000_000


@dataclass(frozen=True)
class Stream:
    """One host: when its frames are captured, and what it asks for."""

    captures_ns: list[int]
    target_fps: float = 16.0
    latency_ms: float = 500.0
    steps: int = 2
    low_latency_start: bool = False

    @property
    def first_chunk_frames(self) -> int:
        return 1 if self.low_latency_start else 1 + FRAMES_PER_CHUNK


def steady_captures(fps: float, duration_s: float, start_s: float = 0.0) -> list[int]:
    count = int((duration_s - start_s) * fps)
    return [round((start_s + index / fps) * NS) for index in range(count)]


def bursty_captures(low_fps: float, high_fps: float, period_s: float, duration_s: float) -> list[int]:
    """Frames alternating between period_s at high_fps and period_s at low_fps."""
    captures, t, fast = [], 0.0, True
    while t < duration_s:
        end = min(t + period_s, duration_s)
        fps = high_fps if fast else low_fps
        while t < end:
            captures.append(round(t * NS))
            t += 1 / fps
        t, fast = end, not fast
    return captures


@dataclass
class Device:
    """Each forward costs a fixed pass time (reading the weights) plus time per latent row:
    memory-bound by default, compute-bound with pass_s=0 (bench/slo.py --device). After
    slow_after_s every step takes slowdown times as long."""

    pass_s: float = 0.030
    row_s: float = 0.010
    slow_after_s: float | None = None
    slowdown: float = 2.0

    def step_seconds(self, shapes: list[StepShape], now_s: float) -> float:
        """Sessions' steps run together: calls with as many latent frames share forwards, the
        i-th holding the rows of every such session with an i-th pass (as push_streams runs them)."""
        seconds = 0.0
        for latents in {s.latents for s in shapes}:
            group = [s for s in shapes if s.latents == latents]
            seconds += sum(self.pass_s + self.row_s * sum(s.latents * s.width for s in group if s.passes > i)
                           for i in range(max(s.passes for s in group)))
        if self.slow_after_s is not None and now_s >= self.slow_after_s:
            seconds *= self.slowdown
        return seconds


@dataclass
class Result:
    """One session's outcome."""

    latencies_s: list[float] = field(default_factory=list)  # of every frame delivered
    deadline_misses: int = 0
    frames_in: int = 0
    frames_dropped: int = 0  # stale, or beyond a frame-rate cap
    first_output_s: float | None = None
    choices: list[str] = field(default_factory=list)  # the policy's state at each plan
    steps: int = 0  # steps it took part in
    steps_shared: int = 0  # of those, steps shared with other sessions
    restarts: int = 0  # stream restarts for a change of mode

    @property
    def delivered(self) -> int:
        return len(self.latencies_s)

    def latency_percentile(self, percent: float) -> float | None:
        return percentile(self.latencies_s, percent)


class _Session:
    def __init__(self, id: str, stream: Stream, bounded_inbox: bool):
        self.id, self.stream = id, stream
        self.bounded_inbox = bounded_inbox  # the engine's; the fixed policy queues every frame
        self.gate, self.meter = FrameRateGate(), RateMeter()
        self.inbox: deque[int] = deque()  # capture times
        self.frames_needed = stream.first_chunk_frames
        self.ready_since_ns: int | None = None  # when the inbox last became a complete chunk
        self.waits = WaitMeter()
        self.in_flight: deque[list[int]] = deque()
        self.stream_batched: bool | None = None  # None until its pipeline is built
        self.started = False  # has had its first output
        self.streaming = False  # its first chunk is taken: the chunks now are 4 frames, or 8 for 2 latents
        self.latents = 1
        self.dropping = False
        self.spare_frames = 0  # the policy's room in the inbox beyond a chunk and the start of the next
        self.waiting_outputs: list[tuple[float, float]] = []  # (due, latency) paced, not yet delivered
        self.result = Result()

    def put(self, t_capture_ns: int) -> None:
        self.result.frames_in += 1
        self.meter.add(t_capture_ns)
        if not self.gate.admit(t_capture_ns):
            self.result.frames_dropped += 1
            return
        while self.bounded_inbox and len(self.inbox) >= inbox_limit(self.frames_needed, self.spare_frames):
            self._drop_oldest()
        self.inbox.append(t_capture_ns)
        if self.ready and self.ready_since_ns is None:
            self.ready_since_ns = t_capture_ns

    @property
    def ready(self) -> bool:
        return len(self.inbox) >= self.frames_needed

    def load(self) -> SessionLoad:
        oldest = self.in_flight[0][0] if self.in_flight else (self.inbox[0] if self.inbox else None)
        return SessionLoad(self.id, self.stream.target_fps, self.stream.latency_ms / 1000, self.stream.steps,
                           self.stream_batched, True, self.started, self.ready, oldest, self.meter.fps,
                           self.waits.longest, self.dropping, self.latents,
                           self.stream.first_chunk_frames)

    def expect_frames(self, frames_needed: int) -> None:
        self.frames_needed = frames_needed
        while len(self.inbox) > inbox_limit(frames_needed, self.spare_frames):
            self._drop_oldest()

    def take_chunk(self, now_ns: int, stale_before_ns: int | None, frames_after: int) -> list[int]:
        while stale_before_ns is not None and len(self.inbox) > self.frames_needed and self.inbox[0] < stale_before_ns:
            self._drop_oldest()
        self.waits.add((now_ns - self.ready_since_ns) / NS)
        chunk = [self.inbox.popleft() for _ in range(self.frames_needed)]
        self.frames_needed = frames_after
        self.streaming = True
        self.ready_since_ns = now_ns if self.ready else None
        return chunk

    def restart(self, stream_batched: bool) -> None:
        """A new pipeline in another mode: the frames in flight go back to the inbox,
        ahead of the others, and a first chunk comes next."""
        self.result.restarts += 1
        self.stream_batched = stream_batched
        self.streaming, self.latents = False, 1
        while self.in_flight:
            self.inbox.extendleft(reversed(self.in_flight.pop()))
        self.expect_frames(self.stream.first_chunk_frames)
        self.ready_since_ns = self.inbox[self.frames_needed - 1] if self.ready else None

    def finish(self, chunk: list[int], end_s: float) -> None:
        """Outputs of a finished chunk, paced at their capture spacing; outputs of the
        chunk before that were not due yet go out at once, as the engine's outbox does."""
        self.deliver_until(end_s, flush=True)
        self.waiting_outputs = [(end_s + (c - chunk[0]) / NS, end_s - chunk[0] / NS) for c in chunk]
        if self.result.first_output_s is None:
            self.result.first_output_s = end_s
        self.started = True

    def deliver_until(self, now_s: float, flush: bool = False) -> None:
        """Deliver the outputs due by now; with flush, those not due yet go out now too
        (without, they are what the run's end leaves undelivered)."""
        for due_s, latency in self.waiting_outputs:
            if due_s > now_s:
                if not flush:
                    continue
                latency -= due_s - now_s
            self.result.latencies_s.append(latency)
            self.result.deadline_misses += latency > self.stream.latency_ms / 1000
        self.waiting_outputs = []

    def _drop_oldest(self) -> None:
        self.inbox.popleft()
        self.result.frames_dropped += 1
        self.dropping = True


def simulate(streams: list[Stream], device: Device, duration_s: float, policy: str = "slo") -> list[Result]:
    """Run the streams for duration_s under the "slo" policy or the published "fixed" one."""
    if policy not in ("slo", "fixed"):
        raise ValueError(f"policy is 'slo' or 'fixed', not {policy!r}")
    sessions = [_Session(f"s{index}", stream, bounded_inbox=policy == "slo") for index, stream in enumerate(streams)]
    if policy == "fixed":
        for session in sessions:
            session.stream_batched = True
    arrivals = sorted((t, index) for index, stream in enumerate(streams) for t in stream.captures_ns)
    slo, turn = SloPolicy(CostModel()), _RoundRobin(sessions)
    if policy == "slo":  # the engine's warm-up, before any session: steady steps in both modes
        for steps in sorted({stream.steps for stream in streams}):
            for stream_batched in (True, False):
                shape = StepShape.steady(steps, stream_batched)
                for _ in range(WARM_UP_STEPS - 1):
                    slo.cost.observe(shape, device.step_seconds([shape], 0.0))

    now_ns, next_arrival = 0, 0  # whole nanoseconds, so a frame is never missed by rounding
    first_chunks_ns: tuple[int, int] | None = None  # the last step's span, when it ran first chunks
    while now_ns < duration_s * NS:
        while next_arrival < len(arrivals) and arrivals[next_arrival][0] <= now_ns:
            t, index = arrivals[next_arrival]
            sessions[index].put(t)
            next_arrival += 1
        if first_chunks_ns is not None and policy == "slo":  # once the frames that came during it are in
            for session in sessions:
                session.ready_since_ns = excused_wait_start(session.ready_since_ns, *first_chunks_ns)
            first_chunks_ns = None
        batch = _slo_pick(slo, sessions) if policy == "slo" else turn.next()
        if not batch:
            if next_arrival == len(arrivals):
                break
            now_ns = arrivals[next_arrival][0]
            continue
        steps = []  # (session, chunk, shape, first)
        for session in batch:
            stale_before_ns, steady_frames = None, FRAMES_PER_CHUNK
            if policy == "slo":
                stream_batched = slo.choice(session.id).stream_batched
                if session.stream_batched is None:  # its pipeline is built now
                    session.stream_batched = stream_batched
                elif stream_batched != session.stream_batched:
                    session.restart(stream_batched)
                    if not session.ready:  # the restarted stream's first chunk needs more frames
                        continue
                if not session.stream_batched:  # chunks of 1 or 2 latent frames, as the policy chose
                    steady_frames = FRAMES_PER_CHUNK * slo.choice(session.id).latents
                if session.streaming and session.frames_needed != steady_frames:
                    session.expect_frames(steady_frames)
                    if not session.ready:
                        continue
                stale_before_ns = slo.stale_before_ns(session.load(), now_ns)
            first = not session.streaming
            chunk = session.take_chunk(now_ns, stale_before_ns, steady_frames)
            if first:
                shape = StepShape.first_chunk(session.stream.steps, len(chunk))
            else:
                session.latents = len(chunk) // FRAMES_PER_CHUNK
                shape = StepShape.steady(session.stream.steps, session.stream_batched, session.latents)
            steps.append((session, chunk, shape, first))
        if not steps:
            continue
        seconds = device.step_seconds([shape for _, _, shape, _ in steps], now_ns / NS)
        slo.cost.observe(StepShape.together([shape for _, _, shape, _ in steps]), seconds)
        if any(first for _, _, _, first in steps):
            first_chunks_ns = (now_ns, now_ns + round(seconds * NS))
        now_ns += round(seconds * NS)
        for session, chunk, _, first in steps:
            session.result.steps += 1
            session.result.steps_shared += len(steps) > 1
            session.in_flight.append(chunk)
            lag_chunks = session.stream.steps - 1 if session.stream_batched and not first else 0
            if len(session.in_flight) > lag_chunks:
                session.finish(session.in_flight.popleft(), now_ns / NS)
    for session in sessions:
        session.deliver_until(duration_s)
    return [session.result for session in sessions]


def _slo_pick(policy: SloPolicy, sessions: list[_Session]) -> list[_Session]:
    """Plan a step as the worker does: give each session its frame-rate cap, return those to step."""
    plan = policy.plan([session.load() for session in sessions])
    for session in sessions:
        choice = plan.choices[session.id]
        session.gate.set_cap(choice.frame_rate_cap)
        session.spare_frames = choice.spare_frames
        session.result.choices.append(choice.state)
        session.dropping = False
    by_id = {session.id: session for session in sessions}
    return [by_id[id] for id in plan.batch]


class _RoundRobin:
    def __init__(self, sessions: list[_Session]):
        self._sessions, self._last = sessions, -1

    def next(self) -> list[_Session]:
        """The next ready session in turn, alone (the published code serves one stream)."""
        count = len(self._sessions)
        for offset in range(1, count + 1):
            index = (self._last + offset) % count
            if self._sessions[index].ready:
                self._last = index
                return [self._sessions[index]]
        return []
