"""Where the DiT's blocks go: the split over the ranks that makes the slowest stage fastest,
and the balancer that moves blocks when the measured stage times drift apart.

Stage k's time per tick is its other work (rank 0: VAE encode and decode, noise, x0;
the last rank: the head) plus its blocks'. The blocks of Wan are alike, so a block
costs the same everywhere on one kind of device; the split is measured, then chosen
(``balanced_split``), and moved a neighbour step at a time while streaming
(``BlockBalancer``).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..config import ModelConfig
from ..models.attention import StreamRows
from ..models.dit import WanBlock
from ..models.kv_cache import KVCache
from ..models.rope import RotaryTable
from ..pipeline import FRAMES_PER_LATENT, StreamSettings

LATENT_SCALE = 8  # pixels per latent, each way (the Wan VAE)


@dataclass(frozen=True)
class CostModel:
    """Seconds of one tick on stage k running blocks [start, end):
    ``role[k] + speed[k] * sum(blocks[start:end])``.

    ``blocks`` are the blocks' relative costs (all equal for Wan: the blocks are
    alike), ``speed[k]`` the seconds per unit of block cost on stage k's device,
    ``role[k]`` the stage's other work (encode on the first, decode on the last)."""

    blocks: tuple[float, ...]
    role: tuple[float, ...]
    speed: tuple[float, ...]

    def __call__(self, stage: int, start: int, end: int) -> float:
        return self.role[stage] + self.speed[stage] * sum(self.blocks[start:end])

    def slowest(self, split: Sequence[int]) -> float:
        return max(self(k, split[k], split[k + 1]) for k in range(len(split) - 1))


def balanced_split(num_blocks: int, num_stages: int, stage_cost: Callable[[int, int, int], float]) -> list[int]:
    """Boundaries ``[0, b1, ..., num_blocks]`` of the contiguous split of the blocks
    over the stages (at least one block each) whose slowest stage is fastest;
    ``stage_cost(k, start, end)`` is stage k's time running blocks [start, end)."""
    if not 1 <= num_stages <= num_blocks:
        raise ValueError(f"{num_stages} stages cannot each run at least one of {num_blocks} blocks")
    # best[k][end]: the least slowest-stage time of stages 0..k-1 running blocks [0, end)
    best = [[float("inf")] * (num_blocks + 1) for _ in range(num_stages + 1)]
    start_of = [[0] * (num_blocks + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for end in range(k, num_blocks - (num_stages - k) + 1):
            for start in range(k - 1, end):
                slowest = max(best[k - 1][start], stage_cost(k - 1, start, end))
                if slowest < best[k][end]:
                    best[k][end], start_of[k][end] = slowest, start
    split = [num_blocks]
    for k in range(num_stages, 0, -1):
        split.append(start_of[k][split[-1]])
    return split[::-1]


def neighbour_step(current: Sequence[int], target: Sequence[int]) -> list[int]:
    """The split on the way from ``current`` to ``target`` in which no block moves
    further than to a neighbouring stage: each boundary goes towards its target but
    not past the current boundaries on either side. Repeated, it reaches the target."""
    step = list(current)
    for k in range(1, len(current) - 1):
        step[k] = min(max(target[k], current[k - 1]), current[k + 1])
    return step


class BlockBalancer:
    """Decides, from the stage times measured while streaming, when to move blocks.

    Once ``window`` ticks are measured, when the slowest stage takes more than
    ``threshold`` longer than the fastest and another split would make the slowest
    stage at least ``min_gain`` faster, it proposes that split (one neighbour step
    of it) and starts measuring afresh."""

    def __init__(self, threshold: float = 0.2, window: int = 8, min_gain: float = 0.05):
        self.threshold, self.min_gain = threshold, min_gain
        self.ticks: deque[list[list[float]]] = deque(maxlen=window)

    def observe(self, stage_times: list[list[float]]) -> None:
        """One tick's [role seconds, blocks seconds] of every stage."""
        self.ticks.append(stage_times)

    def proposal(self, split: Sequence[int]) -> list[int] | None:
        if len(self.ticks) < self.ticks.maxlen:
            return None
        stages = range(len(split) - 1)
        role = [statistics.median(tick[k][0] for tick in self.ticks) for k in stages]
        blocks = [statistics.median(tick[k][1] for tick in self.ticks) for k in stages]
        totals = [r + b for r, b in zip(role, blocks)]
        if max(totals) - min(totals) <= self.threshold * max(totals):
            return None
        model = CostModel(blocks=(1.0,) * split[-1], role=tuple(role),
                          speed=tuple(b / (split[k + 1] - split[k]) for k, b in enumerate(blocks)))
        target = balanced_split(split[-1], len(split) - 1, model)
        if model.slowest(target) > (1 - self.min_gain) * model.slowest(split):
            return None
        return neighbour_step(split, target)

    def forget(self) -> None:
        """Drop the times measured so far (the split changed: they no longer apply)."""
        self.ticks.clear()



# -- measuring a tick's costs before any block is loaded ---------------------------------------

def median_run_seconds(run: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    """Median wall time of run() over repeats calls after one warm-up call (a stream's
    first call differs), with sync() (the device's) around each."""
    run()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure_tick_costs(config: ModelConfig, settings: StreamSettings, *, vae=None, decoder=None,
                       device: torch.device, dtype: torch.dtype, repeats: int = 3) -> tuple[float, float]:
    """Seconds of this rank's role work in one stream tick (VAE encode of a chunk and
    decode of a latent, on rank 0: given ``vae`` and ``decoder``) and of one DiT block on its
    device, measured on random inputs at the stream's size (the costs do not depend
    on the weights, so this runs before any block is loaded)."""
    latent_h, latent_w = settings.height // LATENT_SCALE, settings.width // LATENT_SCALE
    _, ph, pw = config.patch_size
    grid_h, grid_w = latent_h // ph, latent_w // pw
    batch, tokens = settings.steps, grid_h * grid_w
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def median_seconds(run) -> float:
        return median_run_seconds(run, sync, repeats)

    with torch.device(device):
        block = WanBlock(config).to(dtype).eval()
    cache = KVCache(config, batch, tokens, layers=[0], dtype=dtype, device=device)
    x = torch.randn(batch, 1, tokens, config.dim, device=device, dtype=dtype)
    time_mod = torch.randn(batch, 1, 6, config.dim, device=device)
    times = torch.arange(batch, device=device)[:, None]
    freqs = RotaryTable(config.head_dim, config.rope_max_positions).frequencies(times, grid_h, grid_w)
    context_kv = {0: block.cross_attn.context_kv(torch.randn(1, config.text_len, config.dim, device=device,
                                                            dtype=dtype))}

    def run_block():
        block(x, time_mod, freqs, [StreamRows(slice(None), cache, cache.begin_write(1), context_kv)], layer_index=0)
        cache.advance()

    block_seconds = median_seconds(run_block)
    role_seconds = 0.0
    if vae is not None:
        state = vae.new_stream()
        vae.stream_encode(torch.rand(1, 3, 1, settings.height, settings.width, device=device, dtype=dtype), state)
        chunk = torch.rand(1, 3, FRAMES_PER_LATENT, settings.height, settings.width, device=device, dtype=dtype)
        role_seconds += median_seconds(lambda: vae.stream_encode(chunk, state))
    if decoder is not None:
        state = decoder.new_stream()
        latent = torch.randn(1, config.out_dim, 1, latent_h, latent_w, device=device, dtype=dtype)
        role_seconds += median_seconds(lambda: decoder.stream_decode(latent, state))
    return role_seconds, block_seconds


