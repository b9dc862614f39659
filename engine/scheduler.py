"""The scheduler: what each step runs, decided before the worker runs it.

The worker's loop (engine/worker.py) is three calls, as vLLM splits an engine step
between its scheduler and its workers:

    plan = scheduler.schedule(sessions)   # who steps, with which frames, in which mode
    results = worker.execute(plan)        # the device's part: pipelines, one push_streams
    scheduler.apply(plan, results)        # outputs into the outboxes, the cost model taught

The scheduler owns everything about a stream but its pipeline: whether the stream
exists, the settings and mode it runs with, whether it has started, and its chunks in
flight (their input frames, which its outputs are paired with and paced by). The SLO
policy (engine/slo.py) decides which sessions step together, each one's mode, chunk
size and frame-rate cap; the scheduler turns that into a :class:`StepPlan`: for each
session in the step, the parameter changes to apply (and whether they restart the
stream), the frames of its next chunk, and the step's shape for the cost model.

It meets a session through three locked calls: ``load`` (what the policy needs, with
the parameter changes the host made), ``claim`` (the policy's choice for it and, when
it steps, its changes and its chunk taken out of its inbox) and ``record`` (the step's
outcome). The worker never touches a session; a plan's results are applied here alone.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .pipeline import FRAMES_PER_LATENT, StreamSettings, restarts_stream
from .session import Claim, InputFrame, Session, paced_outputs
from .slo import Choice, CostModel, SessionLoad, SloPolicy, StepShape

log = logging.getLogger(__name__)


@dataclass
class StreamStep:
    """One session's part of a step: what the worker does with its stream."""

    session: Session
    settings: StreamSettings  # the stream's settings once the changes are applied
    build: bool = False  # make the stream's pipeline with ``settings`` (nothing is pushed in this step)
    changes: dict[str, Any] = field(default_factory=dict)  # to apply to the pipeline before its chunk
    restarts: bool = False  # the changes restart the stream: its chunks in flight are dropped
    chunk: list[InputFrame] | None = None  # frames to push, or None for none this step
    shape: StepShape | None = None  # the chunk's shape, for the cost model


@dataclass
class StepPlan:
    steps: list[StreamStep]  # earliest deadline first; empty when no session has work
    streams: set[str]  # the sessions whose streams exist after the plan's builds: the worker frees the others
    choices: dict[str, Choice] = field(default_factory=dict)  # every open session's: mode, chunk size, cap


@dataclass
class StreamResult:
    """What came of one StreamStep: the frames its chunk finished (maybe none, while the
    stream batch fills), or why the session failed."""

    finished: np.ndarray | None = None
    failure: str | None = None


@dataclass
class StepResults:
    streams: list[StreamResult]  # one per step of the plan, in its order
    seconds: float | None = None  # the chunks' time on the device (perf_counter); None when none ran
    span_ns: tuple[int, int] | None = None  # when they ran, on the sessions' clock (monotonic_ns)


@dataclass
class _Stream:
    """What the scheduler keeps of a session's stream."""

    settings: StreamSettings  # what its pipeline runs with
    started: bool = False  # its first chunk was pushed
    latents: int = 1  # latent frames in its last chunk after the first
    # Chunks pushed whose frames have not come out yet, oldest first: at most the
    # stream batch's depth, since each push finishes the oldest.
    in_flight: deque[list[InputFrame]] = field(default_factory=deque)


class Scheduler:
    def __init__(self):
        self.policy = SloPolicy(CostModel())
        self._streams: dict[str, _Stream] = {}
        self._sessions: list[Session] = []  # the last plan's, open and not failed

    def schedule(self, sessions: list[Session]) -> StepPlan:
        """Plan a step for the open sessions: each gets the policy's choice (its frame-rate cap
        applies at once); those in the step also have their work taken from them now."""
        loads, changes = {}, {}
        for session in sessions:
            stream = self._streams.get(session.id)
            in_flight = stream.in_flight[0][0].t_capture_ns if stream and stream.in_flight else None
            snapshot = session.load(stream.settings.stream_batch if stream else None, in_flight,
                                    stream.latents if stream else 1)
            if snapshot is not None:
                loads[session.id], changes[session.id] = snapshot
        self._sessions = [session for session in sessions if session.id in loads]
        for id in set(self._streams) - set(loads):
            del self._streams[id]  # a closed or failed session's: the worker frees its pipeline
        plan = self.policy.plan(list(loads.values()))
        by_id = {session.id: session for session in self._sessions}
        steps = [self._step(by_id[id], plan.choices[id], changes[id], loads[id]) for id in plan.batch]
        for id in set(loads) - set(plan.batch):
            by_id[id].claim(Claim(plan.choices[id]))
        return StepPlan([step for step in steps if step is not None],
                        set(self._streams) | {step.session.id for step in steps if step and step.build}, plan.choices)

    def _step(self, session: Session, choice: Choice, changes: dict[str, Any], load: SessionLoad
              ) -> StreamStep | None:
        """The session's part of the step (None: nothing to do yet), its work claimed from it."""
        stream = self._streams.get(session.id)
        if stream is None:  # the first step builds the pipeline, from the host's settings
            settings = replace(session.settings, stream_batch=choice.stream_batched)
            session.claim(Claim(choice, changes, stream_batch=choice.stream_batched,
                                frames_needed=settings.first_chunk_frames))
            return StreamStep(session, settings, build=True)

        changes = dict(changes)
        if stream.settings.stream_batch != choice.stream_batched:
            log.info("session %s: stream batching %s for its latency budget; the stream restarts",
                     session.id, "on" if choice.stream_batched else "off")
            changes["stream_batch"] = choice.stream_batched
        restarts = restarts_stream(stream.settings, changes)
        returned = []
        if restarts:  # the chunks in the stream batch are dropped: their frames go round again
            returned = [frame for chunk in stream.in_flight for frame in chunk]
            stream.in_flight.clear()
            stream.started, stream.latents = False, 1
        stream.settings = replace(stream.settings, **changes)
        # Chunks after the first take 4 frames, or 8 where the policy chose 2 latent frames.
        steady_frames = FRAMES_PER_LATENT * (1 if stream.settings.stream_batch else choice.latents)
        chunk = session.claim(Claim(
            choice, changes, stream_batch=choice.stream_batched, returned=returned,
            frames_needed=steady_frames if stream.started else stream.settings.first_chunk_frames,
            take_chunk=True, frames_after=steady_frames,
            stale_before_ns=self.policy.stale_before_ns(load, time.monotonic_ns())))
        if chunk is None and not changes:
            return None
        step = StreamStep(session, stream.settings, changes=changes, restarts=restarts, chunk=chunk)
        if chunk is not None:
            steps = stream.settings.steps
            if stream.started:
                stream.latents = len(chunk) // FRAMES_PER_LATENT
                step.shape = StepShape.steady(steps, stream.settings.stream_batch, stream.latents)
            else:
                step.shape = StepShape.first_chunk(steps, len(chunk))
        return step

    def apply(self, plan: StepPlan, results: StepResults) -> None:
        """The step's outcome, into the sessions and the cost model: outputs paired with the
        inputs they came from and paced, the streams built and started, the failures told."""
        if results.span_ns is not None and any(step.shape and step.shape.first for step in plan.steps):
            for session in self._sessions:  # a first chunk's time on the device is no one's wait
                session.excuse_wait(*results.span_ns)
        shared = sum(step.chunk is not None for step in plan.steps) > 1
        failed = False
        for step, result in zip(plan.steps, results.streams):
            session = step.session
            if result.failure is None:
                try:
                    self._record(step, result, results.seconds, shared)
                    continue
                except Exception as error:  # noqa: BLE001 - any failure ends only this session
                    result.failure = f"{type(error).__name__}: {error}; the session is closed"
                    log.error("session %s failed: %s", session.id, result.failure)
            failed |= step.chunk is not None
            self._streams.pop(session.id, None)
            session.fail(result.failure)
        shapes = [step.shape for step in plan.steps if step.shape is not None]
        if shapes and results.seconds is not None and not failed:  # a failed step says nothing of the device
            self.policy.cost.observe(StepShape.together(shapes), results.seconds)

    def _record(self, step: StreamStep, result: StreamResult, seconds: float | None, shared: bool) -> None:
        session = step.session
        if step.build:
            self._streams[session.id] = _Stream(step.settings)
            session.record(built=True)
            return
        if step.chunk is None:
            return
        stream = self._streams[session.id]
        stream.started = True
        stream.in_flight.append(step.chunk)
        outputs = []
        if len(result.finished):
            inputs = stream.in_flight.popleft()
            if len(inputs) != len(result.finished):
                raise RuntimeError(f"a chunk of {len(inputs)} frames came out as {len(result.finished)}")
            outputs = paced_outputs(inputs, result.finished, time.monotonic_ns())
        session.record(outputs=outputs, step_seconds=seconds, shared=shared)
