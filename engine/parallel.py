"""Pipeline parallelism: the DiT's blocks split over ranks, the stream flowing through them.

Launched with ``torchrun --nproc-per-node N -m engine run ...`` (or any other
torch.distributed start; NCCL on GPUs, gloo on CPUs), rank r is pipeline stage r:

    rank 0      VAE encode, motion, noise, embeddings, blocks [0, b1)   (+ text encoder)
    rank k      blocks [bk, bk+1)
    rank N-1    blocks [bN-1, L), head, x0, re-noise, VAE decode

Each rank holds only its blocks and their KV caches. Activations and the
stream-batch state go rank to rank as point-to-point messages, sent
asynchronously (the next tick computes while they travel, a bounded number in
flight); the last rank sends the re-noised stream batch and the decoded frames
back to rank 0, which closes the ring.

With N ranks, N stream-batch ticks are in flight: tick m holds the new chunk m at
step 0 and chunk m - i*N at step i, so a chunk takes its next step each time it
comes round the ring. Each chunk's denoising chain and each slot's cache see the
same inputs in the same order as in :class:`~engine.pipeline.StreamPipeline`:
noise is drawn per chunk and step from the seed, and live settings (prompt, seed,
fit) apply to chunk c's step i as they stood when chunk c + i was pushed, which is
when one process runs that step. So the frames out are StreamPipeline's, later by
(steps - 1) * (N - 1) chunks.

Everything that changes the stream travels in order with the frames: a new text
context rides with the first tick that uses it, a reset is the next tick's "new
stream", and re-balancing drains the ring, then moves blocks (weights and KV
caches) between neighbouring ranks before the next tick.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .config import ModelConfig, get_preset
from .flow import add_noise, denoising_steps, sigma_for_timestep, x0_from_flow
from .models.attention import StreamRows
from .models.dit import CausalWanDiT, WanBlock
from .models.kv_cache import KVCache
from .models.rope import RotaryTable
from .models.text import PromptCache
from .motion import MotionNoiseController
from .pipeline import (FRAMES_PER_LATENT, LIVE_SETTINGS, StreamSettings, chunk_noise, host_frames, model_frames,
                       prompt_context)

DECIDING_LAYER = 0  # the layer whose keys decide adaptive sink replacement (see kv_cache.py)
LATENT_SCALE = 8  # pixels per latent, each way (the Wan VAE)


# -- the split -------------------------------------------------------------------------------

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


# -- messages --------------------------------------------------------------------------------

class Link:
    """Ordered messages to and from one other rank: a header (a dict, as JSON, over
    the control group on the CPU) and named tensors (over the data group: NCCL on
    GPUs). Sends are asynchronous; once more than ``max_in_flight`` are unfinished,
    ``send`` waits for the oldest. Their tensors are kept alive until sent."""

    def __init__(self, peer: int, *, device: torch.device, control_group=None, data_group=None,
                 max_in_flight: int = 2):
        self.peer, self.device = peer, device
        self.control_group, self.data_group = control_group, data_group
        self.max_in_flight = max_in_flight
        self.sending: deque[tuple[list, list[torch.Tensor]]] = deque()
        self.size = torch.zeros(1, dtype=torch.int64)
        self.size_receive = None  # a posted receive of the next header's size (see ready)

    def send(self, header: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        tensors = {name: t.to(torch.uint8) if t.dtype == torch.bool else t.contiguous()
                   for name, t in (tensors or {}).items()}
        described = {**header, "tensors": [(name, list(t.shape), str(t.dtype).removeprefix("torch."))
                                           for name, t in tensors.items()]}
        body = torch.frombuffer(bytearray(json.dumps(described).encode()), dtype=torch.uint8)
        size = torch.tensor([body.numel()], dtype=torch.int64)
        works = [dist.isend(size, self.peer, group=self.control_group),
                 dist.isend(body, self.peer, group=self.control_group)]
        works += [dist.isend(t, self.peer, group=self.data_group) for t in tensors.values()]
        self.sending.append((works, [size, body, *tensors.values()]))
        while len(self.sending) > self.max_in_flight:
            for work in self.sending.popleft()[0]:
                work.wait()

    def ready(self) -> bool:
        """Whether the next message has begun to arrive (call only when one is due)."""
        if self.size_receive is None:
            self.size_receive = dist.irecv(self.size, self.peer, group=self.control_group)
        return self.size_receive.is_completed()

    def recv(self) -> tuple[dict, dict[str, torch.Tensor]]:
        if self.size_receive is None:
            self.size_receive = dist.irecv(self.size, self.peer, group=self.control_group)
        self.size_receive.wait()
        self.size_receive = None
        body = torch.empty(int(self.size), dtype=torch.uint8)
        dist.recv(body, self.peer, group=self.control_group)
        header = json.loads(body.numpy().tobytes())
        tensors = {}
        for name, shape, dtype in header.pop("tensors"):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            dist.recv(tensor, self.peer, group=self.data_group)
            tensors[name] = tensor
        return header, tensors

    def flush(self) -> None:
        while self.sending:
            for work in self.sending.popleft()[0]:
                work.wait()


class StageClock:
    """Seconds a stage spends per tick on its role work ("role": encode and
    embeddings on the first stage, head and decode on the last) and its blocks
    ("blocks"), summed until :meth:`lap`. On a GPU each part ends with a
    synchronize, so the times are the device's, not the launch's."""

    def __init__(self, device: torch.device):
        self.device = device
        self.parts = {"role": 0.0, "blocks": 0.0}

    @contextmanager
    def measure(self, part: str):
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.parts[part] += time.perf_counter() - start

    def lap(self) -> list[float]:
        """[role, blocks] seconds since the last lap."""
        times = [self.parts["role"], self.parts["blocks"]]
        self.parts = {"role": 0.0, "blocks": 0.0}
        return times


# -- where each rank's models come from --------------------------------------------------------

class BuiltModels:
    """Models built whole on every rank (the tiny preset, the same from its seed
    everywhere); each rank keeps its part and lets go of the rest."""

    def __init__(self, models):
        self.models = models
        self.config: ModelConfig = models.dit.config
        param = next(models.dit.parameters())
        self.device, self.dtype = param.device, param.dtype

    def ends(self, rank: int, world: int):
        """(VAE for encoding, text encoder, decoder) of this rank's role; None where it has none."""
        m = self.models
        first, last = rank == 0, rank == world - 1
        return (m.vae if first else None, m.text_encoder if first else None,
                (m.decoder or m.vae) if last else None)

    def dit_part(self, layers: range, *, embeddings: bool, head: bool) -> CausalWanDiT:
        dit = self.models.dit.keep_only(layers, embeddings=embeddings, head=head)
        self.models = None  # the stage holds what it runs; nothing else stays referenced here
        return dit


class PublishedWeights:
    """A Wan preset's published files; each rank reads only what its stage runs."""

    def __init__(self, preset: str, folder=None, *, device: torch.device, dtype: torch.dtype, taehv: bool = False):
        from .models.weights import locate_weights

        self.config = get_preset(preset)
        self.files = locate_weights(preset, folder, taehv=taehv)
        self.device, self.dtype, self.taehv = device, dtype, taehv

    def ends(self, rank: int, world: int):
        from .models.taehv import load_taehv
        from .models.text import UMT5TextEncoder
        from .models.vae import load_vae

        first, last = rank == 0, rank == world - 1
        needs_vae = first or (last and not self.taehv)
        vae = load_vae(self.files.vae).to(self.device, self.dtype).eval() if needs_vae else None
        text = UMT5TextEncoder.load(self.files.text_encoder, device=self.device) if first else None
        decoder = None
        if last:
            decoder = load_taehv(self.files.taehv).to(self.device, self.dtype).eval() if self.taehv else vae
        return (vae if first else None), text, decoder

    def dit_part(self, layers: range, *, embeddings: bool, head: bool) -> CausalWanDiT:
        return load_dit_part(self.files.dit, self.config, layers, embeddings=embeddings, head=head,
                             device=self.device, dtype=self.dtype)


def load_dit_part(path, config: ModelConfig, layers: range, *, embeddings: bool, head: bool,
                  device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> CausalWanDiT:
    """The part of a DiT checkpoint one stage runs, the rest never materialised
    (a ``.pt`` is memory-mapped, so only the part's tensors are read)."""
    from .models.weights import load_strict, read_state_dict, unwrap_generator

    with torch.device("meta"):
        dit = CausalWanDiT(config).keep_only(layers, embeddings=embeddings, head=head)
    wanted = dit.state_dict().keys()
    state = {key: value for key, value in unwrap_generator(read_state_dict(path)).items() if key in wanted}
    load_strict(dit, state, what="DiT", path=path)
    return dit.to(device=device, dtype=dtype).eval()


# -- one rank's stage --------------------------------------------------------------------------

class PipelineStage:
    """One rank's part of the DiT and of the stream: its blocks, their KV cache, the
    text contexts in use, its role's models (VAE and text encoder on rank 0, the
    decoder on the last rank), and the links to its neighbours.

    Rank 0 drives it through :class:`ParallelStreamPipeline`; every other rank
    calls :meth:`serve`. Made by :func:`start_stage`."""

    def __init__(self, dit: CausalWanDiT, split: Sequence[int], *, rank: int, world: int, links: dict[int, Link],
                 vae=None, text_encoder=None, decoder=None):
        self.dit, self.split, self.rank, self.world = dit, list(split), rank, world
        self.vae, self.text_encoder, self.decoder = vae, text_encoder, decoder
        self.prev, self.next = links.get(rank - 1), links.get(rank + 1)
        self.ring = links.get(world - 1 if rank == 0 else 0) if rank in (0, world - 1) else None
        param = next(dit.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.clock = StageClock(self.device)
        self.cache: KVCache | None = None
        self.decoder_state = None
        self.contexts: dict[int, torch.Tensor] = {}  # version -> embedded text context [1, text_len, dim]
        self.cross_kv: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # version -> block -> K/V
        self.context_since: dict[int, int] = {}  # version -> first tick that used it here

    @property
    def layers(self) -> range:
        return range(self.split[self.rank], self.split[self.rank + 1])

    @property
    def is_last(self) -> bool:
        return self.rank == self.world - 1

    # -- a tick through this stage's blocks ---------------------------------------------------
    def run_blocks(self, header: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This stage's blocks on one tick's message; returns the message's tensors
        for the next stage (the new activations, and the first layer's sink decision)."""
        x = tensors["x"]
        batch, frames = x.shape[:2]
        latent_h, latent_w = header["latent_size"]
        _, ph, pw = self.dit.config.patch_size
        if header["new_stream"]:
            self.cache = self.dit.new_cache(1, latent_h, latent_w)
        elif self.cache.batch != batch:  # the stream batch starts: each slot a copy of the first chunk's cache
            self.cache = self.cache.repeated(batch)
        for name, embedded in tensors.items():
            if name.startswith("context."):
                self._add_context(int(name.removeprefix("context.")), embedded)
        for version in set(header["contexts"]):
            self.context_since.setdefault(version, header["tick"])

        self.cache.frame_start = list(header["frame_starts"])
        plan = self.cache.begin_write(frames)
        decides = DECIDING_LAYER in self.layers
        if plan.adapt is not None and not decides:
            self.cache.follow_sink_replacement(plan, tensors["sink_replaced"].bool(), tensors["sink_choice"])
        freqs = self.dit.rope_frequencies(self.cache.frame_numbers(frames), latent_h // ph, latent_w // pw,
                                          self.device)
        stream = StreamRows(slice(None), self.cache, plan, self._slot_context_kv(header["contexts"]))
        x = self.dit.run_blocks(x, tensors["time_mod"], freqs, [stream], self.layers)
        self._forget_contexts_before(min(header["contexts"]))

        out = {**tensors, "x": x}
        if decides and plan.sink_replacement is not None:
            out["sink_replaced"], out["sink_choice"] = plan.sink_replacement
        return out

    def _add_context(self, version: int, embedded: torch.Tensor) -> None:
        self.contexts[version] = embedded
        self.cross_kv[version] = self.dit.blocks_context_kv(embedded, self.layers)

    def _slot_context_kv(self, versions: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Each block's cross-attention K/V for the slots' context versions (batch 1 when they share one)."""
        if len(set(versions)) == 1:
            return self.cross_kv[versions[0]]
        return {layer: tuple(torch.cat([self.cross_kv[version][layer][i] for version in versions]) for i in (0, 1))
                for layer in self.layers}

    def _forget_contexts_before(self, oldest: int) -> None:
        # Ticks use ever newer contexts per slot, so one older than every slot's is done with.
        for version in [v for v in self.contexts if v < oldest]:
            del self.contexts[version], self.cross_kv[version], self.context_since[version]

    # -- the last stage's role ----------------------------------------------------------------
    def finish(self, header: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Head, x0, re-noise and decode on the last stage; returns what goes back to rank 0:
        the next step's input (first chunk) or the re-noised stream batch, and finished frames."""
        x, noisy = tensors["x"], tensors["noisy"]
        latent_h, latent_w = header["latent_size"]
        _, ph, pw = self.dit.config.patch_size
        if header["new_stream"]:
            self.decoder_state = self.decoder.new_stream()
        flow = self.dit.finish(x, tensors["time_emb"], latent_h // ph, latent_w // pw)
        t = torch.tensor(header["timesteps"], device=self.device)
        x0 = x0_from_flow(noisy, flow, sigma_for_timestep(t).to(self.device))
        steps, seeds, chunks = header["steps"], header["seeds"], header["chunks"]

        if header["first"]:  # the first chunk's steps run one after another
            step = header["step"]
            if step + 1 < len(steps):
                noise = chunk_noise(x0.shape, seeds[0], 0, step + 1, device=self.device, dtype=self.dtype)
                return {"next": add_noise(x0, noise, float(sigma_for_timestep(steps[step + 1])))}
            return {"frames": self.decoder.stream_decode(x0, self.decoder_state)}

        out = {}
        if len(steps) > 1:
            renoised = noisy.clone()
            for i in range(len(steps) - 1):  # slot i's x0 goes round the ring to take step i+1
                noise = chunk_noise(x0[i:i + 1].shape, seeds[i], chunks[i], i + 1, device=self.device,
                                    dtype=self.dtype)
                renoised[i + 1] = add_noise(x0[i:i + 1], noise, float(sigma_for_timestep(steps[i + 1])))[0]
            out["renoised"] = renoised
        if chunks[-1] >= 1:  # the last slot holds a streamed chunk, now finished
            out["frames"] = self.decoder.stream_decode(x0[-1:], self.decoder_state)
        return out

    # -- ranks 1..N-1 -------------------------------------------------------------------------
    @torch.no_grad()
    def serve(self) -> None:
        """Run this stage on every message from the previous rank until rank 0 closes the pipeline."""
        while True:
            header, tensors = self.prev.recv()
            if header["kind"] == "pass":
                with self.clock.measure("blocks"):
                    tensors = self.run_blocks(header, tensors)
                if self.is_last:
                    with self.clock.measure("role"):
                        back = self.finish(header, tensors)
                    closure = {"kind": "closure", "tick": header["tick"], "chunk": header["chunks"][-1],
                               "stage_times": header["stage_times"] + [self.clock.lap()]}
                    self.ring.send(closure, back)
                else:
                    header["stage_times"].append(self.clock.lap())
                    self.next.send(header, tensors)
            elif header["kind"] == "split":
                if self.next is not None:
                    self.next.send(header)
                self.apply_split(header["split"])
            elif header["kind"] == "close":
                if self.next is not None:
                    self.next.send(header)
                break
        self.flush()

    # -- moving blocks ------------------------------------------------------------------------
    @torch.no_grad()
    def apply_split(self, split: Sequence[int]) -> None:
        """Hand the blocks this rank loses to its neighbours and take the ones it gains,
        weights and KV caches (called on every rank, the ring drained)."""
        old, new = self.layers, range(split[self.rank], split[self.rank + 1])
        neighbours = {peer: (range(self.split[peer], self.split[peer + 1]), range(split[peer], split[peer + 1]))
                      for peer in (self.rank - 1, self.rank + 1) if 0 <= peer < self.world}
        from_afar = [layer for layer in new if layer not in old
                     and all(layer not in peer_old for peer_old, _ in neighbours.values())]
        if from_afar:
            raise ValueError(f"split {list(split)} moves blocks {from_afar} further than to a neighbouring rank")
        for peer, (_, peer_new) in neighbours.items():  # sends first: they do not wait for the peer
            given = [layer for layer in old if layer in peer_new]
            if given:
                self._send_blocks(peer, given)
        for peer, (peer_old, _) in neighbours.items():
            if any(layer in peer_old for layer in new):
                self._take_blocks(peer)
        self.split = list(split)

    def _link(self, peer: int) -> Link:
        return self.prev if peer == self.rank - 1 else self.next

    def _send_blocks(self, peer: int, layers: list[int]) -> None:
        tensors = {}
        for layer in layers:
            block, self.dit.blocks[layer] = self.dit.blocks[layer], None
            tensors.update({f"{layer}.{name}": t for name, t in block.state_dict().items()})
            if self.cache is not None:
                tensors[f"{layer}.cache.keys"], tensors[f"{layer}.cache.values"] = self.cache.take_layer(layer)
            for kv in self.cross_kv.values():
                kv.pop(layer)
        self._link(peer).send({"kind": "blocks", "layers": layers}, tensors)

    def _take_blocks(self, peer: int) -> None:
        header, tensors = self._link(peer).recv()
        if header["kind"] != "blocks":
            raise RuntimeError(f"rank {self.rank} expected blocks from rank {peer}, got a {header['kind']!r} message")
        for layer in header["layers"]:
            prefix = f"{layer}."
            with torch.device("meta"):
                block = WanBlock(self.dit.config)
            block.load_state_dict({name.removeprefix(prefix): t for name, t in tensors.items()
                                   if name.startswith(prefix) and ".cache." not in name}, assign=True)
            self.dit.blocks[layer] = block.eval()
            if self.cache is not None:
                self.cache.put_layer(layer, tensors[f"{layer}.cache.keys"], tensors[f"{layer}.cache.values"])
            for version, embedded in self.contexts.items():
                self.cross_kv[version].update(self.dit.blocks_context_kv(embedded, [layer]))

    def flush(self) -> None:
        for link in {id(link): link for link in (self.prev, self.next, self.ring) if link is not None}.values():
            link.flush()


# -- rank 0: frames in, frames out -------------------------------------------------------------

@dataclass(frozen=True)
class PushRecord:
    """What a push fixed for the steps that run when it comes: the live settings then."""

    size: tuple[int, int]  # the host's frame size of the chunk pushed
    context: int  # text context version
    seed: int
    fit: str


class ParallelStreamPipeline:
    """Frames in, stylised frames out, like :class:`~engine.pipeline.StreamPipeline`,
    with the DiT's blocks spread over the ranks. Used on rank 0; the other ranks
    run :meth:`PipelineStage.serve`.

    ``push`` returns the frames that have come back round the ring, maybe none;
    ``drain`` waits for every tick in flight. ``balancer`` (None: never) moves
    blocks between neighbouring ranks when their measured times drift apart."""

    def __init__(self, stage: PipelineStage, settings: StreamSettings = StreamSettings(), *,
                 balancer: BlockBalancer | None = None):
        if stage.rank != 0:
            raise ValueError("ParallelStreamPipeline runs on rank 0; other ranks call stage.serve()")
        _check_parallel_settings(settings)
        self.stage, self.settings, self.balancer = stage, settings, balancer
        self.vae = stage.vae
        self.prompts = PromptCache(stage.text_encoder)
        self.device, self.dtype = stage.device, stage.dtype
        self.context_version = -1
        self.unsent_context: tuple[int, torch.Tensor] | None = None
        self.finished: deque[np.ndarray] = deque()  # host frames back from the ring, not yet returned
        self.host_size = (settings.height, settings.width)  # of the latest chunk pushed
        self.moves = 0  # block moves so far (each a neighbour step)
        self.next_tick = 0  # tick m carries chunk m in (tick 0: the first chunk's steps)
        self.closed_tick = -1  # the last tick whose closure came back
        self._new_context()
        self.reset()

    # -- settings -----------------------------------------------------------------------------
    def update(self, **changes) -> bool:
        """As :meth:`StreamPipeline.update`: live settings apply from the next push
        (to each step as it would run in one process), others rebuild the stream."""
        new = replace(self.settings, **changes)
        _check_parallel_settings(new)
        rebuild = any(getattr(new, k) != getattr(self.settings, k) for k in changes if k not in LIVE_SETTINGS)
        self.settings = new
        if rebuild:
            self.reset()
        else:
            if any(k in changes for k in ("prompt", "prompts", "blend")):
                self._new_context()
            self.motion.settings = replace(self.motion.settings, noise_scale=new.strength)
        return rebuild

    def reset(self) -> None:
        """Start a new stream; what is in flight still comes back (its frames with the next push)."""
        s = self.settings
        self._receive_closures(until=self.next_tick - 1)
        self.steps = denoising_steps(s.steps)
        self.motion = MotionNoiseController(replace(s.motion, noise_scale=s.strength))
        self.vae_state = self.vae.new_stream()
        self.next_tick, self.closed_tick = 0, -1
        self.ring_states: dict[int, torch.Tensor] = {}  # tick -> its stream batch, back from the ring
        self.pushes: dict[int, PushRecord] = {}
        self.first_latents = 0

    @property
    def lag_frames(self) -> int:
        """Input frames between a chunk going in and its denoising finishing."""
        return FRAMES_PER_LATENT * (self.settings.steps - 1) * self.stage.world

    @property
    def first_chunk_frames(self) -> int:
        return self.settings.first_chunk_frames

    # -- streaming -----------------------------------------------------------------------------
    @torch.no_grad()
    def push(self, frames) -> np.ndarray:
        """Take a chunk of frames (as StreamPipeline.push); return the finished frames
        that are back, uint8 [T', H, W, 3], possibly none."""
        m = self.next_tick
        pixels, size = model_frames(frames, (self.first_chunk_frames if m == 0 else FRAMES_PER_LATENT,),
                                    self.settings, device=self.device, dtype=self.dtype)
        s = self.settings
        self.pushes[m] = PushRecord(size, self.context_version, s.seed, s.fit)
        self.host_size = size
        with self.stage.clock.measure("role"):
            latents = self.vae.stream_encode(pixels, self.vae_state)
        if m == 0:
            return self._first_chunk(latents, pixels)
        self._stream_tick(latents, pixels)
        self._receive_closures(until=self.closed_tick)  # those already back, without waiting
        return self._take_finished(size)

    def drain(self) -> np.ndarray:
        """Wait for every tick in flight; return the frames that came back."""
        self._receive_closures(until=self.next_tick - 1)
        return self._take_finished(self.host_size)

    def rebalance(self, split: Sequence[int]) -> None:
        """Move blocks to reach ``split`` (the ring drained, in neighbour steps)."""
        split = list(split)
        if len(split) != self.stage.world + 1 or split[0] != 0 or split[-1] != self.stage.dit.config.num_layers \
                or any(b <= a for a, b in zip(split, split[1:])):
            raise ValueError(f"a split is [0, ..., {self.stage.dit.config.num_layers}] with one boundary per rank, "
                             f"each rank at least one block; got {split}")
        self._receive_closures(until=self.next_tick - 1)
        while self.stage.split != split:
            step = neighbour_step(self.stage.split, split)
            self.stage.next.send({"kind": "split", "split": step})
            self.stage.apply_split(step)
            self.moves += 1
        if self.balancer is not None:
            self.balancer.forget()

    def close(self) -> None:
        """Stop the other ranks (after waiting for the ticks in flight; ``drain`` first to get their frames)."""
        self._receive_closures(until=self.next_tick - 1)
        self.stage.next.send({"kind": "close"})
        self.stage.flush()

    # -- ticks ---------------------------------------------------------------------------------
    def _first_chunk(self, latents: torch.Tensor, pixels: torch.Tensor) -> np.ndarray:
        """The first latents with every step in turn, each once round the ring."""
        noise_scale, first_t = self.motion.first_chunk(pixels)
        record = self.pushes[0]
        x = add_noise(latents, self._noise(latents.shape, record.seed, 0, 0), noise_scale)
        steps = [first_t] + self.steps[1:]
        for step, t in enumerate(steps):
            self._send_tick(x, [t], chunks=[0], frame_starts=[0], records=[record], first=True, step=step)
            _, back = self.stage.ring.recv()
            x = back.get("next")
        self.first_latents = latents.shape[2]
        self.next_tick, self.closed_tick = 1, 0
        self.finished.append(host_frames(back["frames"], record.size, record.fit))
        return self._take_finished(record.size)

    def _stream_tick(self, latents: torch.Tensor, pixels: torch.Tensor) -> None:
        """Tick m: chunk m enters slot 0; slot i holds chunk m - i*N at step i."""
        if self.balancer is not None and (split := self.balancer.proposal(self.stage.split)):
            self.rebalance(split)
        m, n, world = self.next_tick, len(self.steps), self.stage.world
        noise_scale, first_t = self.motion.update(pixels)
        noisy = add_noise(latents, self._noise(latents.shape, self.pushes[m].seed, m, 0), noise_scale)
        self._receive_closures(until=m - world)
        batch = self.ring_states.pop(m, None)
        if batch is None:  # slots that hold no chunk yet compute on a copy (as StreamPipeline)
            batch = noisy.repeat(n, 1, 1, 1, 1)
        batch[0] = noisy[0]
        chunks = [m - i * world for i in range(n)]
        # A slot that holds no chunk yet re-processes the first streamed latent's frame
        # number: its writes land in the slot that chunk's own write overwrites.
        frame_starts = [self.first_latents + max(chunk, 1) - 1 for chunk in chunks]
        # Chunk c's step i runs when one process has had chunk c + i pushed: its settings then.
        records = [self.pushes[c + i] if c >= 1 else self.pushes[m] for i, c in enumerate(chunks)]
        self._send_tick(batch, [first_t] + self.steps[1:], chunks, frame_starts, records)
        self.next_tick += 1
        for old in [p for p in self.pushes if p < m - (n + 1) * world]:
            del self.pushes[old]  # no tick or output in flight refers to it any more

    def _send_tick(self, batch: torch.Tensor, timesteps: list[int], chunks: list[int], frame_starts: list[int],
                   records: list[PushRecord], *, first: bool = False, step: int = 0) -> None:
        stage = self.stage
        header = {"kind": "pass", "tick": self.next_tick, "new_stream": first and step == 0, "first": first,
                  "step": step, "latent_size": list(batch.shape[-2:]), "steps": self.steps,
                  "timesteps": timesteps, "chunks": chunks, "frame_starts": frame_starts,
                  "contexts": [r.context for r in records], "seeds": [r.seed for r in records],
                  "stage_times": []}
        tensors = {"noisy": batch}
        if self.unsent_context is not None:
            version, embedded = self.unsent_context
            tensors[f"context.{version}"] = embedded
            self.unsent_context = None
        with stage.clock.measure("role"):
            t = torch.tensor(timesteps, device=self.device).reshape(-1, 1).expand(batch.shape[0], batch.shape[2])
            tensors["x"], tensors["time_mod"], tensors["time_emb"] = stage.dit.embed(batch, t)
        with stage.clock.measure("blocks"):
            tensors = stage.run_blocks(header, tensors)
        header["stage_times"].append(stage.clock.lap())
        stage.next.send(header, tensors)

    def _receive_closures(self, until: int) -> None:
        """Take the ring's returns up to tick ``until``, then any others already here."""
        ring = self.stage.ring
        while self.closed_tick < until or (self.closed_tick < self.next_tick - 1 and ring.ready()):
            header, back = ring.recv()
            self.closed_tick = header["tick"]
            if "renoised" in back:
                self.ring_states[header["tick"] + self.stage.world] = back["renoised"]
            if "frames" in back:
                chunk = header["chunk"]
                decoded_at = chunk + len(self.steps) - 1  # when one process decodes it: its fit then
                self.finished.append(host_frames(back["frames"], self.pushes[chunk].size,
                                                 self.pushes[decoded_at].fit))
            if self.balancer is not None:
                self.balancer.observe(header["stage_times"])

    def _take_finished(self, size: tuple[int, int]) -> np.ndarray:
        """The finished frames of one host size (a size change waits for the next push)."""
        if not self.finished:
            return np.zeros((0, *size, 3), dtype=np.uint8)
        same = [self.finished.popleft()]
        while self.finished and self.finished[0].shape[1:] == same[0].shape[1:]:
            same.append(self.finished.popleft())
        return np.concatenate(same)

    def _noise(self, shape, seed: int, chunk: int, step: int) -> torch.Tensor:
        return chunk_noise(shape, seed, chunk, step, device=self.device, dtype=self.dtype)

    def _new_context(self) -> None:
        """Encode the prompt(s) as a new context version, to travel with the next tick."""
        self.context_version += 1
        context = prompt_context(self.prompts, self.settings).to(self.device, self.dtype)
        self.unsent_context = (self.context_version, self.stage.dit.embed_context(context))


def _check_parallel_settings(settings: StreamSettings) -> None:
    if not settings.stream_batch or settings.mode != "v2v":
        raise ValueError("the pipeline-parallel stream runs video-to-video with stream batching "
                         "(stream_batch=True, mode='v2v'): its ranks work on different steps at once")


# -- starting --------------------------------------------------------------------------------

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
def measure_tick_costs(config: ModelConfig, settings: StreamSettings, *, rank: int, world: int, vae, decoder,
                       device: torch.device, dtype: torch.dtype, repeats: int = 3) -> tuple[float, float]:
    """Seconds of this rank's role work in one stream tick (VAE encode of a chunk on
    rank 0, decode of a latent on the last rank) and of one DiT block on its
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
    if rank == 0:
        state = vae.new_stream()
        vae.stream_encode(torch.rand(1, 3, 1, settings.height, settings.width, device=device, dtype=dtype), state)
        chunk = torch.rand(1, 3, FRAMES_PER_LATENT, settings.height, settings.width, device=device, dtype=dtype)
        role_seconds += median_seconds(lambda: vae.stream_encode(chunk, state))
    if rank == world - 1:
        state = decoder.new_stream()
        latent = torch.randn(1, config.out_dim, 1, latent_h, latent_w, device=device, dtype=dtype)
        role_seconds += median_seconds(lambda: decoder.stream_decode(latent, state))
    return role_seconds, block_seconds


def start_stage(source: BuiltModels | PublishedWeights, settings: StreamSettings, *, split: Sequence[int] | None = None,
                max_in_flight: int = 2) -> PipelineStage:
    """This rank's stage (call on every rank; torch.distributed initialised). Without
    ``split``, every rank measures its tick's costs and the split that makes the
    slowest stage fastest is chosen; each rank then loads only its blocks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    config = source.config
    if not 2 <= world <= config.num_layers:
        raise ValueError(f"pipeline parallelism needs 2 to {config.num_layers} ranks (one block each at least) "
                         f"for {config.name}; got {world}")
    _check_parallel_settings(settings)
    # Headers (and the cost exchange) travel on the CPU: a gloo group beside NCCL.
    control = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    device = torch.device(source.device)
    vae, text_encoder, decoder = source.ends(rank, world)
    if split is None:
        costs = measure_tick_costs(config, settings, rank=rank, world=world, vae=vae, decoder=decoder,
                                   device=device, dtype=source.dtype)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, costs, group=control)
        model = CostModel(blocks=(1.0,) * config.num_layers, role=tuple(c[0] for c in gathered),
                          speed=tuple(c[1] for c in gathered))
        split = balanced_split(config.num_layers, world, model)
    dit = source.dit_part(range(split[rank], split[rank + 1]), embeddings=rank == 0, head=rank == world - 1)
    peers = {rank - 1, rank + 1} | ({world - 1} if rank == 0 else {0} if rank == world - 1 else set())
    links = {peer: Link(peer, device=device, control_group=control, max_in_flight=max_in_flight)
             for peer in peers if 0 <= peer < world and peer != rank}
    return PipelineStage(dit, split, rank=rank, world=world, links=links, vae=vae, text_encoder=text_encoder,
                         decoder=decoder)


def run_cli(args) -> None:
    """``torchrun --nproc-per-node N -m engine run ...``: the run command with the
    DiT's blocks over N ranks; rank 0 reads the clip, prints and writes the result."""
    from .cli import RUN_FLAGS, model_size, read_video, session_flag_values, test_pattern, write_video
    from .models.weights import build_models

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        height, width = model_size(args.model, args.size)
        settings = StreamSettings(height=height, width=width, stream_batch=not args.no_stream_batch,
                                  **session_flag_values(args, RUN_FLAGS))
        if rank == 0:
            print(f"loading {args.model} over {world} ranks ({device.type}) ...", flush=True)
        if args.model == "tiny":
            source = BuiltModels(build_models("tiny", device=device, dtype=dtype, taehv=args.taehv))
        else:
            source = PublishedWeights(args.model, args.weights, device=device, dtype=dtype, taehv=args.taehv)
        stage = start_stage(source, settings)
        if rank == 0:
            _drive(ParallelStreamPipeline(stage, settings, balancer=BlockBalancer()), args, height, width,
                   read_video, test_pattern, write_video)
        else:
            stage.serve()
    finally:
        dist.destroy_process_group()


def _drive(pipe: ParallelStreamPipeline, args, height: int, width: int, read_video, test_pattern, write_video) -> None:
    if args.source == "testpattern":
        video, fps = test_pattern(args.frames, height, width), args.fps
    else:
        video, fps = read_video(args.source, args.frames)
    first = pipe.first_chunk_frames
    chunks = [video[:first]] + [video[i:i + 4] for i in range(first, len(video) - 3, 4)]
    print(f"split of the blocks over the ranks: {pipe.stage.split}", flush=True)
    outputs, started = [], time.perf_counter()
    for index, chunk in enumerate(chunks, 1):
        outputs.append(pipe.push(chunk))
        print(f"\rchunk {index}/{len(chunks)}  frames out {sum(len(o) for o in outputs)}", end="", file=sys.stderr,
              flush=True)
    outputs.append(pipe.drain())
    elapsed = time.perf_counter() - started
    pipe.close()
    produced = sum(len(o) for o in outputs)
    print(file=sys.stderr)
    print(f"frames in {sum(len(c) for c in chunks)}, frames out {produced}, lag {pipe.lag_frames} frames; "
          f"{produced / elapsed:.1f} frames/s overall; final split {pipe.stage.split} after {pipe.moves} moves")
    if args.output:
        write_video(args.output, [o for o in outputs if len(o)], fps)
        print(f"wrote {args.output}")
