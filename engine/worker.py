"""The worker: the one thread that runs work on the device.

It loads the models once (every session of the engine shares them, and one prompt
cache), builds each session's StreamPipeline, and runs steps: a chunk of frames of
each session in the step through its pipeline, the pipelines' DiT calls of one size
run as one forward (engine/pipeline.py, push_streams). Parameters a host changed are
applied just before the session's next step, never during one.

Before each step the SLO policy (engine/slo.py) plans: which sessions step together,
the mode each pipeline runs in (a change restarts that stream; the frames it had in
flight go back to the session's inbox), and each session's frame-rate cap. Every
step's time is measured and teaches the policy's cost model, which starts from a
warm-up: once the models are loaded, a throwaway stream at the engine's default
settings runs a few steps in each mode before any session is served.

A step that fails, out of memory included, fails only the session that caused it:
the worker drops that session's pipeline and caches, returns the memory to the device,
and goes on with the others. The IO thread then tells the host and closes the session.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from .models.lora import LoraLibrary
from .models.text import PromptCache
from .models.weights import Models
from .pipeline import FRAMES_PER_LATENT, StreamPipeline, StreamSettings, push_streams
from .session import InputFrame, Session, paced_outputs
from .slo import WARM_UP_STEPS, Choice, CostModel, SessionLoad, SloPolicy, StepShape

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.1  # how long the worker sleeps when no session has work, between checks for stop


@dataclass
class _Stream:
    """A session's device-side state."""

    pipeline: StreamPipeline
    # Chunks pushed whose frames have not come out yet, oldest first: at most the
    # stream batch's depth, since each push finishes the oldest.
    in_flight: deque[list[InputFrame]] = field(default_factory=deque)
    latents: int = 1  # latent frames in its last chunk after the first


class Worker:
    """Runs on its own thread: run() until stop is set."""

    def __init__(self, load_models: Callable[[], Models], sessions: Callable[[], list[Session]],
                 warm_up: StreamSettings | None = None, loras: LoraLibrary | None = None):
        """warm_up: the settings of the throwaway stream run once the models are loaded (the
        engine's defaults), or None for none. loras: where the sessions' LoRA adapters are read."""
        self._load_models = load_models
        self._loras = loras
        self._sessions = sessions  # the open sessions, a fresh list on each call
        self._warm_up_settings = warm_up
        self._policy = SloPolicy(CostModel())
        self._work = threading.Event()  # set by the IO thread when a session may have work
        self._streams: dict[str, _Stream] = {}
        self._models: Models | None = None
        self._prompts: PromptCache | None = None
        self.state = "starting"  # then loading, then ready or error
        self.load_error: str | None = None

    def wake(self) -> None:
        """Tell the worker a session may have work (frames, parameters, a new session)."""
        self._work.set()

    def run(self, stop: threading.Event) -> None:
        self._load(stop)
        while not stop.is_set():
            self._free_closed_sessions()
            self._work.clear()  # before looking, so a wake() during the look is not lost
            planned = self._plan()
            if not planned:
                self._work.wait(IDLE_WAIT_S)
                continue
            failed = self._step(planned)
            # Out here, no frame of the step holds the failed pipelines any more.
            for session, message in failed:
                self._end(session, message)

    # -- steps -----------------------------------------------------------------------
    def _load(self, stop: threading.Event) -> None:
        self.state = "loading"
        started = time.perf_counter()
        try:
            self._models = self._load_models()
        except Exception as error:  # noqa: BLE001 - reported to every host, the engine stays up
            self.load_error = f"{type(error).__name__}: {error}"
            self.state = "error"
            log.error("the model failed to load: %s", self.load_error)
            return
        self._prompts = PromptCache(self._models.text_encoder)
        log.info("model loaded in %.1f s", time.perf_counter() - started)
        if self._warm_up_settings is not None:
            self._warm_up(self._warm_up_settings, stop)
        self.state = "ready"

    def _warm_up(self, settings: StreamSettings, stop: threading.Event) -> None:
        """A throwaway stream at the engine's default settings, in both modes, before any session:
        the device makes its kernels for them (a GPU's first forwards of a shape are far slower,
        which would otherwise fall on the first session's first frame), and the cost model starts
        from steady steps measured in both modes, which tell its time per forward from its time
        per latent row, so the first plans already predict (engine/slo.py). A stop asked for
        meanwhile ends it after the step in progress, so the engine stops promptly."""
        log.info("warming up: a %dx%d stream in both modes ...", settings.width, settings.height)
        started = time.perf_counter()
        try:
            for stream_batch in (True, False):
                pipeline = StreamPipeline(self._models.runs_dit, self._models.vae, self._prompts,
                                          replace(settings, stream_batch=stream_batch), decoder=self._models.decoder,
                                          loras=self._loras)
                pipeline.push(np.zeros((pipeline.next_chunk_frames, settings.height, settings.width, 3), np.uint8))
                shape = StepShape.steady(settings.steps, stream_batch)
                for index in range(WARM_UP_STEPS):
                    if stop.is_set():
                        return
                    step_started = time.perf_counter()
                    pipeline.push(np.zeros((FRAMES_PER_LATENT, settings.height, settings.width, 3), np.uint8))
                    if index:  # the first steady step makes its shape's kernels
                        self._policy.cost.observe(shape, time.perf_counter() - step_started)
        except Exception as error:  # noqa: BLE001 - the sessions' own steps teach the cost model instead
            log.warning("warming up failed (%s: %s); the first sessions' steps teach the scheduler instead",
                        type(error).__name__, error)
        finally:
            _release_device_memory()
        log.info("warmed up in %.1f s", time.perf_counter() - started)

    def _has_work(self, session: Session) -> bool:
        if session.id not in self._streams:
            return session.is_active()  # its pipeline is still to build
        return session.has_work()

    def _plan(self) -> list[tuple[Session, SessionLoad, Choice]]:
        """Ask the policy for a plan and give each session its choice (its frame-rate cap
        applies at once); the sessions to step together, with what the policy knew and chose."""
        sessions = [session for session in self._sessions() if session.is_active()]
        loads = {}
        for session in sessions:
            stream = self._streams.get(session.id)
            in_flight = stream.in_flight[0][0].t_capture_ns if stream is not None and stream.in_flight else None
            mode = stream.pipeline.settings.stream_batch if stream is not None else None
            latents = stream.latents if stream is not None else 1
            loads[session.id] = session.slo_load(mode, self._has_work(session), in_flight, latents)
        plan = self._policy.plan(list(loads.values()))
        for session in sessions:
            session.set_choice(plan.choices[session.id])
        by_id = {session.id: session for session in sessions}
        return [(by_id[id], loads[id], plan.choices[id]) for id in plan.batch]

    def _step(self, planned: list[tuple[Session, SessionLoad, Choice]]) -> list[tuple[Session, str]]:
        """Build the pipelines still to build, and run the others' complete chunks together.
        Returns the sessions that failed, with what to tell their hosts."""
        if self._models is None:
            return [(session, f"the model failed to load ({self.load_error}); restart the engine")
                    for session, _, _ in planned]
        failed = []
        steps = []  # (session, stream, chunk, shape)
        for session, load, choice in planned:
            try:
                step = self._prepare(session, load, choice)
            except Exception as error:  # noqa: BLE001 - any failure ends only this session
                failed.append((session, _failure_message(session, error)))
                continue
            if step is not None:
                steps.append(step)
        if not steps:
            return failed
        # The step's time for the cost model on perf_counter, fine-grained everywhere (monotonic
        # ticks every 15.6 ms on Windows before Python 3.13); its span on the sessions' clock.
        started, started_ns = time.perf_counter(), time.monotonic_ns()
        results = push_streams([stream.pipeline for _, stream, _, _ in steps],
                               [np.stack([frame.rgb for frame in chunk]) for _, _, chunk, _ in steps])
        seconds, ended_ns = time.perf_counter() - started, time.monotonic_ns()
        if any(shape.first for _, _, _, shape in steps):
            for session in self._sessions():
                session.excuse_wait(started_ns, ended_ns)
        step_failed = False
        for (session, stream, chunk, _), finished in zip(steps, results):
            if isinstance(finished, Exception):
                failed.append((session, _failure_message(session, finished)))
                finished.__traceback__ = None  # it holds the failed step's pipeline and tensors
                step_failed = True
                continue
            try:
                self._finish(session, stream, chunk, finished, seconds, shared=len(steps) > 1)
            except Exception as error:  # noqa: BLE001 - any failure ends only this session
                failed.append((session, _failure_message(session, error)))
        if not step_failed:  # a failed step's time says nothing of the device's speed
            self._policy.cost.observe(StepShape.together([shape for _, _, _, shape in steps]), seconds)
        return failed

    def _prepare(self, session: Session, load: SessionLoad, choice: Choice
                 ) -> tuple[Session, _Stream, list[InputFrame], StepShape] | None:
        """Build the session's pipeline, or apply its changes and take its next chunk if one is complete."""
        stream = self._streams.get(session.id)
        if stream is None:
            session.take_pending()  # the pipeline starts from the session's current settings
            session.set_stream_batch(choice.stream_batched)
            pipeline = StreamPipeline(self._models.runs_dit, self._models.vae, self._prompts, session.settings,
                                      decoder=self._models.decoder, loras=self._loras)
            self._streams[session.id] = _Stream(pipeline)
            session.expect_frames(pipeline.next_chunk_frames)
            session.set_state("ready")
            return None

        changes = session.take_pending()
        if stream.pipeline.settings.stream_batch != choice.stream_batched:
            log.info("session %s: stream batching %s for its latency budget; the stream restarts",
                     session.id, "on" if choice.stream_batched else "off")
            session.set_stream_batch(choice.stream_batched)
            changes["stream_batch"] = choice.stream_batched
        if changes and stream.pipeline.update(**changes):
            # A restart discards the chunks in the stream batch; their frames go round again.
            returned = [frame for chunk in stream.in_flight for frame in chunk]
            stream.in_flight.clear()
            stream.latents = 1
            session.expect_frames(stream.pipeline.next_chunk_frames, returned)
        pipeline = stream.pipeline
        # Chunks after the first take 4 frames, or 8 where the policy chose 2 latent frames.
        steady_frames = FRAMES_PER_LATENT * (1 if pipeline.settings.stream_batch else choice.latents)
        if pipeline.started and session.frames_needed != steady_frames:
            session.expect_frames(steady_frames)
        stale_before_ns = self._policy.stale_before_ns(load, time.monotonic_ns())
        chunk = session.take_chunk(frames_after=steady_frames, stale_before_ns=stale_before_ns)
        if chunk is None:
            return None
        if pipeline.started:
            stream.latents = len(chunk) // FRAMES_PER_LATENT
            shape = StepShape.steady(pipeline.settings.steps, pipeline.settings.stream_batch, stream.latents)
        else:
            shape = StepShape.first_chunk(pipeline.settings.steps, len(chunk))
        return session, stream, chunk, shape

    @staticmethod
    def _finish(session: Session, stream: _Stream, chunk: list[InputFrame], finished: np.ndarray,
                seconds: float, shared: bool) -> None:
        stream.in_flight.append(chunk)
        outputs = []
        if len(finished):
            inputs = stream.in_flight.popleft()
            if len(inputs) != len(finished):
                raise RuntimeError(f"a chunk of {len(inputs)} frames came out as {len(finished)}")
            outputs = paced_outputs(inputs, finished, time.monotonic_ns())
        session.add_outputs(outputs, seconds, shared)

    # -- memory ------------------------------------------------------------------------
    def _free_closed_sessions(self) -> None:
        open_ids = {session.id for session in self._sessions()}
        closed = [id for id in self._streams if id not in open_ids]
        for id in closed:
            del self._streams[id]  # its pipeline goes with it, by reference counting: pipelines hold no cycles
        # No gc.collect() here: a full collection holds the GIL for a tenth of a second or more, stalling
        # every other session, and hosts that come and go would bring one each (tests/test_server.py
        # checks that a closed session's pipeline is freed without one).
        if closed and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def _end(self, session: Session, failure: str) -> None:
        """Drop a failed session's pipeline and give its memory back before telling the host."""
        self._streams.pop(session.id, None)
        _release_device_memory()
        session.fail(failure)


def _failure_message(session: Session, error: Exception) -> str:
    """What the host is told (and the log says, with the traceback) when its session fails."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        message = (f"the device ran out of memory ({error}); the session is closed and its memory freed. "
                   "Open a new one with a smaller model_width/model_height or fewer steps")
    else:
        message = f"{type(error).__name__}: {error}; the session is closed and its memory freed"
    # The traceback goes into the log as text: a record holding the exception itself
    # would keep the failed step's tensors alive for as long as a handler keeps the record.
    log.error("session %s failed: %s\n%s", session.id, message, "".join(traceback.format_exception(error)))
    return message


def _release_device_memory() -> None:
    """Give the memory of failed or thrown-away pipelines back to the device, so another session can use it."""
    gc.collect()  # caches can sit in reference cycles (a traceback holding a failed step's frames)
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
