"""The scheduler plans a step and the worker only executes it (engine/scheduler.py).

The scheduler is tested here without a device: its plans are plain data, and the
results a worker would return are made by hand. The worker is tested the other way
round: it runs a plan made by hand on the tiny model.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from bridge import params as table
from engine.models.weights import build_models
from engine.pipeline import StreamPipeline, StreamSettings
from engine.scheduler import Scheduler, StepPlan, StepResults, StreamResult, StreamStep
from engine.session import InputFrame, Session, session_routes
from engine.worker import Worker

SIZE = 32
SETTINGS = StreamSettings(height=SIZE, width=SIZE, steps=2)


def new_session(id: str = "s1", settings: StreamSettings = SETTINGS) -> Session:
    return Session(id, None, "shm", SIZE, SIZE, settings, {}, session_routes("shm", table.defaults()), "starting")


def put_frames(session: Session, count: int, first_seq: int = 0) -> None:
    for seq in range(first_seq, first_seq + count):
        session.put(InputFrame(np.full((SIZE, SIZE, 3), seq % 256, np.uint8), "rgb8", seq, time.monotonic_ns()))


def run_plan(scheduler: Scheduler, plan: StepPlan, finished: dict[str, int]) -> None:
    """Apply a plan as if a worker ran it: each chunk finishes ``finished[id]`` frames."""
    results = []
    for step in plan.steps:
        count = finished.get(step.session.id, 0) if step.chunk is not None else 0
        results.append(StreamResult(finished=np.zeros((count, SIZE, SIZE, 3), np.uint8)))
    scheduler.apply(plan, StepResults(results, seconds=0.01, span_ns=(time.monotonic_ns(), time.monotonic_ns())))


def test_a_new_session_is_built_then_steps_its_first_chunk_then_steady_chunks():
    scheduler, session = Scheduler(), new_session()
    plan = scheduler.schedule([session])
    [build] = plan.steps
    assert build.build and build.chunk is None and build.settings.height == SIZE
    assert plan.streams == {"s1"}
    run_plan(scheduler, plan, {})
    assert session.state == "ready"

    assert scheduler.schedule([session]).steps == []  # no complete chunk yet
    put_frames(session, SETTINGS.first_chunk_frames)
    [first] = scheduler.schedule([session]).steps
    assert [frame.seq for frame in first.chunk] == list(range(5))
    assert first.shape.first and not first.build and first.changes == {}
    run_plan(scheduler, StepPlan([first], {"s1"}), {})  # the stream batch fills: nothing finished

    put_frames(session, 4, first_seq=5)
    [steady] = scheduler.schedule([session]).steps
    assert [frame.seq for frame in steady.chunk] == [5, 6, 7, 8] and not steady.shape.first
    run_plan(scheduler, StepPlan([steady], {"s1"}), {"s1": 5})  # the first chunk's frames come out
    outputs = []
    while (output := session.due_output(time.monotonic_ns() + 10**10)) is not None:
        outputs.append(output.seq)
        session.output_sent(output)
    assert outputs == [0, 1, 2, 3, 4]  # paired with the inputs they came from
    assert session.state == "streaming"


def test_a_restarting_change_returns_the_frames_in_flight_and_takes_a_first_chunk():
    scheduler, session = Scheduler(), new_session()
    run_plan(scheduler, scheduler.schedule([session]), {})
    put_frames(session, 5)
    run_plan(scheduler, scheduler.schedule([session]), {})
    put_frames(session, 4, first_seq=5)
    run_plan(scheduler, scheduler.schedule([session]), {})  # chunks [0..4] and [5..8] in flight

    assert session.change(replace(session.settings, steps=3), {}, session.routes)  # a reload
    [step] = scheduler.schedule([session]).steps
    assert step.changes == {"steps": 3} and step.restarts
    # The frames in flight went back to the front of the inbox: the first chunk of the new stream.
    assert [frame.seq for frame in step.chunk] == [0, 1, 2, 3, 4] and step.shape.first
    assert step.settings.steps == 3 and session.stats()["frames_waiting"] == 4


def test_a_live_change_applies_without_a_chunk_and_keeps_the_stream():
    scheduler, session = Scheduler(), new_session()
    run_plan(scheduler, scheduler.schedule([session]), {})
    put_frames(session, 5)
    run_plan(scheduler, scheduler.schedule([session]), {})
    assert not session.change(replace(session.settings, prompt="a new one"), {}, session.routes)
    [step] = scheduler.schedule([session]).steps
    assert step.changes == {"prompt": "a new one"} and not step.restarts and step.chunk is None
    run_plan(scheduler, StepPlan([step], {"s1"}), {})
    assert scheduler.schedule([session]).steps == []  # applied once


def test_a_change_made_while_planning_waits_for_the_next_step(monkeypatch):
    """The scheduler takes the changes it planned with; a newer one is not lost."""
    scheduler, session = Scheduler(), new_session()
    run_plan(scheduler, scheduler.schedule([session]), {})
    load = session.load

    def load_then_host_changes(*args, **kwargs):
        snapshot = load(*args, **kwargs)
        session.change(replace(session.settings, strength=0.5), {}, session.routes)
        return snapshot

    session.change(replace(session.settings, prompt="first"), {}, session.routes)
    monkeypatch.setattr(session, "load", load_then_host_changes)
    [step] = scheduler.schedule([session]).steps
    assert step.changes == {"prompt": "first"}
    monkeypatch.undo()
    run_plan(scheduler, StepPlan([step], {"s1"}), {})
    [later] = scheduler.schedule([session]).steps
    assert later.changes == {"strength": 0.5}


def test_a_failed_step_fails_its_session_and_forgets_its_stream():
    scheduler, session = Scheduler(), new_session()
    run_plan(scheduler, scheduler.schedule([session]), {})
    put_frames(session, 5)
    plan = scheduler.schedule([session])
    scheduler.apply(plan, StepResults([StreamResult(failure="it broke")], seconds=0.01))
    assert session.state == "error" and session.failure == "it broke"
    assert scheduler.schedule([session]).streams == set()  # the worker frees its pipeline
    assert scheduler.policy.cost.predict(plan.steps[0].shape) is None  # a failed step's time teaches nothing


def test_a_closed_sessions_stream_is_freed_by_the_next_plan():
    scheduler, session = Scheduler(), new_session()
    run_plan(scheduler, scheduler.schedule([session]), {})
    session.close()
    plan = scheduler.schedule([session])
    assert plan.steps == [] and plan.streams == set()


@pytest.fixture(scope="module")
def worker():
    models = build_models("tiny", seed=0)
    worker = Worker(lambda: models, lambda: [])
    worker._load(stop=None)
    return worker


def test_the_worker_executes_a_plan_made_by_hand(worker):
    """Build, first chunk, then a steady chunk of a 1-step stream: the frames equal those of
    the pipeline pushed directly, and a failing build fails only its step."""
    session = new_session("w", replace(SETTINGS, steps=1))
    settings = replace(SETTINGS, steps=1)
    frames = [InputFrame(np.full((SIZE, SIZE, 3), 25 * seq, np.uint8), "rgb8", seq, seq) for seq in range(9)]
    bad = new_session("bad")
    results = worker.execute(StepPlan([StreamStep(session, settings, build=True),
                                       StreamStep(bad, replace(settings, loras=(("missing", 1.0),)), build=True)],
                                      {"w", "bad"}))
    assert results.streams[0].failure is None and "LoRA" in results.streams[1].failure
    assert set(worker._pipelines) == {"w"}  # the failed build holds nothing
    first = worker.execute(StepPlan([StreamStep(session, settings, chunk=frames[:5])], {"w"})).streams[0]
    steady = worker.execute(StepPlan([StreamStep(session, settings, chunk=frames[5:])], {"w"}))

    direct = StreamPipeline(worker._models.runs_dit, worker._models.vae, worker._prompts, settings,
                            decoder=worker._models.decoder)
    expected = [direct.push(np.stack([frame.rgb for frame in chunk])) for chunk in (frames[:5], frames[5:])]
    np.testing.assert_array_equal(first.finished, expected[0])
    np.testing.assert_array_equal(steady.streams[0].finished, expected[1])
    assert steady.seconds > 0 and steady.span_ns[1] >= steady.span_ns[0]
