"""Frames per second, time to first frame and where the time goes, per setting.

    python bench/pipeline.py                 # tiny preset on CPU (+ wan2.1-1.3b on a GPU when CUDA is there)
    python bench/pipeline.py --gpu-only --chunks 12

The Wan runs use random weights (speed does not depend on them) and the tiny text
encoder in place of umT5 (the prompt is encoded once, outside the loop). Beside
each GPU row: the published 1-GPU H100 figure for 1.3B and our ratio to it.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch

from engine.config import get_preset
from engine.models.dit import CausalWanDiT
from engine.models.text import TinyTextEncoder
from engine.models.vae import TINY_VAE, WAN21_VAE, WanVAE
from engine.pipeline import StreamPipeline, StreamSettings

PUBLISHED_FPS = {(512, 512): (26.21, 24.02, 21.51, 19.43), (480, 832): (20.47, 17.97, 15.68, 13.95)}


def timed(owner, name: str, totals: dict, label: str, sync) -> None:
    """Wrap ``owner.name`` so that its (synchronised) time adds up in ``totals[label]``."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        sync()
        start = time.perf_counter()
        result = inner(*args, **kwargs)
        sync()
        totals[label] += time.perf_counter() - start
        return result

    setattr(owner, name, wrapper)


@torch.no_grad()
def measure(preset: str, device: str, height: int, width: int, steps: int, chunks: int) -> dict:
    config = get_preset(preset)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        dit = CausalWanDiT(config).to(dtype).eval()
        vae = WanVAE(TINY_VAE if preset == "tiny" else WAN21_VAE).to(dtype).eval()
    text = TinyTextEncoder(config.text_len, config.text_dim, device=device)
    pipe = StreamPipeline(dit, vae, text, StreamSettings(height=height, width=width, steps=steps, prompt="x"))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    totals: dict = defaultdict(float)
    timed(pipe.vae, "stream_encode", totals, "encode", sync)
    timed(pipe.vae, "stream_decode", totals, "decode", sync)
    timed(pipe.dit, "forward", totals, "dit", sync)

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (5 + 4 * chunks, height, width, 3), dtype=np.uint8)
    sync()
    start = time.perf_counter()
    out = pipe.push(frames[:5])
    ttff = time.perf_counter() - start
    warm = 2 + steps  # after the stream batch has filled
    produced, steady_start = 0, None
    for i in range(chunks):
        if i == warm:
            sync()
            steady_start, produced = time.perf_counter(), 0
            totals.clear()
        out = pipe.push(frames[5 + 4 * i: 9 + 4 * i])
        produced += len(out)
    sync()
    elapsed = time.perf_counter() - steady_start
    shares = {k: totals[k] / elapsed for k in ("encode", "dit", "decode")}
    shares["other"] = 1 - sum(shares.values())
    return dict(fps=produced / elapsed, ttff=ttff, **shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--gpu-only", action="store_true")
    args = parser.parse_args()

    runs = [] if args.gpu_only else [("tiny", "cpu", 64, 64, 2)]
    if torch.cuda.is_available():
        runs += [("wan2.1-1.3b", "cuda", h, w, s) for (h, w) in PUBLISHED_FPS for s in (1, 2, 3, 4)]
    print(f"{'preset':<12} {'device':<6} {'size':>8} {'steps':>5} {'FPS':>7} {'TTFF ms':>8} {'encode':>7} "
          f"{'DiT':>6} {'decode':>7} {'other':>6}  {'published':>9} {'ratio':>6}")
    for preset, device, h, w, steps in runs:
        r = measure(preset, device, h, w, steps, max(args.chunks, steps + 5))
        published = PUBLISHED_FPS.get((h, w), (None,) * 4)[steps - 1] if device == "cuda" else None
        ref = f"{published:>9.2f} {r['fps'] / published:>6.2f}" if published else f"{'-':>9} {'-':>6}"
        print(f"{preset:<12} {device:<6} {f'{h}x{w}':>8} {steps:>5} {r['fps']:>7.2f} {r['ttff'] * 1e3:>8.0f} "
              f"{r['encode']:>7.0%} {r['dit']:>6.0%} {r['decode']:>7.0%} {r['other']:>6.0%}  {ref}", flush=True)


if __name__ == "__main__":
    main()
