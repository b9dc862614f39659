"""Sessions stepping together against one after another, on the real model.

    python bench/sessions.py                                   # tiny preset on CPU
    python bench/sessions.py --preset wan2.1-1.3b --size 512x512   # on a GPU (random weights, bf16)
    python bench/sessions.py ... --json steps.json    # also the step times, for bench/slo.py --fit steps.json

For n sessions (different prompts and seeds, stream-batched, 2 steps), the time of one
steady step of all n: each pipeline pushed in turn, and all pushed at once with
push_streams (their DiT calls in one forward). The ratio is what the SLO policy's
cost model learns online; engine/slo_sim.py's device assumes a fixed cost per forward
plus a cost per row, which this measures on a real device; --json writes the measured
times, to which `bench/slo.py --fit` fits that cost per forward and per row.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from device import bench_device  # bench/device.py
from engine.cli import parse_size
from engine.config import get_preset
from engine.models.dit import CausalWanDiT
from engine.models.text import TinyTextEncoder
from engine.models.vae import TINY_VAE, WAN21_VAE, WanVAE
from engine.parallel import median_run_seconds
from engine.pipeline import StreamPipeline, StreamSettings, push_streams

PROMPTS = ("ink", "fog", "glass", "neon", "paper", "oil", "chalk", "clay")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", default="64x64", help="model size WIDTHxHEIGHT")
    parser.add_argument("--sessions", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", metavar="FILE", help="also write the step times here (for bench/slo.py --fit)")
    args = parser.parse_args()
    width, height = parse_size("--size", args.size)
    device, dtype, sync = bench_device(args.preset)
    config = get_preset(args.preset)
    torch.manual_seed(0)
    with torch.device(device):
        dit = CausalWanDiT(config).to(dtype).eval()
        vae = WanVAE(TINY_VAE if args.preset == "tiny" else WAN21_VAE).to(dtype).eval()
    text = TinyTextEncoder(config.text_len, config.text_dim, device=device)
    chunk = np.random.default_rng(0).integers(0, 255, (4, height, width, 3), dtype=np.uint8)
    first = np.random.default_rng(1).integers(0, 255, (5, height, width, 3), dtype=np.uint8)

    print(f"{args.preset} at {height}x{width} on {device}, stream batch of 2 steps, median of {args.rounds} steps after one")
    rows = []
    print(f"{'sessions':>8} {'in turn ms':>10} {'together ms':>11} {'ratio':>6} {'ms per session':>14}")
    for count in (int(n) for n in args.sessions.split(",")):
        pipes = [StreamPipeline(dit, vae, text, StreamSettings(height=height, width=width, steps=2, seed=i,
                                                               prompt=PROMPTS[i % len(PROMPTS)]))
                 for i in range(count)]
        for pipe in pipes:  # the first chunk (median_run_seconds's warm-up fills the stream batch)
            pipe.push(first)
        in_turn = median_run_seconds(lambda: [pipe.push(chunk) for pipe in pipes], sync, args.rounds)
        together = median_run_seconds(lambda: push_streams(pipes, [chunk] * count), sync, args.rounds)
        print(f"{count:>8} {in_turn * 1000:>10.1f} {together * 1000:>11.1f} {together / in_turn:>6.2f} "
              f"{together * 1000 / count:>14.1f}")
        rows.append({"sessions": count, "in_turn_s": in_turn, "together_s": together})
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"preset": args.preset, "size": args.size, "device": torch.cuda.get_device_name()
                       if device == "cuda" else "cpu", "steps": 2, "rows": rows}, file, indent=1)
        print(f"step times written to {args.json}: python bench/slo.py --fit {args.json}")


if __name__ == "__main__":
    main()
