"""The DiT's blocks over torch.distributed ranks: rank 0's executor and the other ranks' loop.

    rank 0      the pipelines (VAE, motion, noise, text, x0), embeddings, blocks [0, b1)
    rank k      blocks [bk, bk+1)
    rank N-1    blocks [bN-1, L) and the head; the flow goes back to rank 0

A forward goes round the ring: rank 0 runs its blocks and sends the activations on,
each rank runs its blocks on them, the last rank sends the flow back to rank 0.
Sends are asynchronous, so rank 0 prepares the next chunk while the others work:
with N ranks, N stream-batch ticks are in flight (the executor's ``depth``).

Rank 0 keeps the bookkeeping of every KV cache (its slot plan; the first layer,
which decides adaptive sink replacement, is on rank 0); the other ranks keep only
their layers' keys and values of each cache and follow the plan that comes with each
forward. Caches are mirrored by number: made where a forward first names one, copied
for a stream batch as rank 0 copies them, dropped once rank 0 lets go of one. A
stream's text context travels (embedded) with the first forward that uses it. A
stream's LoRA adapters travel as their files and scales with every forward: each rank
reads the files (they are on the one machine torchrun starts the ranks on) and adapts
its blocks' rows of that stream.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch

from ..executor import Done, ExecutorFailed
from ..models.attention import StreamRows
from ..models.dit import CausalWanDiT, StreamInput, WanBlock
from ..models.kv_cache import KVCache, WritePlan
from ..models.lora import Adapters, LoraLibrary, LoraMix, block_gained, context_rows, lora_rows
from .links import Link
from .split import BlockBalancer, neighbour_step


class LinkFailed(ExecutorFailed):
    """A rank stopped answering: the engine cannot go on (every rank stops)."""


class StageClock:
    """Seconds this rank spends running its blocks, measured without stalling the device:
    the host clock on a CPU; on a GPU, CUDA events, read once they have completed
    (so a later forward's message carries them)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.unread: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self.seconds: list[float] = []

    @contextmanager
    def measure(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.unread.append((start, end))
        else:
            started = time.perf_counter()
            yield
            self.seconds.append(time.perf_counter() - started)

    def take(self) -> list[float]:
        """The seconds measured and complete since the last take."""
        while self.unread and self.unread[0][1].query():
            start, end = self.unread.popleft()
            self.seconds.append(start.elapsed_time(end) / 1000)
        taken, self.seconds = self.seconds, []
        return taken


class _Blocks:
    """What every rank does with its part of the DiT: the blocks it holds, and moving
    blocks (weights and each cache's keys and values) to and from its neighbours."""

    def __init__(self, dit: CausalWanDiT, split: Sequence[int], rank: int, world: int, links: dict[int, Link]):
        self.dit, self.split, self.rank, self.world, self.links = dit, list(split), rank, world, links
        param = next(dit.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.clock = StageClock(self.device)

    @property
    def layers(self) -> range:
        return range(self.split[self.rank], self.split[self.rank + 1])

    def caches(self) -> dict[int, KVCache]:
        raise NotImplementedError

    def gained_layers(self, layers: list[int]) -> None:
        """Blocks just taken from a neighbour: make their text K/V for the streams' contexts."""
        raise NotImplementedError

    @torch.no_grad()
    def apply_split(self, split: Sequence[int]) -> None:
        """Hand the blocks this rank loses to its neighbours and take the ones it gains,
        weights and KV caches (on every rank, nothing in flight)."""
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
        gained = []
        for peer, (peer_old, _) in neighbours.items():
            if any(layer in peer_old for layer in new):
                gained += self._take_blocks(peer)
        self.split = list(split)
        if gained:
            self.gained_layers(gained)

    def _send_blocks(self, peer: int, layers: list[int]) -> None:
        tensors = {}
        for layer in layers:
            block, self.dit.blocks[layer] = self.dit.blocks[layer], None
            tensors.update({f"{layer}.{name}": t for name, t in block.state_dict().items()})
            for uid, cache in self.caches().items():
                tensors[f"cache.{uid}.{layer}.keys"], tensors[f"cache.{uid}.{layer}.values"] = cache.take_layer(layer)
        self.links[peer].send({"kind": "blocks", "layers": layers}, tensors)

    def _take_blocks(self, peer: int) -> list[int]:
        header, tensors = self.links[peer].recv()
        if header["kind"] != "blocks":
            raise RuntimeError(f"rank {self.rank} expected blocks from rank {peer}, got a {header['kind']!r} message")
        caches = self.caches()
        for layer in header["layers"]:
            prefix = f"{layer}."
            with torch.device("meta"):
                block = WanBlock(self.dit.config)
            block.load_state_dict({name.removeprefix(prefix): t for name, t in tensors.items()
                                   if name.startswith(prefix)}, assign=True)
            self.dit.blocks[layer] = block.eval()
            block_gained(self.dit, layer)
            for uid, cache in caches.items():
                keys, values = tensors.get(f"cache.{uid}.{layer}.keys"), tensors.get(f"cache.{uid}.{layer}.values")
                if keys is not None:
                    cache.put_layer(layer, keys, values)
        return list(header["layers"])


class _Ticket:
    """A forward in flight round the ring; its flows once the last rank has sent them back."""

    def __init__(self, executor: StageExecutor, seq: int, rows: list[int]):
        self.executor, self.seq, self.rows = executor, seq, rows
        self.flows: list[torch.Tensor | Exception] | None = None

    def result(self) -> list[torch.Tensor | Exception]:
        if self.flows is None:
            self.executor.collect(until=self.seq)
        return self.flows


class StageExecutor(_Blocks):
    """Rank 0's side: runs the embeddings and its blocks, sends each forward round the
    ring and takes the flows back (engine/executor.py's interface). ``balancer`` (None:
    never) moves blocks between neighbouring ranks when their measured times drift apart."""

    def __init__(self, dit: CausalWanDiT, split: Sequence[int], world: int, links: dict[int, Link], *,
                 balancer: BlockBalancer | None = None):
        super().__init__(dit, split, 0, world, links)
        self.depth = world
        self.next, self.ring = links[1], links[world - 1]
        self.balancer = balancer
        self.seq = 0  # forwards sent
        self.waiting: dict[int, _Ticket] = {}  # seq -> its ticket, until its flow is back
        self.live: weakref.WeakValueDictionary[int, KVCache] = weakref.WeakValueDictionary()  # mirrored caches
        self.repeats: list[tuple[int, int, int]] = []  # (copy, of cache, batch) not yet told to the other ranks
        self.dropped: deque[int] = deque()  # caches let go of, not yet told (appended by their finalizers)
        self.moves = 0  # block moves so far (each a neighbour step)
        self.stage_times: deque[list[list[float]]] = deque(maxlen=64)  # per forward back: [own, blocks] per rank
        self.busy_since = time.perf_counter()  # rank 0's own work: wall time less waits on the ring
        self.waited = 0.0

    def caches(self) -> dict[int, KVCache]:
        return dict(self.live.items())

    def gained_layers(self, layers: list[int]) -> None:
        for cache in self.live.values():
            cache.context = None  # its text K/V are made again, for every block it holds now

    # -- the executor interface ------------------------------------------------------------
    def new_cache(self, batch: int, height: int, width: int) -> KVCache:
        return self.dit.new_cache(batch, height, width)

    def repeat_cache(self, cache: KVCache, batch: int) -> KVCache:
        copy = cache.repeated(batch)
        if cache.uid in self.live:
            self.repeats.append((copy.uid, cache.uid, batch))
            self._mirror(copy)
        return copy

    def submit(self, calls: list[StreamInput]) -> _Ticket | Done:
        if self.balancer is not None and (split := self.balancer.proposal(self.split)):
            self.rebalance(split)
        try:
            header, tensors = self._first_stage(calls)
        except Exception as error:  # noqa: BLE001 - nothing was sent: this forward fails here, for its streams
            return Done([error] * len(calls))
        ticket = _Ticket(self, self.seq, [call.latents.shape[0] for call in calls])
        self.waiting[self.seq] = ticket
        self.seq += 1
        try:
            self.next.send(header, tensors)
        except RuntimeError as error:  # gloo's word for a peer that is gone
            raise LinkFailed(f"rank 1 stopped answering ({error}); the engine stops") from error
        return ticket

    def collect(self, until: int) -> None:
        """Take the flows back from the ring up to forward ``until``."""
        started = time.perf_counter()
        try:
            while until in self.waiting:
                header, tensors = self.ring.recv()
                ticket = self.waiting.pop(header["seq"])
                if "error" in header:
                    ticket.flows = [RuntimeError(header["error"])] * len(ticket.rows)
                else:
                    ticket.flows = list(tensors["flow"].split(ticket.rows))
                self.stage_times.append(header["times"])
                if self.balancer is not None:
                    self.balancer.observe(header["times"])
        except RuntimeError as error:  # gloo's word for a peer that is gone
            raise LinkFailed(f"rank {self.world - 1} stopped answering ({error}); the engine stops") from error
        finally:
            self.waited += time.perf_counter() - started

    def close(self) -> None:
        """Stop the other ranks (after the forwards in flight come back)."""
        self.collect(until=self.seq - 1)
        self.next.send({"kind": "close", **self._housekeeping()})
        for link in self.links.values():
            link.flush()

    # -- moving blocks -------------------------------------------------------------------------
    def rebalance(self, split: Sequence[int]) -> None:
        """Move blocks to reach ``split`` (nothing in flight, in neighbour steps)."""
        split = list(split)
        num_layers = self.dit.config.num_layers
        if len(split) != self.world + 1 or split[0] != 0 or split[-1] != num_layers \
                or any(b <= a for a, b in zip(split, split[1:])):
            raise ValueError(f"a split is [0, ..., {num_layers}] with one boundary per rank, "
                             f"each rank at least one block; got {split}")
        self.collect(until=self.seq - 1)
        while self.split != split:
            step = neighbour_step(self.split, split)
            self.next.send({"kind": "split", "split": step, **self._housekeeping()})
            self.apply_split(step)
            self.moves += 1
        if self.balancer is not None:
            self.balancer.forget()

    # -- rank 0's part of a forward ------------------------------------------------------------
    def _first_stage(self, calls: list[StreamInput]) -> tuple[dict, dict[str, torch.Tensor]]:
        latents = torch.cat([call.latents for call in calls])
        timesteps = torch.cat([call.timesteps for call in calls])
        frames, height, width = latents.shape[2:]
        _, ph, pw = self.dit.config.patch_size
        grid_h, grid_w = height // ph, width // pw
        streams, entries, frame_numbers, tensors, start = [], [], [], {}, 0
        for index, call in enumerate(calls):
            cache, rows = call.cache, call.latents.shape[0]
            entry = {"rows": [start, start + rows], "cache": cache.uid}
            if cache.uid not in self.live:
                entry["new"] = [cache.batch, cache.frame_tokens]
                self._mirror(cache)
            if call.adapters is not None:
                entry["loras"] = _described(call.adapters)
            if not cache.holds_context(call.context, call.adapters):  # new to the other ranks
                with lora_rows(self.dit, [(slice(None), call.adapters)]):
                    tensors[f"context.{index}"] = self.dit.embed_context(context_rows(call.context, call.adapters))
            frame_numbers += cache.frame_numbers(frames)
            plan = cache.begin_write(frames)
            streams.append(StreamRows(slice(start, start + rows), cache, plan, self.dit.cached_context_kv(call)))
            entries.append(entry)
            start += rows
        now = time.perf_counter()
        with lora_rows(self.dit, [(stream.rows, call.adapters) for stream, call in zip(streams, calls)]):
            x, time_mod, time_emb = self.dit.embed(latents, timesteps)
            freqs = self.dit.rope_frequencies(frame_numbers, grid_h, grid_w, x.device)
            with self.clock.measure():
                x = self.dit.run_blocks(x, time_mod, freqs, streams, self.layers)
        for index, stream in enumerate(streams):  # the plan as the first layer left it (sink replacement)
            tensors[f"targets.{index}"] = stream.plan.targets
            if stream.plan.mask is not None:
                tensors[f"mask.{index}"] = stream.plan.mask
        tensors.update(x=x, time_mod=time_mod, time_emb=time_emb)
        # Rank 0's time per forward: its blocks, and its own work since the last forward less its waits.
        blocks = sum(self.clock.take())
        own = max(now - self.busy_since - self.waited, 0.0)
        self.busy_since, self.waited = time.perf_counter(), 0.0
        header = {"kind": "forward", "seq": self.seq, "grid": [grid_h, grid_w], "frame_numbers": frame_numbers,
                  "streams": entries, "times": [[own, blocks]], **self._housekeeping()}
        return header, tensors

    def _mirror(self, cache: KVCache) -> None:
        self.live[cache.uid] = cache
        weakref.finalize(cache, self.dropped.append, cache.uid)

    def _housekeeping(self) -> dict:
        """Caches to copy and to drop on the other ranks, told with the next message."""
        repeats, self.repeats = self.repeats, []
        drops = []
        while self.dropped:
            drops.append(self.dropped.popleft())
        return {"repeats": repeats, "drops": drops}


class RemoteStage(_Blocks):
    """Rank 1..N-1's side: its blocks on every forward from the previous rank, until rank 0 closes."""

    def __init__(self, dit: CausalWanDiT, split: Sequence[int], rank: int, world: int, links: dict[int, Link]):
        super().__init__(dit, split, rank, world, links)
        self.prev, self.next = links[rank - 1], links.get(rank + 1)
        self.ring = links[0] if rank == world - 1 else None
        self.mirrors: dict[int, KVCache] = {}  # rank 0's cache number -> this rank's layers of it
        # cache number -> (embedded text, its K/V, the LoRA adapters they were made with)
        self.contexts: dict[int, tuple[torch.Tensor, dict, Adapters]] = {}
        self.loras: LoraLibrary | None = None  # made when a stream first names adapters

    def caches(self) -> dict[int, KVCache]:
        return self.mirrors

    def gained_layers(self, layers: list[int]) -> None:
        for embedded, kv, adapters in self.contexts.values():
            with lora_rows(self.dit, [(slice(None), adapters)]):
                kv.update(self.dit.blocks_context_kv(embedded, layers))

    @torch.no_grad()
    def serve(self) -> None:
        while True:
            header, tensors = self.prev.recv()
            self._housekeeping(header)
            if header["kind"] == "forward":
                self._forward(header, tensors)
                continue
            if self.next is not None:
                self.next.send(header)
            if header["kind"] == "split":
                self.apply_split(header["split"])
            elif header["kind"] == "close":
                break
        for link in self.links.values():
            link.flush()

    def _housekeeping(self, header: dict) -> None:
        for copy, original, batch in header["repeats"]:
            self.mirrors[copy] = self.mirrors[original].repeated(batch)
            self.contexts[copy] = self.contexts[original]
        for uid in header["drops"]:
            self.mirrors.pop(uid, None)
            self.contexts.pop(uid, None)

    def _forward(self, header: dict, tensors: dict[str, torch.Tensor]) -> None:
        if "error" not in header:
            try:
                tensors = self._run_blocks(header, tensors)
            except Exception as error:  # noqa: BLE001 - fails this forward's streams, not the engine
                header = {**header, "error": f"rank {self.rank}: {type(error).__name__}: {error}"}
                tensors = {}
        header["times"] = header["times"] + [[0.0, sum(self.clock.take())]]
        if self.ring is None:
            self.next.send(header, tensors)  # with its housekeeping: every rank applies it
            return
        back = {"kind": "flow", "seq": header["seq"], "times": header["times"]}
        if "error" in header:
            self.ring.send({**back, "error": header["error"]})
        else:
            self.ring.send(back, {"flow": tensors["flow"]})

    def _run_blocks(self, header: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        grid_h, grid_w = header["grid"]
        streams, adapters = [], []
        for index, entry in enumerate(header["streams"]):
            uid = entry["cache"]
            if "new" in entry:
                batch, frame_tokens = entry["new"]
                self.mirrors[uid] = KVCache(self.dit.config, batch, frame_tokens, layers=self.layers,
                                            dtype=self.dtype, device=self.device)
            adapters.append(self._adapters(entry.get("loras")))
            if f"context.{index}" in tensors:
                embedded = tensors[f"context.{index}"]
                with lora_rows(self.dit, [(slice(None), adapters[-1])]):
                    self.contexts[uid] = (embedded, self.dit.blocks_context_kv(embedded, self.layers), adapters[-1])
            cache = self.mirrors[uid]
            mask = tensors.get(f"mask.{index}")
            plan = WritePlan(targets=tensors[f"targets.{index}"],
                             rows=torch.arange(cache.batch, device=self.device)[:, None],
                             mask=None if mask is None else mask.bool(), adapt=None)
            streams.append(StreamRows(slice(*entry["rows"]), cache, plan, self.contexts[uid][1]))
        freqs = self.dit.rope_frequencies(header["frame_numbers"], grid_h, grid_w, self.device)
        with lora_rows(self.dit, [(stream.rows, mixes) for stream, mixes in zip(streams, adapters)]):
            with self.clock.measure():
                x = self.dit.run_blocks(tensors["x"], tensors["time_mod"], freqs, streams, self.layers)
            if self.ring is not None:  # the last rank: the head
                return {"flow": self.dit.finish(x, tensors["time_emb"], grid_h, grid_w)}
        return {**tensors, "x": x}

    def _adapters(self, described: dict | None) -> Adapters:
        """A stream's adapters as rank 0 describes them (``_described``), read here too."""
        if described is None:
            return None
        if self.loras is None:
            self.loras = LoraLibrary(Path.cwd(), self.dit.config, device=self.device, dtype=self.dtype)
        if "rows" in described:
            return tuple(self.loras.mix(loras) for loras in described["rows"])
        return self.loras.mix(described["mix"])


def _described(adapters: Adapters) -> dict:
    """A stream's adapters as a message carries them: each mix as its files and scales (every
    rank reads the files: torchrun starts the ranks on one machine)."""
    def pairs(mix: LoraMix | None) -> list:
        return [] if mix is None else [[str(Path(adapter.path).resolve()), scale] for adapter, scale in mix.entries]
    if isinstance(adapters, tuple):
        return {"rows": [pairs(mix) for mix in adapters]}
    return {"mix": pairs(adapters)}

