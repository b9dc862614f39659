"""SLO-aware scheduling: which session the device serves next, in which mode, at what frame rate.

Each session states two targets (live parameters): ``target_fps``, the frame rate it
wants served, and ``latency_ms``, its budget from a frame's capture to its output.
Before every step the worker (engine/worker.py) asks the policy for a plan. The policy
reasons with a cost model of a step, learned online from the steps the worker times.

How a frame's latency adds up (d: the time between the session's frames):

    latency = (3 + lag_frames) * d   the chunk of 4 fills, then the stream batch's lag
            + wait                   other sessions' steps ahead of this one (as measured;
                                     first chunks, put ahead once on purpose, not counted)
            + step                   the step that finishes the frame (the cost model)

The policy:

1. Time to first frame first: sessions waiting for their first output go ahead of
   steady-state work (a first chunk is 1 frame when the session asked for
   low_latency_start), together where that pays as below (sessions opened at once).
   Otherwise the sessions with a complete chunk step together:
   the pipelines run their DiT calls of one size as one forward (engine/pipeline.py,
   push_streams), which reads the weights once for all of them, so on a GPU a step
   of n sessions costs far less than n steps; on a compute-bound device (a CPU) it costs
   what they cost in turn, and each would wait for the others' work. A session joins a
   shared step only where the cost model (a time per forward and per latent row, fitted
   to the steps measured since the warm-up) predicts that pays (JOIN_GAIN); else the
   sessions step apart, as the published policy runs them.
2. Mode: stream batching (one forward for all denoising steps: the most frames a
   second, but lag_frames more latency) unless its predicted latency is over budget
   where the other mode's is not. A pipeline starts in the chosen mode; a later change
   restarts the stream, so it happens only when the current mode no longer fits. Only
   for sessions that stated latency_ms: the mode sets the lag hello announced, so a
   session on the default budget keeps stream batching, as published.
3. Order: earliest deadline first, the deadline being the capture time of the oldest
   frame the step would output plus that session's budget; the sessions stepping
   together are listed in that order.
4. Overload, in this order. A session's inbox holds one chunk and the start of the
   next, and as many more frames as the budget has room for by the prediction (at
   most MAX_SPARE_FRAMES: a burst is served within the budget rather than dropped);
   the newest frame wins, so frames are never queued into seconds of lag; and a step
   drops frames that could no longer make their deadline when a newer chunk is
   waiting (both counted as dropped). If a session keeps losing
   frames while the sessions' demand exceeds the device's time, its frame rate is
   capped to an even cadence: every session gets the same share of its target (or,
   when targets fit, of the frames beyond them) of DEVICE_SHARE of the device's time,
   never below the rate its budget needs (slower frames make a chunk take longer to
   fill), and none where no rate meets the budget (the inbox's newest frames are
   served then). The cap goes once demand fits. Demand that fits the device, if not
   its share, is not capped: no queue builds then, and a cap would only drop frames
   the device has time for (a few lost at start-up, while first chunks go ahead,
   would otherwise cap a session for good). Demand is judged once a steady step has
   been measured, not from first chunks.
5. Chunk size: without stream batching a chunk after the first may hold 2 latent
   frames (8 video frames, one forward per denoising step for both). The policy
   takes 2 while chunks of 1 would need more of the device than it has, chunks of 2
   need clearly less (LATENTS_GAIN: on a compute-bound device they need the same),
   and the budget allows the 4 frames more a chunk of 2 waits for; it goes back to 1
   with some slack (LATENTS_BACK). A chunk-size change needs no restart, but it takes
   effect from the session's next chunk after the one it is waiting for.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

import numpy as np

# At start-up, before any session, the engine runs this many steady steps in each mode
# (engine/worker.py), all but the first measured: the cost model starts from them.
WARM_UP_STEPS = 3
FRAMES_PER_CHUNK = 4  # video frames per latent frame, as StreamPipeline takes them after a first chunk
COST_SMOOTHING = 0.2  # weight of a new measurement in the cost model's moving average
# A step measured this many times slower than its estimate is a stall (the process was
# paused, the machine slept), not the step's cost, unless the next step is as slow.
STALL_FACTOR = 4.0
RATE_WINDOW = 16  # frames over which a session's input rate is measured
WAIT_WINDOW = 16  # chunks over which a session's wait for the device is measured
# Frame-rate caps, once demand exceeds the device's time, bring it down to this share of
# it: a little slack keeps steps of different sessions from piling up into waits when every
# session runs at its cap (on a real device; at 1.0 the engine test on a busy CPU starved a
# session). Demand between this share and the device's time is not capped: no queue builds
# there, and caps would drop frames the device has time for (bench/slo.py, compute-bound,
# 4 steady sessions: 96% of the device, capped to 95% they lost throughput to the published
# policy, which queues every frame). Chunks of 2 latent frames are weighed at this share too.
DEVICE_SHARE = 0.95
# When neither mode meets a budget, the other mode must predict at most this share of
# the current one's latency to be worth restarting the stream for.
SWITCH_GAIN = 0.95
# A session joins a shared step when the cost model predicts that this adds at most this
# share of its own step's time (a compute-bound device, a CPU, gains nothing: its sessions
# then step in turn, each without waiting for the others' work). The prediction is the
# shared step's own measurement while it is among the last RETRY_STEPS steps measured,
# else the time per forward and per row fitted to those steps (FIT_WINDOW): a shared step
# is run again only where the fit, which follows the device, says it pays.
JOIN_GAIN = 0.9
RETRY_STEPS = 200
# The time per forward and per row are fitted to the shapes measured within this many
# steps, so that a device that slows down (or speeds up) is not fitted to a mix of old
# and new times. Where those shapes do not tell the two apart (every session stepping
# alone in one mode), the last fit's balance of the two is kept, scaled to them.
FIT_WINDOW = RETRY_STEPS
# Chunks of 2 latent frames go back to 1 once chunks of 1 would take at most this share
# of the device's time that is theirs.
LATENTS_BACK = 0.8
# Chunks of 2 latent frames are taken only where the cost model predicts they take at most
# this share of the device's time that chunks of 1 take: on a compute-bound device (a CPU)
# they save nothing (a fit's rounding may make them look a hair cheaper), and their 4 more
# frames to wait for are then a loss, all the more as a session's next chunk is sized when
# its chunk is taken: one too many chunks of 8 at the end of a burst waits a second for 8
# frames at 8 FPS.
LATENTS_GAIN = 0.9
# At most this many frames are held beyond a chunk and the start of the next, however
# large a budget (frames are large; a longer burst is what frame-rate caps are for).
MAX_SPARE_FRAMES = 2 * FRAMES_PER_CHUNK


# ------------------------------------------------------------------------ cost model


@dataclass(frozen=True)
class StepShape:
    """What a step computes, as far as its time goes."""

    latents: int  # latent frames in each forward (a first chunk's 1 or 2; 2 for a chunk of 8 frames)
    width: int  # rows in each forward: the denoising steps when stream-batched, else 1; summed over sessions
    passes: int  # forwards run one after another: the denoising steps without stream batching, else 1
    sessions: int = 1  # sessions stepping together
    first: bool = False  # a stream's first chunk
    # For sessions stepping together (see together), the forwards and latent rows in all.
    shared_forwards: int = 0
    shared_rows: int = 0

    @property
    def forwards(self) -> int:
        return self.shared_forwards or self.passes

    @property
    def work(self) -> int:
        """Latent rows over all the step's forwards."""
        return self.shared_rows or self.latents * self.width * self.passes

    @staticmethod
    def together(shapes: list[StepShape]) -> StepShape:
        """Sessions' steps run as one: calls with as many latent frames share each forward
        (engine/pipeline.py, push_streams), the longest runs on alone."""
        if len(shapes) == 1:
            return shapes[0]
        forwards = sum(max(s.passes for s in shapes if s.latents == latents) for latents in {s.latents for s in shapes})
        return StepShape(max(s.latents for s in shapes), sum(s.width for s in shapes), max(s.passes for s in shapes),
                         sum(s.sessions for s in shapes), any(s.first for s in shapes), forwards,
                         sum(s.work for s in shapes))

    @staticmethod
    def steady(steps: int, stream_batched: bool, latents: int = 1) -> StepShape:
        """A step after the first chunk (of 2 latent frames only without stream batching)."""
        return StepShape(1, steps, 1) if stream_batched else StepShape(latents, 1, steps)

    @staticmethod
    def first_chunk(steps: int, frames: int) -> StepShape:
        """A stream's first chunk of frames (1, or 1 + 4k: its first frame is a latent frame of
        its own): every denoising step in turn on its latents."""
        return StepShape(1 + (frames - 1) // FRAMES_PER_CHUNK, 1, steps, first=True)


class CostModel:
    """Seconds a step of each shape takes: a moving average of measured steps.

    A shape not measured yet is estimated from the measured ones: as a time per
    forward (the weights read) plus a time per latent row, fitted to them once two
    shapes tell the two apart, and before that by its work (latent rows times passes).
    The engine's warm-up measures a steady step in each mode before any session
    (WARM_UP_STEPS), which tells the two apart from the start; each later step refines
    its own shape. A lone step STALL_FACTOR times slower than its estimate is left out:
    one paused second would otherwise throttle every session for many steps while the
    average forgets it."""

    def __init__(self, smoothing: float = COST_SMOOTHING, stall_factor: float = STALL_FACTOR):
        self._smoothing = smoothing
        self._stall_factor = stall_factor
        self._seconds: dict[StepShape, float] = {}
        self._stalled: set[StepShape] = set()  # shapes whose last measurement was left out as a stall
        self._observations = 0
        self._last_observed: dict[StepShape, int] = {}
        self._fitted: tuple[float, float] | None | bool = False  # False: to fit again
        self._balance: tuple[float, float] | None = None  # the last fit that told forwards from rows

    def observe(self, shape: StepShape, seconds: float) -> None:
        self._observations += 1
        self._last_observed[shape] = self._observations
        self._fitted = False
        known = self._seconds.get(shape)
        if known is None:
            self._seconds[shape] = seconds
            self._note_balance()
            return
        if seconds > self._stall_factor * known and shape not in self._stalled:
            self._stalled.add(shape)
            return
        self._stalled.discard(shape)
        self._seconds[shape] = known + self._smoothing * (seconds - known)

    def _note_balance(self) -> None:
        """Fit once the measured shapes tell forwards from rows, so that a balance is kept even
        where no prediction was asked before they aged out of FIT_WINDOW."""
        if self._balance is None:
            self._fit_now()

    @property
    def steady_measured(self) -> bool:
        """Whether a step after a first chunk has been measured: a first chunk's cost (every
        denoising step in turn, its frames encoded) says little of a steady step's."""
        return any(not shape.first for shape in self._seconds)

    def measured_lately(self, shape: StepShape, within: int) -> bool:
        """Whether a step of this shape was among the last ``within`` measured."""
        return self._observations - self._last_observed.get(shape, -within) < within

    def predict(self, shape: StepShape, scaled: bool = True, within: int | None = None) -> float | None:
        """Seconds for a step of this shape, or None before any step was measured. Without
        scaled, None also where only scaling a measured step by its work would answer (a
        guess that takes the device to be compute-bound). With within, a measurement of the
        shape older than the last ``within`` steps gives way to the fit, which follows the
        device through the steps measured since (a shared step the fit says does not pay
        is not run again, so its own measurement would never be renewed)."""
        if shape in self._seconds and (within is None or self.measured_lately(shape, within)
                                       or self._fit_now() is None):
            return self._seconds[shape]
        if not self._seconds:
            return None
        fitted = self._fit_now()
        if fitted is not None:
            per_forward, per_row = fitted
            return per_forward * shape.forwards + per_row * shape.work
        if not scaled:
            return None
        per_work = sum(seconds / known.work for known, seconds in self._seconds.items()) / len(self._seconds)
        return per_work * shape.work

    def _fit_now(self) -> tuple[float, float] | None:
        if self._fitted is False:
            self._fitted = self._fit()
        return self._fitted

    @property
    def per_forward_and_row(self) -> tuple[float, float] | None:
        """The fitted seconds per forward and per latent row, or None until steps tell them apart."""
        return self._fit_now()

    def _fit(self) -> tuple[float, float] | None:
        """Seconds per forward (reading the weights) and per latent row, fitted to the shapes
        measured within FIT_WINDOW steps; where those do not tell the two apart, the last fit
        that did, scaled to them; None until one did (or where the fit makes no physical sense)."""
        shapes = [shape for shape in self._seconds if not shape.first]  # a first chunk's VAE work is its own
        recent = [shape for shape in shapes if self.measured_lately(shape, FIT_WINDOW)]
        for group in (recent, shapes):
            fitted = self._least_squares(group)
            if fitted is not None:
                self._balance = fitted
                return fitted
            if self._balance is not None and recent:
                # The device's speed changed as a whole, or not at all: the balance holds.
                per_forward, per_row = self._balance
                predicted = sum(per_forward * shape.forwards + per_row * shape.work for shape in recent)
                scale = sum(self._seconds[shape] for shape in recent) / predicted
                return per_forward * scale, per_row * scale
        return None

    def _least_squares(self, shapes: list[StepShape]) -> tuple[float, float] | None:
        terms = np.array([[shape.forwards, shape.work] for shape in shapes], dtype=float).reshape(-1, 2)
        if np.linalg.matrix_rank(terms) < 2:
            return None
        (per_forward, per_row), *_ = np.linalg.lstsq(terms, np.array([self._seconds[s] for s in shapes]), rcond=None)
        return (float(per_forward), float(per_row)) if per_forward >= 0 and per_row > 0 else None


# ------------------------------------------------------------------- frame rates


class RateMeter:
    """Frames per second of a stream, from the capture times of its latest frames."""

    def __init__(self, window: int = RATE_WINDOW):
        self._captures: deque[int] = deque(maxlen=window)

    def add(self, t_capture_ns: int) -> None:
        self._captures.append(t_capture_ns)

    @property
    def fps(self) -> float | None:
        if len(self._captures) < 2 or self._captures[-1] <= self._captures[0]:
            return None
        return (len(self._captures) - 1) * 1e9 / (self._captures[-1] - self._captures[0])


class WaitMeter:
    """The longest of a session's recent waits for the device, a chunk complete.

    Time the device spends on first chunks does not count (see excused_wait_start): they go
    ahead of every other step on purpose, once per stream start, so a wait behind one says
    nothing of the steady state, and a session that opens would otherwise make the
    others' waits look long for many chunks, and their streams restart in another mode."""

    def __init__(self, window: int = WAIT_WINDOW):
        self._waits: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self._waits.append(seconds)

    @property
    def longest(self) -> float | None:
        return max(self._waits, default=None)


def excused_wait_start(ready_since_ns: int | None, start_ns: int, end_ns: int) -> int | None:
    """When a chunk complete since ready_since_ns counts as waiting from, once the device's
    time from start_ns to end_ns (first chunks) is left out of its wait."""
    if ready_since_ns is None or ready_since_ns >= end_ns:
        return ready_since_ns
    return ready_since_ns + end_ns - max(ready_since_ns, start_ns)


def inbox_limit(frames_needed: int, spare_frames: int = 0) -> int:
    """Frames a session's inbox holds: the next chunk and the start of the one after,
    so frames arriving while the chunk waits for the device are kept, and as many more
    as the policy sees room for in the budget (Choice.spare_frames)."""
    return frames_needed + FRAMES_PER_CHUNK - 1 + spare_frames


class FrameRateGate:
    """Lets through at most ``cap_fps`` frames a second, evenly: time is cut into
    slots of 1/cap_fps from the first frame let through, and one frame per slot passes."""

    def __init__(self) -> None:
        self.cap_fps: float | None = None
        self._origin_ns: int | None = None
        self._last_slot = 0

    def set_cap(self, cap_fps: float | None) -> None:
        if cap_fps != self.cap_fps:
            self.cap_fps = cap_fps
            self._origin_ns = None  # the next frame starts the new cadence

    def admit(self, t_capture_ns: int) -> bool:
        if self.cap_fps is None:
            return True
        if self._origin_ns is None:
            self._origin_ns, self._last_slot = t_capture_ns, 0
            return True
        slot = round((t_capture_ns - self._origin_ns) * self.cap_fps / 1e9)
        if slot <= self._last_slot:
            return False
        self._last_slot = slot
        return True


# ------------------------------------------------------------------------ policy


@dataclass(frozen=True)
class SessionLoad:
    """What the policy knows of a session when it plans a step."""

    id: str
    target_fps: float
    latency_s: float
    steps: int
    stream_batched: bool | None  # its pipeline's mode; None until the pipeline is built
    mode_adjustable: bool  # the host stated latency_ms, so the policy may trade stream batching for latency
    started: bool  # has had its first output
    ready: bool  # has a step to run: a complete chunk, or a pipeline to build
    deadline_capture_ns: int | None  # capture time of the oldest frame its next step would output
    input_fps: float | None  # its frames' rate as they arrive, before any cap
    wait_s: float | None  # the longest its recent chunks waited for the device once complete
    dropping: bool  # lost stale frames since the last plan
    latents: int = 1  # latent frames in its chunks after the first (2 only without stream batching)
    first_chunk_frames: int = 1 + FRAMES_PER_CHUNK  # frames of its first chunk: 1 for a low-latency start
    ranks: int = 1  # pipeline ranks its forwards go round: each adds a stream batch's lag


@dataclass(frozen=True)
class Choice:
    """The scheduler's current decision for one session, as stats reports it."""

    stream_batched: bool  # the mode its pipeline should run in (a change restarts the stream)
    frame_rate_cap: float | None  # frames a second let in, or None for every frame
    predicted_step_s: float | None
    predicted_latency_s: float | None
    state: str  # meeting targets | frame rate lowered | over budget | warming up
    latents: int = 1  # latent frames per chunk after the first: 1 (4 frames) or 2 (8 frames)
    # Frames the inbox may hold beyond a chunk and the start of the next: as many as can
    # wait in it and still make the deadline, so a burst is absorbed instead of dropped.
    spare_frames: int = 0

    def as_dict(self) -> dict:
        return {
            "stream_batch": self.stream_batched,
            "chunk_frames": FRAMES_PER_CHUNK * self.latents,
            "spare_frames": self.spare_frames,
            "frame_rate_cap": None if self.frame_rate_cap is None else round(self.frame_rate_cap, 2),
            "predicted_step_ms": _ms(self.predicted_step_s),
            "predicted_latency_ms": _ms(self.predicted_latency_s),
            "state": self.state,
        }


@dataclass(frozen=True)
class Plan:
    batch: list[str]  # the sessions to step now, together, earliest deadline first; empty: none has a step
    choices: dict[str, Choice]


class SloPolicy:
    """Plans each step from the sessions' loads and the cost model; see the module doc."""

    def __init__(self, cost: CostModel, device_share: float = DEVICE_SHARE):
        self.cost = cost
        self._device_share = device_share
        self._capped: set[str] = set()  # sessions whose frame rate is held down
        self._choices: dict[str, Choice] = {}  # of the last plan
        # _costs of the plan being made, by session and its step's shape: a plan weighs every
        # session's costs for every other's choice, all from one state of the cost model.
        self._plan_costs: dict[tuple[str, StepShape], tuple[float, float] | None] = {}

    def plan(self, sessions: list[SessionLoad]) -> Plan:
        self._plan_costs.clear()
        caps = self._frame_rate_caps(sessions)
        self._choices = {session.id: self._choice(session, sessions, caps.get(session.id)) for session in sessions}
        return Plan(self._batch(sessions), self._choices)

    def choice(self, session_id: str) -> Choice:
        """The last plan's choice for a session."""
        return self._choices[session_id]

    def stale_before_ns(self, session: SessionLoad, now_ns: int) -> int | None:
        """Frames captured before this would miss their deadline if a step took them now
        (None: nothing is known yet to say so, or no frame can make it: then dropping
        frames would not save a deadline, only lose frames)."""
        choice = self._choices.get(session.id)
        if choice is None or choice.predicted_step_s is None or choice.state in ("over budget", "warming up"):
            return None
        step = choice.predicted_step_s
        lag_s = _lag_frames(session, session.stream_batched) * self._interval(session, choice.frame_rate_cap)
        return now_ns - round((session.latency_s - step - lag_s) * 1e9)

    # -- order -------------------------------------------------------------------
    def _batch(self, sessions: list[SessionLoad]) -> list[str]:
        ready = [session for session in sessions if session.ready]
        first_frames = [session for session in ready if not session.started]
        if first_frames:  # ahead of steady work, in the order they opened
            # Sessions seldom open together, so a joint first chunk is seldom measured lately:
            # it is tried only while the cost model cannot predict it (at start-up, before steady
            # steps tell the time per forward from the time per row), and else taken as
            # predicted, lest a compute-bound device make every first frame wait for all.
            return self._join(first_frames, lambda session: StepShape.first_chunk(session.steps,
                                                                                  session.first_chunk_frames),
                              explore=False)

        def deadline(session: SessionLoad) -> float:
            if session.deadline_capture_ns is None:
                return math.inf
            return session.deadline_capture_ns / 1e9 + session.latency_s

        return self._join(sorted(ready, key=deadline), lambda session: _steady(session, session.stream_batched))

    def _join(self, candidates: list[SessionLoad], shape_of, explore: bool = True) -> list[str]:
        """The first candidate, and each next one while joining the step pays."""
        batch: list[StepShape] = []
        ids = []
        for session in candidates:
            own = shape_of(session)
            if not batch or self._pays_to_join(batch, own, explore):
                batch.append(own)
                ids.append(session.id)
        return ids

    def _pays_to_join(self, batch: list[StepShape], own: StepShape, explore: bool) -> bool:
        """Whether a session joining the batch adds at most JOIN_GAIN of its own step, by the
        cost model: the joint step as measured lately, else as the fitted time per forward and
        per row predict it. Only where the model cannot tell (no fit yet) is a joint step tried
        (explore) to learn what it costs; a guess from scaling by work, which takes the device
        to be compute-bound, does not count as telling."""
        joint = StepShape.together([*batch, own])
        joint_s = self.cost.predict(joint, scaled=False, within=RETRY_STEPS)
        batch_s, own_s = (self.cost.predict(shape, scaled=False) for shape in (StepShape.together(batch), own))
        if None in (joint_s, batch_s, own_s):
            return explore  # nothing to go by: try it where exploring
        return joint_s - batch_s <= JOIN_GAIN * own_s

    # -- mode and predictions ---------------------------------------------------------
    def _choice(self, session: SessionLoad, sessions: list[SessionLoad], cap: float | None) -> Choice:
        interval = self._interval(session, cap)
        batched = self._latency(session, True, interval, sessions)
        alone = self._latency(session, False, interval, sessions)
        # Stream batching gives the most frames a second and is the published default.
        # A mode is left (which restarts the stream) only when it is over budget and the
        # other is within it, or clearly closer to it when neither is.
        mode = session.stream_batched if session.stream_batched is not None else True
        if batched is not None and alone is not None and session.mode_adjustable:
            current, other = (batched, alone) if mode else (alone, batched)
            if current > session.latency_s and (other <= session.latency_s or other < current * SWITCH_GAIN):
                mode = not mode
        latents = 1 if mode else self._chunk_latents(session, sessions, interval)
        latency = batched if mode else self._latency(session, False, interval, sessions, latents)
        if latency is None:
            state = "warming up"
        elif latency > session.latency_s:
            state = "over budget"
        elif cap is not None:
            state = "frame rate lowered"
        else:
            state = "meeting targets"
        # Each frame held in the inbox beyond the chunk adds an interval to the latency.
        room = 0 if latency is None else math.floor((session.latency_s - latency) / interval)
        spare = max(0, min(MAX_SPARE_FRAMES, room))
        return Choice(mode, cap, self._step(sessions, session, mode, latents), latency, state, latents, spare)

    def _chunk_latents(self, session: SessionLoad, sessions: list[SessionLoad], interval: float) -> int:
        """Latent frames per chunk without stream batching: 2 (one forward per step for 8
        frames) while the device cannot keep up with chunks of 1 and the budget allows
        the 4 frames more that a chunk of 2 waits for; else 1."""
        two = self._latency(session, False, interval, sessions, 2)
        load_one, load_two = self._load(sessions, session, 1), self._load(sessions, session, 2)
        if two is None or load_one is None or load_two is None or two > session.latency_s:
            return 1
        # Some slack both ways, so that a load near the limit does not flip the chunk size at every plan.
        over = load_one > (self._device_share * LATENTS_BACK if session.latents == 2 else self._device_share)
        return 2 if over and load_two <= LATENTS_GAIN * load_one else 1

    def _load(self, sessions: list[SessionLoad], session: SessionLoad, latents: int) -> float | None:
        """Share of the device's time every session's frames take, this one in chunks of latents."""
        load = 0.0
        for other in sessions:
            chunk_latents = latents if other is session else other.latents
            costs = self._costs(sessions, other, other.stream_batched, latents if other is session else None)
            if costs is None:
                return None
            load += (other.input_fps or other.target_fps) / (FRAMES_PER_CHUNK * chunk_latents) * costs[1]
        return load

    def _step(self, sessions: list[SessionLoad], session: SessionLoad, batched: bool | None,
              latents: int | None = None) -> float | None:
        """The step that finishes this session's chunk, in the given mode: shared with all
        the sessions where that costs less than their steps in turn, else its own."""
        costs = self._costs(sessions, session, batched, latents)
        return None if costs is None else costs[0]

    def _costs(self, sessions: list[SessionLoad], session: SessionLoad, batched: bool | None,
               latents: int | None = None) -> tuple[float, float] | None:
        """(the step that finishes this session's chunk, the device time its chunk takes),
        with this session in the given mode and chunk size (by default its current one)."""
        own_shape = _steady(session, batched, latents)
        key = (session.id, own_shape)
        if key not in self._plan_costs:
            self._plan_costs[key] = self._work_out_costs(sessions, session, own_shape)
        return self._plan_costs[key]

    def _work_out_costs(self, sessions: list[SessionLoad], session: SessionLoad, own_shape: StepShape
                        ) -> tuple[float, float] | None:
        shapes = [own_shape if other is session else _steady(other, other.stream_batched) for other in sessions]
        own = self.cost.predict(own_shape)
        joint = self.cost.predict(StepShape.together(shapes), within=RETRY_STEPS)
        in_turn = [self.cost.predict(shape) for shape in shapes]
        if own is None or joint is None or None in in_turn:
            return None
        if joint <= JOIN_GAIN * sum(in_turn):  # sharing pays (as _batch decides, session by session)
            return joint, joint / len(sessions)
        return own, own

    def _latency(self, session: SessionLoad, batched: bool, interval: float, sessions: list[SessionLoad],
                 latents: int = 1) -> float | None:
        step = self._step(sessions, session, batched, latents)
        if step is None:
            return None
        return _frames_waited(session, batched, latents) * interval + self._wait(session, step) + step

    @staticmethod
    def _wait(session: SessionLoad, step: float) -> float:
        """How long a complete chunk waits for the device: as measured, or before that
        the worst case, the step running when it completed."""
        return session.wait_s if session.wait_s is not None else step

    @staticmethod
    def _interval(session: SessionLoad, cap: float | None) -> float:
        """Seconds between the frames a session's chunks are made of."""
        return 1 / (cap or session.input_fps or session.target_fps)

    # -- frame rates -------------------------------------------------------------------
    def _frame_rate_caps(self, sessions: list[SessionLoad]) -> dict[str, float]:
        """Caps for the sessions that lose frames while demand exceeds the device's time."""
        # Sessions that step together each take a share of the shared step's time.
        costs = {session.id: self._costs(sessions, session, session.stream_batched) for session in sessions}
        # Estimates from first chunks alone would cap rates on a guess; until a steady step
        # is measured the inbox bound and stale-frame drops keep latency in hand.
        if None in costs.values() or not self.cost.steady_measured:
            self._capped.clear()
            return {}

        step = {id: step for id, (step, _) in costs.items()}
        device_time = {id: time for id, (_, time) in costs.items()}

        def load(rates: dict[str, float]) -> float:
            """Share of the device's time these frame rates take."""
            return sum(rates[id] / FRAMES_PER_CHUNK * device_time[id] for id in rates)

        wanted = {session.id: session.input_fps or session.target_fps for session in sessions}
        if load(wanted) <= 1.0:  # the device keeps up, if without DEVICE_SHARE's slack
            self._capped.clear()
            return {}
        self._capped = {session.id for session in sessions if session.dropping or session.id in self._capped}
        guaranteed = {session.id: min(wanted[session.id], session.target_fps) for session in sessions}
        guaranteed_load = load(guaranteed)
        if guaranteed_load > self._device_share:
            # Every session at the same share of its target.
            scale = self._device_share / guaranteed_load
            fair = {id: rate * scale for id, rate in guaranteed.items()}
        else:
            # Targets are met; the time left goes to the frames beyond them, shared alike.
            extra = {id: wanted[id] - guaranteed[id] for id in wanted}
            scale = (self._device_share - guaranteed_load) / load(extra)
            fair = {id: guaranteed[id] + extra[id] * scale for id in wanted}
        caps = {}
        for session in sessions:
            lowest = self._lowest_rate_in_budget(session, step[session.id])
            # Where no rate is enough for the budget, an even cadence would only spread a
            # chunk's frames over a longer time: uncapped, the inbox's newest frames are served.
            if session.id in self._capped and lowest > 0:
                caps[session.id] = max(fair[session.id], lowest)
        return caps

    def _lowest_rate_in_budget(self, session: SessionLoad, step: float) -> float:
        """Below this frame rate a chunk takes too long to fill for the budget (0 when no rate is enough)."""
        spare = session.latency_s - step - self._wait(session, step)
        return _frames_waited(session, session.stream_batched, session.latents) / spare if spare > 0 else 0.0


def _steady(session: SessionLoad, batched: bool | None, latents: int | None = None) -> StepShape:
    return StepShape.steady(session.steps, batched is not False, session.latents if latents is None else latents)


def _frames_waited(session: SessionLoad, batched: bool | None, latents: int) -> int:
    """Frames a chunk's first frame waits for: the chunk's other frames, then the stream batch's lag."""
    chunk_frames = FRAMES_PER_CHUNK * (latents if batched is False else 1)
    return chunk_frames - 1 + _lag_frames(session, batched)


def _lag_frames(session: SessionLoad, batched: bool | None) -> int:
    return stream_lag_frames(session.steps, batched is not False, session.ranks)


def stream_lag_frames(steps: int, stream_batch: bool, ranks: int = 1) -> int:
    """Input frames a stream's outputs trail by. With stream batching a chunk is finished
    steps - 1 forwards after it went in; over N pipeline ranks each slot's next forward is
    N forwards later, and the flow of a forward comes back N - 1 pushes after it went out.
    Without stream batching a chunk's steps follow one another within its push: no lag."""
    if not stream_batch:
        return 0
    return FRAMES_PER_CHUNK * ((steps - 1) * ranks + ranks - 1)


def percentile(values: list[float], percent: int) -> float | None:
    """The percent-th percentile (interpolated), or None of no values."""
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
