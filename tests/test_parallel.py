"""Pipeline parallelism (engine/parallel.py) on CPU with gloo, tiny models.

The streams run in spawned processes, one per rank (few spawns: each imports
torch); every process and the single-process reference run on one thread, so the
frames compare exactly."""

import copy
import itertools
import os
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
from engine.models.attention import StreamRows
from engine.models.dit import CausalWanDiT
from engine.models.kv_cache import KVCache
from engine.models.text import TinyTextEncoder
from engine.models.vae import TINY_VAE, WanVAE
from engine.models.weights import Models
from engine.parallel import (BlockBalancer, BuiltModels, CostModel, ParallelStreamPipeline, balanced_split,
                             load_dit_part, neighbour_step, start_stage)
from engine.pipeline import StreamPipeline, StreamSettings

SIZE = dict(height=32, width=48)


def tiny_models(num_layers: int) -> Models:
    """The tiny preset with ``num_layers`` blocks, the same from its seed in every process."""
    config = replace(get_preset("tiny"), num_layers=num_layers)
    torch.manual_seed(0)
    dit, vae = CausalWanDiT(config).eval(), WanVAE(TINY_VAE).eval()
    return Models(dit, vae, TinyTextEncoder(config.text_len, config.text_dim, seed=0))


def clip(frames: int, height=40, width=60) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((frames, height, width, 3), np.uint8)
    for f in range(frames):
        out[f, ..., 0] = (x * 4 + f * 9) % 256
        out[f, ..., 1] = (y * 5 + f * 3) % 256
        out[f, ..., 2] = rng.integers(0, 255, (height, width))
    return out


def chunked(streams: list[int]) -> list[np.ndarray]:
    """Chunks of consecutive streams of that many chunks each: 5 frames, then 4 a chunk."""
    video = clip(sum(1 + 4 * n for n in streams))
    chunks, start = [], 0
    for n in streams:
        chunks.append(video[start:start + 5])
        chunks += [video[i:i + 4] for i in range(start + 5, start + 1 + 4 * n, 4)]
        start += 1 + 4 * n
    return chunks


# A scenario: ranks, blocks, settings, and before which push what happens (rank 0).
# "drain" ends a stream's output before a reload setting starts the next stream.
TWO_RANKS = dict(world=2, layers=2, steps=2, streams=[10, 5],
                 events={6: [("update", {"prompt": "a watercolour dog"})],
                         10: [("drain", None), ("update", {"steps": 1})]})
THREE_RANKS = dict(world=3, layers=4, steps=3, streams=[16],
                   events={4: [("rebalance", [0, 1, 2, 4])], 5: [("update", {"prompt": "a watercolour dog"})],
                           8: [("rebalance", [0, 2, 3, 4])],  # ranks 0 and 1 each take a block from upstream
                           12: [("rebalance", [0, 1, 2, 4])]})  # and hand it back downstream


def rank_main(rank: int, scenario: dict, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=scenario["world"],
                            timeout=timedelta(seconds=60))
    settings = StreamSettings(prompt="a cat", steps=scenario["steps"], **SIZE)
    stage = start_stage(BuiltModels(tiny_models(scenario["layers"])), settings)  # split from measured costs
    report = {}
    if rank == 0:
        pipe = ParallelStreamPipeline(stage, settings, balancer=BlockBalancer())
        streams = [[]]
        for index, chunk in enumerate(chunked(scenario["streams"])):
            for action, argument in scenario["events"].get(index, []):
                if action == "update":
                    pipe.update(**argument)
                elif action == "rebalance":
                    pipe.rebalance(argument)
                else:
                    streams[-1].append(pipe.drain())
                    streams.append([])
            streams[-1].append(pipe.push(chunk))
        streams[-1].append(pipe.drain())
        pipe.close()
        report.update(frames=[np.concatenate(s) for s in streams], moves=pipe.moves)
    else:
        stage.serve()
    report.update(layers=stage.dit.held_layers, split=stage.split,
                  params=sum(p.numel() for p in stage.dit.parameters()),
                  cache_layers=stage.cache.layers, cache_bytes=stage.cache.nbytes(), cache_batch=stage.cache.batch,
                  context_since=dict(stage.context_since), vae=stage.vae is not None,
                  text_encoder=stage.text_encoder is not None, decoder=stage.decoder is not None)
    torch.save(report, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def run_ranks(scenario: dict, tmp_path: Path) -> list[dict]:
    mp.spawn(rank_main, args=(scenario, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=scenario["world"])
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(scenario["world"])]


@torch.no_grad()
def one_process(scenario: dict) -> list[np.ndarray]:
    """The same pushes and updates through StreamPipeline: frames of each stream."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = tiny_models(scenario["layers"])
        pipe = StreamPipeline(models.dit, models.vae, models.text_encoder,
                              StreamSettings(prompt="a cat", steps=scenario["steps"], **SIZE))
        streams = [[]]
        for index, chunk in enumerate(chunked(scenario["streams"])):
            for action, argument in scenario["events"].get(index, []):
                if action == "update":
                    pipe.update(**argument)
                elif action == "drain":
                    streams.append([])
            streams[-1].append(pipe.push(chunk))
        return [np.concatenate(s) for s in streams]
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(TWO_RANKS, tmp_path_factory.mktemp("two")), one_process(TWO_RANKS)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return run_ranks(THREE_RANKS, tmp_path_factory.mktemp("three")), one_process(THREE_RANKS)


def assert_same_frames(parallel: np.ndarray, single: np.ndarray, chunks_at_least: int) -> None:
    """The ranks' frames are the one process's, up to where the longer lag cuts them off."""
    assert len(parallel) >= 5 + 4 * (chunks_at_least - 1)
    np.testing.assert_array_equal(parallel, single[:len(parallel)])


# -- the same frames as one process -----------------------------------------------------------

def test_two_ranks_give_one_process_frames_through_a_prompt_change_and_a_reload(two_ranks):
    reports, single = two_ranks
    first_stream, second_stream = reports[0]["frames"]
    assert_same_frames(first_stream, single[0], chunks_at_least=7)
    assert_same_frames(second_stream, single[1], chunks_at_least=5)  # steps=1 after the reload


def test_three_ranks_give_one_process_frames_while_blocks_move(three_ranks):
    reports, single = three_ranks
    assert reports[0]["moves"] >= 2  # at least one move each way
    assert_same_frames(reports[0]["frames"][0], single[0], chunks_at_least=8)


def test_a_prompt_change_applies_from_the_same_tick_on_every_rank(two_ranks, three_ranks):
    # version 1 is the changed prompt; a tick is a push (and its chunk) on rank 0
    for reports, scenario, push in ((two_ranks[0], TWO_RANKS, 6), (three_ranks[0], THREE_RANKS, 5)):
        assert [r["context_since"].get(1) for r in reports] == [push] * scenario["world"]


# -- each rank holds only its part ------------------------------------------------------------

@pytest.mark.parametrize("scenario_name", ["two_ranks", "three_ranks"])
def test_each_rank_holds_only_its_blocks_and_their_caches(scenario_name, request):
    reports = request.getfixturevalue(scenario_name)[0]
    scenario = TWO_RANKS if scenario_name == "two_ranks" else THREE_RANKS
    whole = tiny_models(scenario["layers"]).dit
    block = sum(p.numel() for p in whole.blocks[0].parameters())
    embeddings = sum(sum(p.numel() for p in m.parameters()) for m in
                     (whole.patch_embedding, whole.text_embedding, whole.time_embedding, whole.time_projection))
    head = sum(p.numel() for p in whole.head.parameters())
    config = whole.config
    frame_tokens = (SIZE["height"] // 16) * (SIZE["width"] // 16)
    split = reports[0]["split"]
    world = scenario["world"]
    for rank, report in enumerate(reports):
        layers = list(range(split[rank], split[rank + 1]))
        assert report["split"] == split and report["layers"] == layers and report["cache_layers"] == layers
        assert report["params"] == len(layers) * block + (embeddings if rank == 0 else 0) + (
            head if rank == world - 1 else 0)
        layer_bytes = 2 * report["cache_batch"] * config.num_kv_cache * frame_tokens * config.dim * 4
        assert report["cache_bytes"] == len(layers) * layer_bytes
        assert (report["vae"], report["text_encoder"], report["decoder"]) == (rank == 0, rank == 0, rank == world - 1)


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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "engine", "run",
         "--frames", "21", "--size", "32x48", "--output", str(tmp_path / "out.mp4")],
        capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "split of the blocks over the ranks: [0, 1, 2]" in result.stdout
    assert "frames in 21, frames out" in result.stdout and (tmp_path / "out.mp4").stat().st_size > 0
