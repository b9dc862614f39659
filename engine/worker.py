"""The worker: the one thread that runs work on the device.

It loads the models once (every session of the engine shares them, and one prompt
cache), builds each session's StreamPipeline, and runs steps: one session's chunk of
frames through its pipeline. Parameters a host changed are applied just before the
session's next step, never during one. Which session goes next is the scheduler's call.

A step that fails, out of memory included, fails only its session: the worker drops
that session's pipeline and caches, returns the memory to the device, and goes on
with the others. The IO thread then tells the host and closes the session.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .models.text import PromptCache
from .models.weights import Models
from .pipeline import FRAMES_PER_LATENT, StreamPipeline
from .session import InputFrame, Session, paced_outputs

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.1  # how long the worker sleeps when no session has work, between checks for stop


@dataclass
class _Stream:
    """A session's device-side state."""

    pipeline: StreamPipeline
    # Chunks pushed whose frames have not come out yet, oldest first: at most the
    # stream batch's depth, since each push finishes the oldest.
    in_flight: deque[list[InputFrame]] = field(default_factory=deque)


class Scheduler:
    """Which session the worker serves next: round robin over the sessions with work.

    It stands in for the SLO scheduler (engine/slo.py, not written yet), which will
    also decide how many frames and which sessions share a step.
    """

    def __init__(self) -> None:
        self._last_served: str | None = None

    def pick(self, sessions: list[Session], has_work: Callable[[Session], bool]) -> Session | None:
        ids = [session.id for session in sessions]
        start = ids.index(self._last_served) + 1 if self._last_served in ids else 0
        for session in sessions[start:] + sessions[:start]:
            if has_work(session):
                self._last_served = session.id
                return session
        return None


class Worker:
    """Runs on its own thread: run() until stop is set."""

    def __init__(self, load_models: Callable[[], Models], sessions: Callable[[], list[Session]]):
        self._load_models = load_models
        self._sessions = sessions  # the open sessions, a fresh list on each call
        self._scheduler = Scheduler()
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
        self._load()
        while not stop.is_set():
            self._free_closed_sessions()
            self._work.clear()  # before looking, so a wake() during the look is not lost
            session = self._scheduler.pick(self._sessions(), self._has_work)
            if session is None:
                self._work.wait(IDLE_WAIT_S)
                continue
            failure = None
            try:
                self._advance(session)
            except Exception as error:  # noqa: BLE001 - any failure ends only this session
                failure = _failure_message(session, error)
            if failure is not None:  # out here, the traceback no longer holds the step's tensors
                self._end(session, failure)

    # -- steps -----------------------------------------------------------------------
    def _load(self) -> None:
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
        self.state = "ready"
        log.info("model loaded in %.1f s", time.perf_counter() - started)

    def _has_work(self, session: Session) -> bool:
        if session.id not in self._streams:
            return session.is_active()  # its pipeline is still to build
        return session.has_work()

    def _advance(self, session: Session) -> None:
        """Build the session's pipeline, or run its next chunk if one is complete."""
        if self._models is None:
            raise RuntimeError(f"the model failed to load ({self.load_error}); restart the engine")
        stream = self._streams.get(session.id)
        if stream is None:
            session.take_pending()  # the pipeline starts from the session's current settings
            pipeline = StreamPipeline(self._models.dit, self._models.vae, self._prompts, session.settings,
                                      decoder=self._models.decoder)
            self._streams[session.id] = _Stream(pipeline)
            session.expect_frames(pipeline.next_chunk_frames)
            session.set_state("ready")
            return

        changes = session.take_pending()
        if changes and stream.pipeline.update(**changes):
            stream.in_flight.clear()  # a restart discards the chunks in the stream batch
            session.expect_frames(stream.pipeline.next_chunk_frames)
        chunk = session.take_chunk(frames_after=FRAMES_PER_LATENT)  # every chunk after a first one takes 4
        if chunk is None:
            return
        started = time.perf_counter()
        finished = stream.pipeline.push(np.stack([frame.rgb for frame in chunk]))
        stream.in_flight.append(chunk)
        outputs = []
        if len(finished):
            inputs = stream.in_flight.popleft()
            if len(inputs) != len(finished):
                raise RuntimeError(f"a chunk of {len(inputs)} frames came out as {len(finished)}")
            outputs = paced_outputs(inputs, finished, time.monotonic_ns())
        session.add_outputs(outputs, time.perf_counter() - started)

    # -- memory ------------------------------------------------------------------------
    def _free_closed_sessions(self) -> None:
        open_ids = {session.id for session in self._sessions()}
        closed = [id for id in self._streams if id not in open_ids]
        for id in closed:
            del self._streams[id]
        if closed:
            _release_device_memory()

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
    """Give the memory of dropped pipelines back to the device, so another session can use it."""
    gc.collect()  # caches can sit in reference cycles (a traceback holding a failed step's frames)
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
