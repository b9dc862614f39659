"""The static, graph-ready steady step (engine/static_step.py) on the tiny preset, CPU, float32.

``LocalExecutor(cuda_graphs=True)`` runs every steady DiT call (one stream, its cache full)
on buffers that stay put; on the CPU eagerly, on a GPU as a replayed CUDA graph. It must
give exactly today's frames, allocate nothing while it prepares a step, and keep its
buffers where they are."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.executor import LocalExecutor
from engine.models.weights import build_models
from engine.pipeline import StreamPipeline, StreamSettings
from test_pipeline import clip


@pytest.fixture(scope="module")
def models():
    return build_models("tiny")


def run(pipe: StreamPipeline, chunks: int, changes: dict[int, dict] | None = None) -> np.ndarray:
    """Push ``chunks`` chunks of the clip, applying ``changes[c]`` before chunk c; all frames out."""
    video, at, outputs = clip(5 + 8 * chunks), 0, []
    for chunk in range(chunks):
        if chunk in (changes or {}):
            pipe.update(**changes[chunk])
        size = pipe.next_chunk_frames
        outputs.append(pipe.push(video[at:at + size]))
        at += size
    return np.concatenate(outputs)


def pipeline(models, executor, **settings) -> StreamPipeline:
    settings = dict(height=32, width=48, prompt="a cat") | settings
    return StreamPipeline(executor, models.vae, models.text_encoder, StreamSettings(**settings))


SCENARIOS = {
    "stream batch, 2 steps": (dict(steps=2), 10, None),
    "stream batch, 4 steps": (dict(steps=4), 12, None),
    "no batch": (dict(steps=2, stream_batch=False), 8, None),
    "prompt change": (dict(steps=2, transition_frames=8), 12, {6: dict(prompt="a dog")}),
    "reload, steps 2 -> 3": (dict(steps=2), 15, {4: dict(steps=3)}),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_static_step_gives_the_eager_steps_frames(models, name):
    settings, chunks, changes = SCENARIOS[name]
    eager = run(pipeline(models, LocalExecutor(models.dit), **settings), chunks, changes)
    static = LocalExecutor(models.dit, cuda_graphs=True)
    pipe = pipeline(models, static, **settings)
    frames = run(pipe, chunks, changes)
    np.testing.assert_array_equal(frames, eager)
    # The static path ran, on the stream's cache as it is now (after a reload, the new one's).
    steps = static.static_steps.all()
    assert steps and sum(step.runs for step in steps) >= 3
    assert all(cache is pipe.cache for cache in static.static_steps._steps.keys())
    if settings.get("stream_batch", True):  # a fresh frame in a full cache: the sink replacement ran
        assert any(signature[3] for signature in static.static_steps._steps[pipe.cache])


class CountAllocations(TorchDispatchMode):
    """Counts the torch operations that make a new tensor: every op whose result aliases
    no input (so not a view, not an in-place or out= op: ``copy_`` into a buffer is not
    counted), plus ``lift_fresh``, through which ``torch.tensor(...)`` hands over the
    tensor it made. Ops inside the DiT's forward (``CausalWanDiT.compute``) are not
    counted: on a GPU they are the captured graph, whose memory is its own pool."""

    def __init__(self):
        super().__init__()
        self.allocations: list[str] = []
        self.in_forward = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        new_tensor = any(ret.alias_info is None and "Tensor" in str(ret.type) for ret in func._schema.returns)
        if not self.in_forward and (new_tensor or func.__name__.startswith("lift_fresh")):
            self.allocations.append(func.__name__)
        return func(*args, **(kwargs or {}))


class CountingExecutor(LocalExecutor):
    """A local executor that counts the allocations of each steady call's preparation
    (not of a call that makes a new static step: its buffers are made then, once)."""

    def __init__(self, dit, **options):
        super().__init__(dit, **options)
        self.counts: list[list[str]] = []

    def submit(self, calls):
        if not self.dit_is_steady(calls):
            return super().submit(calls)
        counter = CountAllocations()
        compute = self.dit.compute

        def uncounted_compute(*args, **kwargs):
            counter.in_forward = True
            try:
                return compute(*args, **kwargs)
            finally:
                counter.in_forward = False

        made_before = self.made_steps()
        self.dit.compute = uncounted_compute
        try:
            with counter:
                done = super().submit(calls)
        finally:
            del self.dit.compute
        if self.made_steps() == made_before:
            self.counts.append(counter.allocations)
        return done

    def made_steps(self) -> int:
        return 0 if self.static_steps is None else len(self.static_steps.all())

    def dit_is_steady(self, calls) -> bool:
        return len(calls) == 1 and calls[0].cache is not None and calls[0].cache.is_full()


@pytest.mark.parametrize("settings", [dict(steps=2), dict(steps=2, stream_batch=False)], ids=["batch", "no batch"])
def test_a_steady_step_allocates_no_tensor_before_the_forward(models, settings):
    static = CountingExecutor(models.dit, cuda_graphs=True)
    run(pipeline(models, static, **settings), 12)
    assert len(static.counts) >= 4
    assert static.counts == [[] for _ in static.counts]
    # The count sees what the eager path allocates per step (the plan, the RoPE times): it can fail.
    eager = CountingExecutor(models.dit)
    run(pipeline(models, eager, **settings), 12)
    assert eager.counts and all("lift_fresh.default" in count for count in eager.counts)


def test_the_static_buffers_stay_put_and_a_prompt_change_copies_into_them(models):
    static = LocalExecutor(models.dit, cuda_graphs=True)
    pipe = pipeline(models, static, steps=2)
    video, at, addresses = clip(5 + 4 * 16), 0, []
    for chunk in range(16):
        if chunk == 9:
            pipe.update(prompt="a dog")  # a cut: the new text's K/V are copied into the step's buffers
        size = pipe.next_chunk_frames
        pipe.push(video[at:at + size])
        at += size
        steps = static.static_steps.all()
        if steps:
            buffers = [t for step in steps for t in (step.latents, step.timesteps, step.rope_times.tensor,
                                                     *[kv for pair in step.context_kv for kv in pair])]
            buffers += [pipe.cache.keys[0], pipe.cache.sink_directions]
            buffers += [pipe.cache._plan_buffers[1].targets.tensor, *pipe.cache._plan_buffers[1].sink_replacement]
            addresses.append((len(steps), [t.data_ptr() for t in buffers]))
    assert len(addresses) >= 8
    assert all(entry == addresses[-1] for entry in addresses[-8:])  # the prompt change among them
    assert sum(step.runs for step in static.static_steps.all()) >= 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cuda_graph_replays_the_eager_step(dtype):
    models = build_models("tiny", device="cuda", dtype=dtype)
    settings = dict(steps=2)
    eager = run(pipeline(models, LocalExecutor(models.dit), **settings), 12, {7: dict(prompt="a dog")})
    graphed = LocalExecutor(models.dit, cuda_graphs=True)
    frames = run(pipeline(models, graphed, **settings), 12, {7: dict(prompt="a dog")})
    assert sum(step.replays for step in graphed.static_steps.all()) > 0
    tolerance = 0 if dtype == torch.float32 else 8  # uint8 levels
    assert np.abs(frames.astype(int) - eager.astype(int)).max() <= tolerance
