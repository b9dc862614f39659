"""Frames per second and stage times against the number of pipeline ranks (engine/parallel/).

    python bench/parallel.py              # tiny preset with 4 blocks, 64x64, on CPU with gloo: 1, 2, 3 ranks
    python bench/parallel.py --gpu        # wan2.1-1.3b at 512x512 (random weights), one rank per GPU

One rank is StreamPipeline with the local executor; N ranks are N processes with
the blocks split from measured costs and the one StreamPipeline on rank 0 (as
``torchrun ... -m engine serve`` runs it). One and two sessions step together as the
engine's worker steps them (push_streams). Each rank gets one GPU, or on a CPU
``--threads`` threads (default 1: a core plays a GPU; more ranks than cores share
them). The rate is all sessions' frames pushed per second once the ring is full;
the stage times are medians per forward: rank 0's own work (VAE, noise, x0) and its
blocks, and every other rank's blocks. Beside each one-session row, the published
4xH100 figure for 1.3B at 512x512 with the same steps.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import get_preset
from engine.models.dit import CausalWanDiT
from engine.models.text import TinyTextEncoder
from engine.models.vae import TINY_VAE, WAN21_VAE, WanVAE
from engine.models.weights import Models
from engine.parallel import BuiltModels, start_ranks
from engine.pipeline import StreamPipeline, StreamSettings, push_streams

PUBLISHED_1X = {1: 26.21, 4: 19.43}  # 1.3B, 512x512, 1xH100, FPS for 1 and 4 steps (PAPER)
PUBLISHED_4X = {1: 64.52, 4: 61.57}  # the same on 4xH100


def build(preset: str, layers: int | None, device: str) -> Models:
    config = get_preset(preset)
    if layers:
        config = replace(config, num_layers=layers)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        dit = CausalWanDiT(config).to(dtype).eval()
        vae = WanVAE(TINY_VAE if preset == "tiny" else WAN21_VAE).to(dtype).eval()
    return Models(dit, vae, TinyTextEncoder(config.text_len, config.text_dim, device=device))


@torch.no_grad()
def frames_per_second(pipes: list[StreamPipeline], size: int, steps: int, ranks: int, chunks: int,
                      windows: int = 3) -> float:
    """All sessions' frames pushed per second once the stream batch and the ring are full,
    in the best of ``windows`` stretches of pushes (other work on the machine slows some)."""
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (5 + 4 * chunks, size, size, 3), dtype=np.uint8)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    warm = steps * ranks + 2
    per_window = (chunks - warm) // windows
    push_streams(pipes, [video[:5]] * len(pipes))
    best, start = 0.0, None
    for i in range(warm + per_window * windows):
        if i >= warm and (i - warm) % per_window == 0:
            sync()
            if start is not None:
                best = max(best, 4 * len(pipes) * per_window / (time.perf_counter() - start))
            start = time.perf_counter()
        push_streams(pipes, [video[5 + 4 * i:9 + 4 * i]] * len(pipes))
    sync()
    return max(best, 4 * len(pipes) * per_window / (time.perf_counter() - start))


def sessions(executor, models: Models, run: dict) -> list[StreamPipeline]:
    return [StreamPipeline(executor, models.vae, models.text_encoder,
                           StreamSettings(height=run["size"], width=run["size"], steps=run["steps"], prompt=f"x{i}",
                                          seed=i))
            for i in range(run["sessions"])]


def rank_main(rank: int, world: int, run: dict, init: str, result: str) -> None:
    device = f"cuda:{rank}" if run["device"] == "cuda" else "cpu"
    if run["device"] == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(run["threads"])
    dist.init_process_group("nccl" if run["device"] == "cuda" else "gloo", init_method=init, rank=rank,
                            world_size=world)
    settings = StreamSettings(height=run["size"], width=run["size"], steps=run["steps"], prompt="x")
    stage, models = start_ranks(BuiltModels(build(run["preset"], run["layers"], device)), settings)
    if models is None:
        stage.serve()
    else:
        fps = frames_per_second(sessions(stage, models, run), run["size"], run["steps"], world, run["chunks"])
        times = [[statistics.median(forward[k][part] for forward in stage.stage_times) for part in (0, 1)]
                 for k in range(world)]
        stage.close()
        Path(result).write_text(json.dumps({"fps": fps, "split": stage.split, "times": times}))
    dist.destroy_process_group()


def measure(run: dict, ranks: int) -> dict:
    if ranks == 1:
        models = build(run["preset"], run["layers"], run["device"])
        threads = torch.get_num_threads()
        torch.set_num_threads(run["threads"])
        try:
            fps = frames_per_second(sessions(models.dit, models, run), run["size"], run["steps"], 1, run["chunks"])
            return {"fps": fps, "split": None, "times": None}
        finally:
            torch.set_num_threads(threads)
    with socket.socket() as s:  # a free port on the loopback for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        mp.spawn(rank_main, args=(ranks, run, f"tcp://127.0.0.1:{port}", str(result)), nprocs=ranks)
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="wan2.1-1.3b on the GPUs instead of tiny on the CPU")
    parser.add_argument("--chunks", type=int, default=40, help="chunks pushed per session and run")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    parser.add_argument("--steps", default="1,4", help="denoising steps to measure, comma-separated")
    args = parser.parse_args()
    if args.gpu:
        gpus = torch.cuda.device_count()
        if gpus < 2:
            raise SystemExit(f"--gpu needs at least 2 GPUs (one rank each); {gpus} found")
        base = dict(preset="wan2.1-1.3b", layers=None, device="cuda", size=512, threads=args.threads)
        ranks = range(1, min(gpus, 4) + 1)
    else:
        base = dict(preset="tiny", layers=4, device="cpu", size=64, threads=args.threads)
        ranks = range(1, 4)
        print(f"{os.cpu_count()} CPU cores, {args.threads} thread(s) per rank")
    print(f"published 1.3B 512x512: 4xH100 {PUBLISHED_4X[1]} FPS (1 step), {PUBLISHED_4X[4]} FPS (4 steps); "
          f"{PUBLISHED_4X[1] / PUBLISHED_1X[1]:.2f}x and {PUBLISHED_4X[4] / PUBLISHED_1X[4]:.2f}x over 1xH100")
    name = base["preset"] + (f"/{base['layers']}" if base["layers"] else "")
    print(f"{name} on {base['device']}, {base['size']}x{base['size']}")
    print(f"{'sessions':>8} {'steps':>5} {'ranks':>5} {'split':<14} {'FPS':>7} {'x 1 rank':>8}  "
          f"{'stage ms per forward (rank 0 own+blocks, then blocks)':<44} {'4xH100':>7}")
    for count in (1, 2):
        for steps in (int(s) for s in args.steps.split(",")):
            single = None
            for world in ranks:
                run = dict(base, steps=steps, sessions=count, chunks=max(args.chunks, steps * world + 12))
                measured = measure(run, world)
                fps = measured["fps"]
                single = single or fps
                times = measured["times"]
                stages = "-" if times is None else "  ".join(
                    [f"{times[0][0] * 1e3:.1f}+{times[0][1] * 1e3:.1f}"] + [f"{t[1] * 1e3:.1f}" for t in times[1:]])
                published = f"{PUBLISHED_4X[steps]:>7.2f}" if count == 1 and steps in PUBLISHED_4X else f"{'-':>7}"
                print(f"{count:>8} {steps:>5} {world:>5} {str(measured['split'] or '-'):<14} {fps:>7.2f} "
                      f"{fps / single:>8.2f}  {stages:<44} {published}", flush=True)


if __name__ == "__main__":
    main()
