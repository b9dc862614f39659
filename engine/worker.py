"""The worker: the one thread that runs work on the device.

It loads the models once (every session of the engine shares them, and one prompt
cache), holds each session's StreamPipeline, and runs the steps the scheduler plans
(engine/scheduler.py): each loop is ``schedule``, ``execute``, ``apply``. Executing a
plan builds the pipelines it asks for, applies parameter changes (a restart among them)
just before the session's next chunk, never during one, and runs the plan's chunks
through their pipelines, the pipelines' DiT calls of one size as one forward
(engine/pipeline.py, push_streams). The worker never touches a session: what came of
each step goes back to the scheduler, which applies it.

Once the models are loaded, a throwaway stream at the engine's default settings runs a
few steps in each mode before any session is served, which starts the SLO policy's cost
model from steady steps (the scheduler teaches it every step's time from then on).

A step that fails, out of memory included, fails only the session that caused it:
the worker drops that session's pipeline and caches, returns the memory to the device,
and goes on with the others. The scheduler then fails the session, and the IO thread
tells the host and closes it.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import traceback
from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from .models.lora import LoraLibrary
from .models.text import PromptCache
from .models.weights import Models
from .pipeline import FRAMES_PER_LATENT, StreamPipeline, StreamSettings, push_streams
from .scheduler import Scheduler, StepPlan, StepResults, StreamResult, StreamStep
from .session import Session
from .slo import WARM_UP_STEPS, StepShape

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.1  # how long the worker sleeps when no session has work, between checks for stop


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
        self.scheduler = Scheduler()
        self._work = threading.Event()  # set by the IO thread when a session may have work
        self._pipelines: dict[str, StreamPipeline] = {}  # by session
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
            self._work.clear()  # before looking, so a wake() during the look is not lost
            plan = self.scheduler.schedule(self._sessions())
            self._free_streams_but(plan.streams)
            if not plan.steps:
                self._work.wait(IDLE_WAIT_S)
                continue
            self.scheduler.apply(plan, self.execute(plan))

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
                        self.scheduler.policy.cost.observe(shape, time.perf_counter() - step_started)
        except Exception as error:  # noqa: BLE001 - the sessions' own steps teach the cost model instead
            log.warning("warming up failed (%s: %s); the first sessions' steps teach the scheduler instead",
                        type(error).__name__, error)
        finally:
            _release_device_memory()
        log.info("warmed up in %.1f s", time.perf_counter() - started)

    def execute(self, plan: StepPlan) -> StepResults:
        """Run a plan's steps: build the pipelines it asks for, apply the changes, then push
        the chunks together. A failure fails only its session's step; the worker drops that
        pipeline and gives its memory back."""
        results = [StreamResult() for _ in plan.steps]
        if self._models is None:
            for result in results:
                result.failure = f"the model failed to load ({self.load_error}); restart the engine"
            return StepResults(results)
        pushed = []  # indices of the steps with a chunk to push
        for index, step in enumerate(plan.steps):
            try:
                self._prepare(step)
            except Exception as error:  # noqa: BLE001 - any failure ends only this session
                results[index].failure = _failure_message(step.session, error)
                continue
            if step.chunk is not None:
                pushed.append(index)
        outcome = StepResults(results)
        if pushed:
            # The step's time for the cost model on perf_counter, fine-grained everywhere (monotonic
            # ticks every 15.6 ms on Windows before Python 3.13); its span on the sessions' clock.
            started, started_ns = time.perf_counter(), time.monotonic_ns()
            finished = push_streams([self._pipelines[plan.steps[index].session.id] for index in pushed],
                                    [np.stack([frame.rgb for frame in plan.steps[index].chunk]) for index in pushed])
            outcome.seconds, outcome.span_ns = time.perf_counter() - started, (started_ns, time.monotonic_ns())
            for index, frames in zip(pushed, finished):
                if isinstance(frames, Exception):
                    results[index].failure = _failure_message(plan.steps[index].session, frames)
                    frames.__traceback__ = None  # it holds the failed step's pipeline and tensors
                else:
                    results[index].finished = frames
        failed = [step.session.id for step, result in zip(plan.steps, results) if result.failure is not None]
        if failed:  # out here, no frame of the step holds the failed pipelines any more
            for id in failed:
                self._pipelines.pop(id, None)
            _release_device_memory()
        return outcome

    def _prepare(self, step: StreamStep) -> None:
        """Build the stream's pipeline, or apply its changes before its chunk."""
        id = step.session.id
        if step.build:
            self._pipelines[id] = StreamPipeline(self._models.runs_dit, self._models.vae, self._prompts,
                                                 step.settings, decoder=self._models.decoder, loras=self._loras)
        elif step.changes:
            restarted = self._pipelines[id].update(**step.changes)
            if restarted != step.restarts:  # the scheduler's view of the stream and the pipeline differ
                raise RuntimeError(f"the stream {'restarted' if restarted else 'did not restart'} for the changes "
                                   f"{sorted(step.changes)}, against the plan")

    # -- memory ------------------------------------------------------------------------
    def _free_streams_but(self, streams: set[str]) -> None:
        """Drop the pipelines of the sessions closed or failed since the last plan."""
        closed = [id for id in self._pipelines if id not in streams]
        for id in closed:
            del self._pipelines[id]  # its caches go with it, by reference counting: pipelines hold no cycles
        # No gc.collect() here: a full collection holds the GIL for a tenth of a second or more, stalling
        # every other session, and hosts that come and go would bring one each (tests/test_server.py
        # checks that a closed session's pipeline is freed without one).
        if closed and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


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
