"""The GPU check of pipeline parallelism (engine/parallel/), in one run of a few minutes.

    timeout 540 python bench/parallel_gpu.py          # what the machine's GPUs allow

1. Two ranks on one GPU over gloo (CUDA tensors, sent through host memory): the
   frames of the tiny model, float32, equal one process's on the same GPU.
2. With two or more GPUs, two ranks over NCCL, one GPU each: the same comparison.
3. With two or more GPUs, bench/parallel.py --gpu's table (1.3B, 512x512, random weights).

Every part prints PASS or FAIL, or SKIP with the reason; the exit status is 1 if any failed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import get_preset  # noqa: E402
from engine.models.dit import CausalWanDiT  # noqa: E402
from engine.models.text import TinyTextEncoder  # noqa: E402
from engine.models.vae import TINY_VAE, WanVAE  # noqa: E402
from engine.models.weights import Models  # noqa: E402
from engine.parallel import BuiltModels, start_ranks  # noqa: E402
from engine.pipeline import StreamPipeline, StreamSettings  # noqa: E402

SETTINGS = StreamSettings(prompt="a cat", steps=3, height=64, width=96)
CHUNKS = 16


def tiny(device: str) -> Models:
    config = replace(get_preset("tiny"), num_layers=4)
    torch.manual_seed(0)
    with torch.device(device):
        dit, vae = CausalWanDiT(config).eval(), WanVAE(TINY_VAE).eval()
    return Models(dit, vae, TinyTextEncoder(config.text_len, config.text_dim, seed=0, device=device))


def clip() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (5 + 4 * CHUNKS, 80, 120, 3), dtype=np.uint8)


@torch.no_grad()
def stream(dit_or_executor, models: Models) -> np.ndarray:
    pipe = StreamPipeline(dit_or_executor, models.vae, models.text_encoder, SETTINGS)
    video = clip()
    outputs = [pipe.push(video[:5])] + [pipe.push(video[5 + 4 * i:9 + 4 * i]) for i in range(CHUNKS)]
    return np.concatenate(outputs + [pipe.drain()])


def rank_main(rank: int, world: int, backend: str, shared_gpu: bool, init: str, out: str) -> None:
    device = "cuda:0" if shared_gpu else f"cuda:{rank}"
    torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    stage, models = start_ranks(BuiltModels(tiny(device)), SETTINGS)
    if models is None:
        stage.serve()
    else:
        np.save(out, stream(stage, models))
        stage.close()
    dist.destroy_process_group()


def ranks_frames(world: int, backend: str, shared_gpu: bool) -> np.ndarray:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "frames.npy")
        mp.spawn(rank_main, args=(world, backend, shared_gpu, f"tcp://127.0.0.1:{port}", out), nprocs=world)
        return np.load(out)


def compare(name: str, ranked: np.ndarray, alone: np.ndarray, held_back: int) -> bool:
    same = len(ranked) == len(alone) - held_back and np.array_equal(ranked, alone[:len(ranked)])
    detail = "" if same else (f" ({len(ranked)} frames against {len(alone)} - {held_back}; max difference "
                              f"{np.abs(ranked.astype(int) - alone[:len(ranked)]).max() if len(ranked) else '-'})")
    print(f"{'PASS' if same else 'FAIL'}  {name}{detail}", flush=True)
    return same


def main() -> int:
    if not torch.cuda.is_available():
        print("SKIP  every part: this torch sees no CUDA device")
        return 0
    gpus = torch.cuda.device_count()
    print(f"{torch.cuda.get_device_name(0)} x{gpus}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    alone = stream(tiny("cuda:0").dit, tiny("cuda:0"))
    held_back = 4 * (SETTINGS.steps - 1)  # a second rank's stream batch still holds these at the end
    ok = compare("2 ranks on one GPU over gloo equal one process", ranks_frames(2, "gloo", True), alone, held_back)
    if gpus >= 2:
        ok &= compare("2 ranks over NCCL, one GPU each, equal one process", ranks_frames(2, "nccl", False), alone,
                      held_back)
        table = subprocess.run([sys.executable, str(Path(__file__).with_name("parallel.py")), "--gpu", "--chunks",
                                "30"], timeout=360)
        ok &= table.returncode == 0
    else:
        print("SKIP  NCCL and the 1.3B table: one GPU here (they need two or more)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
