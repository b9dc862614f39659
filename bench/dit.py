"""Cost of the KV-cache bookkeeping in one streaming DiT step.

Compares, per latent frame, a streaming step with the real rolling cache (slot
choice, adaptive sink test, writes, mask) against the same forward attending to
a cache of the same size with all bookkeeping removed. The difference is what
the cache logic costs; the target is under 5% of the step with the cache as it
streams, adaptive sink replacement on (as published). The row with it off is
shown beside it, to tell its share from the rest.

    python bench/dit.py                       # tiny preset on CPU (+ wan2.1-1.3b when CUDA is there)
    python bench/dit.py --preset wan2.1-1.3b --device cuda --size 512x512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.cli import parse_size
from engine.config import get_preset
from engine.models.dit import CausalWanDiT
from engine.models.kv_cache import KVCache

TARGET = 0.05
ROUNDS = 10


class CacheWithoutBookkeeping(KVCache):
    """Attends to a full buffer of the same size but writes and decides nothing."""

    def begin_write(self, frames):
        return None

    def write(self, layer, k, v, plan):
        return self.keys[layer], self.values[layer], None


def time_steps(model, cache, latents, timesteps, context, iters: int, device) -> list[float]:
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(latents, timesteps, context, cache=cache)
        cache.advance()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def measure(preset: str, device: torch.device, height: int, width: int, batch: int, iters: int,
            adapt_sink: bool) -> dict:
    config = get_preset(preset)
    if not adapt_sink:
        config = config.with_cache(adapt_sink_threshold=-1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = CausalWanDiT(config).to(dtype).eval()
    lat_h, lat_w = height // 8, width // 8
    latents = torch.randn(batch, config.in_dim, 1, lat_h, lat_w, device=device, dtype=dtype)
    timesteps = torch.tensor([[700 - 200 * i] for i in range(batch)], device=device)
    context = torch.randn(1, config.text_len, config.text_dim, device=device, dtype=dtype)

    caches = {name: cache_class(config, batch, model.frame_tokens(lat_h, lat_w), dtype=dtype, device=device)
              for name, cache_class in (("plain", CacheWithoutBookkeeping), ("stream", KVCache))}
    for cache in caches.values():  # fill the caches first: the steady state is what runs for hours
        time_steps(model, cache, latents, timesteps, context, config.num_kv_cache + 2, device)
    # Interleave short rounds of each so that drifting clocks and load hit both alike.
    samples = {name: [] for name in caches}
    for _ in range(ROUNDS):
        for name, cache in caches.items():
            samples[name] += time_steps(model, cache, latents, timesteps, context, max(1, iters // ROUNDS), device)
    results = {name: statistics.median(times) for name, times in samples.items()}
    results["overhead"] = results["stream"] / results["plain"] - 1
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="model preset (repeatable)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--size", default=None, help="frame size WIDTHxHEIGHT in pixels (latents are /8)")
    parser.add_argument("--batch", type=int, default=2, help="stream-batch width (denoising steps)")
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args()

    runs = []
    if args.preset:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        runs = [(p, device, args.size or ("512x512" if p != "tiny" else "64x64")) for p in args.preset]
    else:
        runs.append(("tiny", torch.device("cpu"), args.size or "64x64"))
        if torch.cuda.is_available():
            runs.append(("wan2.1-1.3b", torch.device("cuda"), args.size or "512x512"))

    print(f"{'preset':<12} {'device':<6} {'size':>9} {'batch':>5} {'adapt sink':>10} {'plain ms':>9} "
          f"{'stream ms':>10} {'bookkeeping':>12} {'overhead':>9} {'target':>7}")
    for preset, device, size in runs:
        width, height = parse_size("--size", size)
        iters = args.iters or (200 if preset == "tiny" else 30)
        for adapt_sink in (True, False):
            r = measure(preset, device, height, width, args.batch, iters, adapt_sink)
            target, verdict = "", ""  # the target is set with adaptive sink on; the row without it has none
            if adapt_sink:
                target, verdict = f"< {TARGET:.0%}", "met" if r["overhead"] < TARGET else "missed"
            print(f"{preset:<12} {device.type:<6} {size:>9} {args.batch:>5} {'on' if adapt_sink else 'off':>10} "
                  f"{r['plain'] * 1e3:>9.2f} {r['stream'] * 1e3:>10.2f} "
                  f"{(r['stream'] - r['plain']) * 1e3:>9.3f} ms {r['overhead']:>9.1%} {target:>7} {verdict}")


if __name__ == "__main__":
    main()
