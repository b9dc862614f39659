"""torch.compile of the DiT's blocks (``--compile``, ``CausalWanDiT.set_compiled``) on the tiny preset, CPU.

The compiled blocks must give the eager frames to float32 rounding, alone and inside the
static step (``--cuda-graphs``), and the flag must fail with a message that names it.

Most tests compile with the "aot_eager" backend (``set_compiled("aot_eager")``, the
documented knob): torch traces and runs the very graphs inductor would be given, in
seconds, but generates no code. Inductor itself (what ``--compile`` uses) needs a C++
compiler on the CPU and took 20-45 s from a cold cache here (2 busy cores), so its test
is marked slow and skips where no compiler is installed. No test here runs on a GPU:
bench/speed_gpu.py compares the compiled frames with eager's there.
"""

import argparse
import logging

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from engine import cli
from engine.executor import LocalExecutor
from engine.models.dit import WanBlock, compile_problem
from engine.models.weights import build_models
from engine.pipeline import StreamPipeline, StreamSettings
from test_pipeline import clip


@pytest.fixture
def models():
    """Fresh models per test: compiling changes the DiT's blocks."""
    return build_models("tiny")


def pipeline(models, executor=None) -> StreamPipeline:
    settings = StreamSettings(height=32, width=48, prompt="a cat", steps=2)
    return StreamPipeline(executor or models.dit, models.vae, models.text_encoder, settings)


def run(models, chunks: int = 6, pipe: StreamPipeline | None = None) -> np.ndarray:
    """Every frame out of ``chunks`` chunks of the clip (a first chunk of 5 frames, then 4)."""
    pipe = pipe or pipeline(models)
    video, at, outputs = clip(5 + 4 * chunks), 0, []
    for _ in range(chunks):
        size = pipe.next_chunk_frames
        outputs.append(pipe.push(video[at:at + size]))
        at += size
    return np.concatenate(outputs)


def assert_same_frames(compiled: np.ndarray, eager: np.ndarray) -> None:
    """Equal to float32 rounding: a level of uint8 at most, where rounding tips a pixel over."""
    assert compiled.shape == eager.shape
    assert np.abs(compiled.astype(int) - eager).max() <= 1


def test_the_compiled_blocks_give_the_eager_frames(models, caplog):
    eager = run(models)
    graphs_before = counters["stats"]["unique_graphs"]
    models.dit.set_compiled("aot_eager")
    with caplog.at_level(logging.INFO, logger="engine.models.dit"):
        compiled = run(models)
    assert counters["stats"]["unique_graphs"] > graphs_before  # the compiled parts ran, not the methods
    assert_same_frames(compiled, eager)
    # One progress line before and one after each shape's first forward: the first chunk's, the steady one's.
    assert models.dit.compiled_shapes == {(1, 16, 2, 4, 6), (2, 16, 1, 4, 6)}
    messages = [record.getMessage() for record in caplog.records]
    assert "compiling the DiT's blocks for latents 1x16x2x4x6 ..." in messages
    assert any(m.startswith("compiled the DiT's blocks for latents 2x16x1x4x6 in ") for m in messages)


def test_the_compiled_blocks_inside_the_static_step_give_the_eager_frames(models):
    """--compile with --cuda-graphs: the static step runs the compiled blocks (on a GPU its
    graph captures their kernels; on the CPU it runs them on its buffers)."""
    eager = run(models, chunks=8)
    models.dit.set_compiled("aot_eager")
    static = LocalExecutor(models.dit, cuda_graphs=True)
    pipe = pipeline(models, static)  # kept: the static steps live as long as its cache
    assert_same_frames(run(models, chunks=8, pipe=pipe), eager)
    assert sum(step.runs for step in static.static_steps.all()) >= 2  # steady steps ran static


def test_set_compiled_none_runs_the_blocks_eagerly_again(models):
    block = models.dit.blocks[0]
    models.dit.set_compiled("aot_eager")
    assert all(part in vars(block) for part in WanBlock.DENSE_PARTS)
    models.dit.set_compiled(None)
    assert not any(part in vars(block) for part in WanBlock.DENSE_PARTS)
    assert models.dit.compiled_shapes is None


def test_build_models_compiles_as_asked():
    assert build_models("tiny", compile_backend="aot_eager").dit.compiled_shapes == set()
    assert build_models("tiny").dit.compiled_shapes is None


@pytest.mark.slow
@pytest.mark.skipif(compile_problem("cpu") is not None,
                    reason=f"inductor cannot compile here: {compile_problem('cpu')}")
def test_inductor_gives_the_eager_frames(models):
    """What --compile runs: inductor's generated C++ kernels on the CPU."""
    eager = run(models, chunks=4)
    models.dit.set_compiled("inductor")
    assert_same_frames(run(models, chunks=4), eager)
    assert models.dit.compiled_shapes


def compile_args(**given) -> argparse.Namespace:
    return argparse.Namespace(**({"compile": True, "cuda_graphs": False} | given))


def test_compile_fails_naming_the_flag_where_it_cannot_compile(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # no C++ compiler
    with pytest.raises(SystemExit, match=r"--compile: inductor builds CPU kernels with a C\+\+ compiler.*"
                                         r"run without --compile"):
        cli.compile_backend(compile_args(), "cpu")
    assert cli.compile_backend(compile_args(compile=False), "cpu") is None


def test_compile_is_refused_over_several_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="--compile runs the DiT on one rank; run without torchrun"):
        cli.main(["run", "--compile", "--device", "cpu"])
    assert cli.one_rank_flags(compile_args(cuda_graphs=True)) == ["--cuda-graphs", "--compile"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inductor's Triton kernels)")
def test_inductor_on_a_gpu_gives_the_eager_flows():
    dit = build_models("tiny", device="cuda").dit
    latents, timesteps = torch.randn(2, 16, 1, 4, 6, device="cuda"), torch.full((2, 1), 500, device="cuda")
    context = torch.randn(1, 8, 32, device="cuda")
    eager = dit(latents, timesteps, context, cache=dit.new_cache(2, 4, 6))
    dit.set_compiled("inductor")
    compiled = dit(latents, timesteps, context, cache=dit.new_cache(2, 4, 6))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
