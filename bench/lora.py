"""LoRA adapters: unmerged (the engine's way) against merged into the weights.

    python bench/lora.py                                          # tiny preset on CPU
    python bench/lora.py --preset wan2.1-1.3b --size 512x512      # on a GPU (random weights, bf16)
    python bench/lora.py --preset wan2.1-1.3b --layers 2 --size 128x128   # the 1.3B's widths, 2 blocks, on a CPU

Every time is set against the base step of the same run: a steady stream-batched pipeline
step (a chunk of 4 frames, 2 steps), median of --rounds after one.

unmerged  engine/models/lora.py: the low-rank path beside each linear layer, on the rows of
          the streams that have adapters; a scale change is a new mix (no weight is touched).
merged    the same adapters' scaled changes added into the weights (W + s * alpha / r * B A),
          as a merging engine runs them: the base weights kept to undo it exactly, and a scale
          change is restoring them and merging again.

The last rows are two sessions with different adapters, one step of each: unmerged they share
one forward (push_streams); merged each needs its own weights, so they step in turn with a
merge before each.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from device import bench_device  # bench/device.py
from engine.cli import parse_size
from engine.config import get_preset
from engine.models.dit import CausalWanDiT
from engine.models.lora import LoraLibrary, LoraMix
from engine.models.lora_files import linear_shapes
from engine.models.text import TinyTextEncoder
from engine.models.vae import TINY_VAE, WAN21_VAE, WanVAE
from engine.pipeline import StreamPipeline, StreamSettings, push_streams

ADAPTERS = ("ink", "grain", "neon")


def write_adapters(folder: Path, config, rank: int) -> None:
    """Random adapters of every linear layer, in the wan layout."""
    generator = torch.Generator().manual_seed(0)
    for name in ADAPTERS:
        state = {}
        for layer, (outputs, inputs) in linear_shapes(config).items():
            state[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(rank, inputs, generator=generator) * 0.01
            state[f"diffusion_model.{layer}.lora_up.weight"] = torch.randn(outputs, rank, generator=generator) * 0.01
            state[f"diffusion_model.{layer}.alpha"] = torch.tensor(float(rank))
        save_file(state, str(folder / f"{name}.safetensors"))


def merge(dit: CausalWanDiT, mix: LoraMix | None, base: dict[str, torch.Tensor]) -> None:
    """A merging engine's scale change: every linear layer's weight back to its base, plus the mix's change."""
    changes = mix.layers if mix is not None else {}
    for layer, module in dit.named_modules():
        if layer in base:
            module.weight.copy_(base[layer])
            if layer in changes:
                down, up = changes[layer]
                module.weight.addmm_(up, down)


def interleaved_medians(runs: dict[str, tuple[Callable[[], object], Callable[[], object]]], sync,
                        rounds: int) -> dict[str, float]:
    """Median seconds of each run (prepare, then timed), taken in turn round after round so
    that a machine's drift falls on all of them alike; one untimed round first."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    for round_index in range(rounds + 1):
        for label, (prepare, run) in runs.items():
            prepare()
            sync()
            started = time.perf_counter()
            run()
            sync()
            if round_index:
                times[label].append(time.perf_counter() - started)
    return {label: statistics.median(seconds) for label, seconds in times.items()}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", default="64x64", help="model size WIDTHxHEIGHT")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, help="only this many blocks: the preset's widths, less memory and time")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    width, height = parse_size("--size", args.size)
    device, dtype, sync = bench_device(args.preset)
    config = get_preset(args.preset)
    if args.layers:
        config = replace(config, num_layers=args.layers)
    torch.manual_seed(0)
    with torch.device(device):
        plain = CausalWanDiT(config).to(dtype).eval()  # base and merged weights; never hooked
        vae = WanVAE(TINY_VAE if args.preset == "tiny" else WAN21_VAE).to(dtype).eval()
    adapted = copy.deepcopy(plain)  # the unmerged path's hooks go on this one
    text = TinyTextEncoder(config.text_len, config.text_dim, device=device)
    folder = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    write_adapters(folder, config, args.rank)
    library = LoraLibrary(folder, config, device=device, dtype=dtype)
    one, three, other = [("ink", 0.8)], [("ink", 0.8), ("grain", 0.5), ("neon", -0.3)], [("grain", 0.8)]
    first = np.random.default_rng(1).integers(0, 255, (5, height, width, 3), dtype=np.uint8)
    chunk = np.random.default_rng(0).integers(0, 255, (4, height, width, 3), dtype=np.uint8)
    base_weights = {name: module.weight.clone() for name, module in plain.named_modules()
                    if isinstance(module, torch.nn.Linear)}

    context = text.encode(["x"]).to(device, dtype)

    def pipeline(dit: CausalWanDiT, loras=(), seed=0) -> StreamPipeline:
        pipe = StreamPipeline(dit, vae, text, StreamSettings(height=height, width=width, steps=2, seed=seed,
                                                             prompt="x", loras=tuple(loras)), loras=library)
        pipe.push(first)
        return pipe

    def step(dit: CausalWanDiT, loras=()):
        pipe = pipeline(dit, loras)
        return lambda: pipe.push(chunk)

    def forward(dit: CausalWanDiT, loras=()):
        """The DiT's share of a steady step: one forward of the stream batch (2 rows, 1 latent frame)."""
        cache = dit.new_cache(2, height // 8, width // 8)
        latents = torch.randn(2, config.in_dim, 1, height // 8, width // 8, device=device, dtype=dtype)
        timesteps = torch.tensor([[700], [500]], device=device)
        mix = library.mix(loras) if loras else None
        return lambda: dit(latents, timesteps, context, cache=cache, adapters=mix)

    def merged(loras):
        mix = library.mix(loras) if loras else None
        return lambda: merge(plain, mix, base_weights)

    def nothing() -> None:
        pass

    step(adapted, one)  # the first mix used installs the hooks, before any timing
    configs = {  # label: (prepare, a step, a DiT forward)
        "base (no adapter)": (merged(None), step(plain), forward(plain)),
        "merged, 1 adapter": (merged(one), step(plain), forward(plain)),
        "merged, 3 adapters": (merged(three), step(plain), forward(plain)),
        "unmerged, no adapter (hooks idle)": (nothing, step(adapted), forward(adapted)),
        "unmerged, 1 adapter": (nothing, step(adapted, one), forward(adapted, one)),
        "unmerged, 3 adapters": (nothing, step(adapted, three), forward(adapted, three)),
    }
    steps = interleaved_medians({label: (prepare, run) for label, (prepare, run, _) in configs.items()},
                                sync, args.rounds)
    forwards = interleaved_medians({label: (prepare, run) for label, (prepare, _, run) in configs.items()},
                                   sync, args.rounds)
    changing = pipeline(adapted, three)
    scales = iter([[(name, scale * (1 + k / 1000)) for name, scale in three] for k in range(2 * args.rounds + 2)])
    changes = interleaved_medians({
        "unmerged: a new mix": (nothing, lambda: changing.update(loras=tuple(next(scales)))),
        "merged: restore and merge": (nothing, merged([(name, scale / 2) for name, scale in three])),
    }, sync, args.rounds)
    unmerged_two = [pipeline(adapted, one, seed=1), pipeline(adapted, other, seed=2)]
    merged_two = [(pipeline(plain, seed=1), merged(one)), (pipeline(plain, seed=2), merged(other))]

    def merged_in_turn() -> None:
        for pipe, merge_its_adapters in merged_two:
            merge_its_adapters()
            pipe.push(chunk)

    two = interleaved_medians({
        "unmerged: one shared forward": (nothing, lambda: push_streams(unmerged_two, [chunk] * 2)),
        "merged: in turn, merging before each": (merged(None), merged_in_turn),
    }, sync, args.rounds)

    base_step, base_forward = steps["base (no adapter)"], forwards["base (no adapter)"]
    print(f"{args.preset} ({config.num_layers} blocks) at {height}x{width} on {device}, rank {args.rank} on all "
          f"{len(base_weights)} linear "
          f"layers, stream batch of 2 steps, medians of {args.rounds} rounds taken in turn")
    print(f"{'':<40} {'DiT ms':>8} {'x base':>7} {'step ms':>8} {'x base':>7}")
    for label in configs:
        print(f"{label:<40} {forwards[label] * 1000:>8.2f} {forwards[label] / base_forward:>7.2f} "
              f"{steps[label] * 1000:>8.2f} {steps[label] / base_step:>7.2f}")
    for title, results in (("a scale change (3 adapters), against the base step", changes),
                           ("2 sessions, different adapters: a step of each", two)):
        print(title)
        for label, seconds in results.items():
            print(f"{'  ' + label:<57} {seconds * 1000:>8.2f} {seconds / base_step:>7.2f}")


if __name__ == "__main__":
    main()
