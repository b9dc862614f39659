"""Pipeline parallelism (engine/parallel/) on CPU with gloo, tiny models.

One StreamPipeline runs on 1, 2 and 3 ranks: on N ranks its DiT calls go round the
ring (StageExecutor), with N stream-batch ticks in flight. The ranks run in spawned
processes (few spawns: each imports torch), every scenario in one spawn; every process
and the one-process reference run on one thread, so the frames compare exactly."""

import copy
import itertools
import random
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import get_preset
from engine.executor import LocalExecutor, executor_for
from engine.flow import denoising_steps
from engine.models.attention import StreamRows
from engine.models.dit import CausalWanDiT
from engine.models.kv_cache import KVCache
from engine.models.lora import LoraLibrary
from engine.models.text import TinyTextEncoder
from engine.models.vae import TINY_VAE, WanVAE
from engine.models.weights import Models
from engine.parallel import (BlockBalancer, BuiltModels, CostModel, LinkFailed, balanced_split, load_dit_part,
                             neighbour_step, start_ranks)
from engine.pipeline import StreamPipeline, StreamSettings, push_streams
from tiny_loras import random_factors, write_lora

SIZE = dict(height=32, width=48)
LAYERS = 4


def write_loras(folder: Path) -> Path:
    """Two LoRA adapters over every layer of tiny_models' DiT, the same in every process."""
    config = replace(get_preset("tiny"), num_layers=LAYERS)
    for seed, name in enumerate(("ink", "neon")):
        write_lora(folder / f"{name}.safetensors", random_factors(config=config, seed=seed, magnitude=0.5))
    return folder


def tiny_models(num_layers: int = LAYERS) -> Models:
    """The tiny preset with ``num_layers`` blocks, the same from its seed in every process."""
    config = replace(get_preset("tiny"), num_layers=num_layers)
    torch.manual_seed(0)
    dit, vae = CausalWanDiT(config).eval(), WanVAE(TINY_VAE).eval()
    return Models(dit, vae, TinyTextEncoder(config.text_len, config.text_dim, seed=0))


def clip(frames: int, height=40, width=60, still=False) -> np.ndarray:
    """A moving pattern with noise in it, or its first frame held (``still``)."""
    noise = np.random.default_rng(0).integers(0, 255, (height, width))
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((frames, height, width, 3), np.uint8)
    for f in range(frames):
        g = 0 if still else f
        out[f, ..., 0] = (x * 4 + g * 9) % 256
        out[f, ..., 1] = (y * 5 + g * 3) % 256
        out[f, ..., 2] = (noise * (g + 1)) % 256
    return out


def chunked(video: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    starts = np.cumsum([0] + sizes)
    return [video[a:b] for a, b in zip(starts, starts[1:])]


def stream(frames_first: int, chunks: int, *, still=False) -> list[np.ndarray]:
    return chunked(clip(frames_first + 4 * chunks, still=still), [frames_first] + [4] * chunks)


# Every mode and setting the pipeline takes, each a scenario: its settings, its chunks,
# and before which push what happens ("drain" ends a stream's output before a reload).
SCENARIOS = {
    "stream batch, 1 step": dict(settings=dict(steps=1), chunks=stream(5, 8)),
    "stream batch, 4 steps": dict(settings=dict(steps=4), chunks=stream(5, 16)),
    "low-latency start, 2 steps": dict(settings=dict(steps=2, low_latency_start=True), chunks=stream(1, 10)),
    "no batch": dict(settings=dict(steps=2, stream_batch=False),
                     chunks=chunked(clip(5 + 8 + 4 + 8 + 4), [5, 8, 4, 8, 4])),
    "clean-cache pass": dict(settings=dict(steps=2, stream_batch=False, clean_cache_pass=True), chunks=stream(5, 5)),
    "t2v": dict(settings=dict(steps=2, mode="t2v"), chunks=[None] * 8),
    "strength 0.1, still": dict(settings=dict(steps=2, strength=0.1), chunks=stream(5, 8, still=True)),
    "strength 0.1, moving": dict(settings=dict(steps=2, strength=0.1), chunks=stream(5, 8)),
    "strength 1.0, still": dict(settings=dict(steps=2, strength=1.0), chunks=stream(5, 8, still=True)),
    "strength 1.0, moving": dict(settings=dict(steps=2, strength=1.0), chunks=stream(5, 8)),
    "prompt transition": dict(settings=dict(steps=3, transition_frames=12), chunks=stream(5, 14),
                              events={6: [("update", {"prompt": "a watercolour dog"})],
                                      9: [("update", {"seed": 7, "strength": 0.5})]}),
    "reload": dict(settings=dict(steps=2), chunks=stream(5, 8) + stream(5, 8),
                   events={9: [("drain", None), ("update", {"steps": 3})]}),
    "blocks moving": dict(settings=dict(steps=3), chunks=stream(5, 14),
                          events={4: [("rebalance", [0, 1, 2, 4])], 8: [("rebalance", [0, 2, 3, 4])],
                                  11: [("rebalance", [0, 1, 2, 4])]}),
    # Adapters on every rank's blocks, a live change of their mix, and blocks moving meanwhile.
    "LoRA adapters": dict(settings=dict(steps=2, loras=(("ink", 1.0),)), chunks=stream(5, 12),
                          events={4: [("update", {"loras": (("ink", 0.5), ("neon", 1.0))})],
                                  6: [("rebalance", [0, 2, 3, 4])], 8: [("rebalance", [0, 1, 2, 4])],
                                  10: [("update", {"loras": ()})]}),
}


# While adapters change, a stream batch on N ranks holds slots whose steps one process ran
# before the change and slots it ran after: each slot gets its own mix, whose low-rank
# products, taken row by row, round differently from the whole batch's (one level in a few
# pixels); one mix for the whole batch would put slots on the wrong side of the change.
ROW_BY_ROW_ADAPTERS = {"LoRA adapters"}


class Recorded:
    """The pipeline's executor, recording each call's timesteps and new input (for the drift test)."""

    def __init__(self, executor):
        self.executor, self.forwards = executor_for(executor), []

    def __getattr__(self, name):
        return getattr(self.executor, name)

    def submit(self, calls):
        # each call's timesteps, and its first row: the chunk that has just come in, noised
        self.forwards += [(call.timesteps[:, 0].tolist(), round(float(call.latents[0].double().sum()), 6))
                          for call in calls]
        return self.executor.submit(calls)


@torch.no_grad()
def run_scenarios(executor, models: Models, names: list[str], lora_dir: Path) -> dict[str, dict]:
    """Each scenario through one StreamPipeline on ``executor``: its frames per stream, and its forwards."""
    results = {}
    loras = LoraLibrary(lora_dir, replace(get_preset("tiny"), num_layers=LAYERS))
    for name in names:
        scenario = SCENARIOS[name]
        recorded = Recorded(executor)
        pipe = StreamPipeline(recorded, models.vae, models.text_encoder,
                              StreamSettings(prompt="a cat", **SIZE, **scenario["settings"]), loras=loras)
        streams, lags = [[]], []
        for index, chunk in enumerate(scenario["chunks"]):
            for action, argument in scenario.get("events", {}).get(index, []):
                if action == "update":
                    pipe.update(**argument)
                elif action == "rebalance":
                    if getattr(executor, "world", 1) == len(argument) - 1:  # a split for this many ranks
                        executor.rebalance(argument)
                else:
                    streams[-1].append(pipe.drain())
                    lags.append((pipe.lag_frames, pipe.settings.steps, pipe.settings.stream_batch))
                    streams.append([])
            streams[-1].append(pipe.push(chunk))
        streams[-1].append(pipe.drain())
        lags.append((pipe.lag_frames, pipe.settings.steps, pipe.settings.stream_batch))
        results[name] = dict(frames=[np.concatenate(s) for s in streams], forwards=recorded.forwards, lags=lags)
    return results


def rank_main(rank: int, world: int, names: list[str], init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    settings = StreamSettings(prompt="a cat", steps=4, **SIZE)
    stage, models = start_ranks(BuiltModels(tiny_models()), settings)  # split from measured costs
    report = {}
    if models is None:
        stage.serve()
        report.update(mirrors=len(stage.mirrors))
    else:
        report.update(results=run_scenarios(stage, models, names, Path(out) / "loras"), moves=stage.moves)
        stage.close()
    report.update(layers=stage.dit.held_layers, split=stage.split,
                  params=sum(p.numel() for p in stage.dit.parameters()))
    torch.save(report, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def run_ranks(world: int, names: list[str], tmp_path: Path) -> list[dict]:
    write_loras(tmp_path / "loras")
    mp.spawn(rank_main, args=(world, names, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = tiny_models()
        return run_scenarios(models.dit, models, list(SCENARIOS), write_loras(tmp_path_factory.mktemp("loras")))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(2, list(SCENARIOS), tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return run_ranks(3, list(SCENARIOS), tmp_path_factory.mktemp("three"))


# -- the same frames as one process -----------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_n_ranks_give_one_process_frames(name, world, one_rank, two_ranks, three_ranks):
    reports = two_ranks if world == 2 else three_ranks
    ranks, single = reports[0]["results"][name], one_rank[name]
    # A stream batch per rank, and the flows of the last world - 1 forwards still on their way back
    assert [lag for lag, _, _ in ranks["lags"]] == [4 * ((steps - 1) * world + world - 1) if batched else 0
                                                   for _, steps, batched in single["lags"]]
    for index, (parallel, alone, (lag, _, _)) in enumerate(zip(ranks["frames"], single["frames"], single["lags"])):
        # The ranks' frames are the one process's, up to where their longer lag cuts them off.
        assert len(parallel) == len(alone) - lag * (world - 1) > 0, f"stream {index}"
        if name in ROW_BY_ROW_ADAPTERS:
            differences = np.abs(parallel.astype(int) - alone[:len(parallel)])
            assert differences.max() <= 1 and (differences > 0).mean() < 1e-3, f"{name}, stream {index}"
        else:
            np.testing.assert_array_equal(parallel, alone[:len(parallel)], err_msg=f"{name}, stream {index}")


@pytest.mark.parametrize("world", [2, 3])
def test_every_forward_has_one_process_timesteps_and_noise(world, one_rank, two_ranks, three_ranks):
    # The drift this replaced: a second pipeline for N ranks that timed the first chunk differently.
    reports = two_ranks if world == 2 else three_ranks
    for name, single in one_rank.items():
        ranks = reports[0]["results"][name]["forwards"]
        assert ranks == single["forwards"][:len(ranks)], name
        assert len(single["forwards"]) - len(ranks) <= world, name  # only the ticks no push came after


def test_blocks_moved_while_streaming(three_ranks):
    assert three_ranks[0]["moves"] >= 2  # at least one move each way
    assert three_ranks[0]["split"] == [0, 1, 2, 4]


@pytest.mark.parametrize("strength", [0.1, 0.15, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_first_chunk_is_conditioned_on_the_step_lists_first_timestep(strength, steps):
    models = tiny_models(1)
    recorded = Recorded(models.dit)
    pipe = StreamPipeline(recorded, models.vae, models.text_encoder,
                          StreamSettings(prompt="a cat", steps=steps, strength=strength, **SIZE))
    for chunk in stream(5, 2):
        pipe.push(chunk)
    first_chunk = [timesteps[0] for timesteps, _ in recorded.forwards[:steps]]
    assert first_chunk == denoising_steps(steps)  # 700 first, whatever the strength (published)
    assert all(t >= 0 for timesteps, _ in recorded.forwards for t in timesteps)


class GoneRank(LocalExecutor):
    """An executor whose ring has lost a rank: its forwards' results never come."""

    depth = 2

    def submit(self, calls):
        return self

    def result(self):
        raise LinkFailed("rank 1 stopped answering")


def test_a_lost_rank_stops_every_stream_instead_of_failing_one():
    models = tiny_models(1)
    executor = GoneRank(models.dit)
    pipes = [StreamPipeline(executor, models.vae, models.text_encoder, StreamSettings(prompt=p, **SIZE))
             for p in ("a cat", "a dog")]
    with pytest.raises(LinkFailed):  # through push_streams, which returns a stream's own failure instead
        push_streams(pipes, [clip(5)] * 2)


# -- each rank holds only its part ------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_holds_only_its_blocks(world, two_ranks, three_ranks):
    reports = two_ranks if world == 2 else three_ranks
    whole = tiny_models().dit
    block = sum(p.numel() for p in whole.blocks[0].parameters())
    embeddings = sum(sum(p.numel() for p in m.parameters()) for m in
                     (whole.patch_embedding, whole.text_embedding, whole.time_embedding, whole.time_projection))
    head = sum(p.numel() for p in whole.head.parameters())
    split = reports[0]["split"]
    for rank, report in enumerate(reports):
        layers = list(range(split[rank], split[rank + 1]))
        assert report["split"] == split and report["layers"] == layers
        assert report["params"] == len(layers) * block + (embeddings if rank == 0 else 0) + (
            head if rank == world - 1 else 0)
    assert all(report["mirrors"] == 0 for report in reports[1:])  # every cache rank 0 let go of was dropped


def test_a_stage_reads_only_its_blocks_from_a_checkpoint(tmp_path):
    whole = tiny_models(4).dit
    torch.save({"generator": whole.state_dict()}, tmp_path / "model.pt")
    part = load_dit_part(tmp_path / "model.pt", whole.config, range(1, 3), embeddings=False, head=True)
    assert part.held_layers == [1, 2] and part.patch_embedding is None
    expected = copy.deepcopy(whole).keep_only(range(1, 3), embeddings=False, head=True).state_dict()
    assert part.state_dict().keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(part.state_dict()[name], tensor, rtol=0, atol=0)


# -- running the model in parts ----------------------------------------------------------------

@torch.no_grad()
def test_the_model_run_in_two_parts_equals_the_whole_sink_replacements_included():
    whole = tiny_models(4).dit
    first = copy.deepcopy(whole).keep_only(range(0, 2), embeddings=True, head=False)
    second = copy.deepcopy(whole).keep_only(range(2, 4), embeddings=False, head=True)
    with pytest.raises(ValueError, match="part of the DiT"):
        first(torch.randn(1, 16, 1, 4, 6), torch.tensor([[500]]), torch.randn(1, 4, 32))
    latent_h, latent_w, batch = 4, 6, 2
    caches = [model.new_cache(batch, latent_h, latent_w) for model in (whole, first, second)]
    assert [c.layers for c in caches] == [[0, 1, 2, 3], [0, 1], [2, 3]]
    context = torch.randn(1, 5, whole.config.text_dim)
    embedded = first.embed_context(context)
    kv = {**first.blocks_context_kv(embedded, range(0, 2)), **second.blocks_context_kv(embedded, range(2, 4))}
    torch.manual_seed(1)
    replaced = 0
    for _ in range(12):  # past the 6-frame cache: adaptive sink replacement is decided in block 0
        latents, t = torch.randn(batch, 16, 1, latent_h, latent_w), torch.tensor([[700], [500]])
        expected = whole(latents, t, context, cache=caches[0])
        x, time_mod, time_emb = first.embed(latents, t)
        freqs = first.rope_frequencies(caches[1].frame_numbers(1), latent_h // 2, latent_w // 2, x.device)
        plan = caches[1].begin_write(1)
        x = first.run_blocks(x, time_mod, freqs, [StreamRows(slice(None), caches[1], plan, kv)], range(0, 2))
        second_plan = caches[2].begin_write(1)
        if second_plan.adapt is not None:
            caches[2].follow_sink_replacement(second_plan, *plan.sink_replacement)
            replaced += int(plan.sink_replacement[0].sum())
        x = second.run_blocks(x, time_mod, freqs, [StreamRows(slice(None), caches[2], second_plan, kv)], range(2, 4))
        torch.testing.assert_close(second.finish(x, time_emb, latent_h // 2, latent_w // 2), expected)
        for cache in caches:
            cache.advance()
    assert replaced > 0
    assert caches[0].slot_frame == caches[1].slot_frame == caches[2].slot_frame


def test_a_slot_may_replace_a_sink_once_its_own_cache_is_full_whatever_the_others_hold():
    # The ranks batch different chunks together than one process does, so a slot's
    # decision must not depend on its neighbours in the batch.
    config = replace(get_preset("tiny"), num_layers=1, num_kv_cache=3, num_sink=1)
    cache = KVCache(config, batch=2, frame_tokens=1)
    cache.frame_start = [3, 0]  # slot 0 is three frames in, slot 1 starts
    cache.slot_frame = [[0, 1, 2], [-1, -1, -1]]
    plan = cache.begin_write(1)
    assert plan.adapt.tolist() == [True, False]


# -- the split -------------------------------------------------------------------------------

def brute_force_slowest(model: CostModel, num_blocks: int, num_stages: int) -> float:
    return min(model.slowest([0, *inner, num_blocks])
               for inner in itertools.combinations(range(1, num_blocks), num_stages - 1))


def test_the_split_minimises_the_slowest_stage_as_brute_force_does():
    rng = random.Random(0)
    for _ in range(300):
        num_blocks, num_stages = rng.randint(1, 8), rng.randint(1, 4)
        if num_stages > num_blocks:
            continue
        model = CostModel(blocks=tuple(rng.uniform(0.1, 3) for _ in range(num_blocks)),
                          role=tuple(rng.choice([0, 0, rng.uniform(0, 5)]) for _ in range(num_stages)),
                          speed=tuple(rng.uniform(0.5, 2) for _ in range(num_stages)))
        split = balanced_split(num_blocks, num_stages, model)
        assert split[0] == 0 and split[-1] == num_blocks and all(b > a for a, b in zip(split, split[1:]))
        assert model.slowest(split) == pytest.approx(brute_force_slowest(model, num_blocks, num_stages))


def test_encode_and_decode_times_take_blocks_off_the_end_ranks():
    # 30 equal blocks over 4 ranks; the first also encodes (worth 3 blocks), the last decodes (5)
    model = CostModel(blocks=(1.0,) * 30, role=(3.0, 0.0, 0.0, 5.0), speed=(1.0,) * 4)
    split = balanced_split(30, 4, model)
    assert model.slowest(split) == 10 < model.slowest([0, 8, 16, 23, 30])  # an even split: 12
    assert split[1] <= 7 and 30 - split[3] <= 5


def owners(split: list[int]) -> list[int]:
    """The rank of each block."""
    return [next(k for k in range(len(split) - 1) if split[k] <= block < split[k + 1]) for block in range(split[-1])]


def test_neighbour_steps_move_each_block_at_most_one_rank_and_reach_the_target():
    splits = [[0, *inner, 6] for inner in itertools.combinations(range(1, 6), 2)]
    for current, target in itertools.product(splits, splits):
        for _ in range(6):
            if current == target:
                break
            step = neighbour_step(current, target)
            assert all(b > a for a, b in zip(step, step[1:]))  # every rank keeps a block
            assert all(abs(a - b) <= 1 for a, b in zip(owners(current), owners(step)))
            current = step
        assert current == target


def test_the_balancer_moves_blocks_only_when_stage_times_drift_apart():
    balancer = BlockBalancer(threshold=0.2, window=4)
    split = [0, 4, 8]
    for _ in range(3):
        balancer.observe([[0.0, 4.0], [0.0, 4.4]])
    assert balancer.proposal(split) is None  # not enough ticks yet
    balancer.observe([[0.0, 4.0], [0.0, 4.4]])
    assert balancer.proposal(split) is None  # 10% apart: within the threshold
    for _ in range(4):  # rank 0 now also spends 3 s encoding
        balancer.observe([[3.0, 4.0], [0.0, 4.0]])
    assert balancer.proposal(split) in ([0, 2, 8], [0, 3, 8])  # its slowest stage: 6 s instead of 7 s
    balancer.forget()
    assert balancer.proposal(split) is None


# -- the command line --------------------------------------------------------------------------

def test_torchrun_runs_the_run_command_over_two_ranks(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "engine", "run",
         "--frames", "21", "--size", "32x48", "--output", str(tmp_path / "out.mp4")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "split of the blocks over the ranks: [0, 1, 2]" in result.stdout
    assert "frames in 21, frames out" in result.stdout and (tmp_path / "out.mp4").stat().st_size > 0
