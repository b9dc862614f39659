"""The steady DiT step on buffers that stay put, replayed as a CUDA graph on a GPU.

Once a stream is steady (its KV cache full, the same call again and again), one DiT
call differs from the last only in the values of a few tensors: the latents, the
timesteps, the frames' RoPE times, where the cache writes (and, after a prompt change,
the text's keys and values). A :class:`StaticStep` holds each of them in a buffer at a
fixed address and copies a call's values in, without allocating; the forward then reads
only those buffers and the cache's own (``CausalWanDiT.compute``), so on a GPU it is
captured once as a CUDA graph and replayed: one launch instead of thousands, and no
host-device wait. On the CPU it runs the same forward eagerly on the same buffers.

:class:`StaticSteps` keeps one step per call signature (which cache, which shape, whether
the sink replacement runs); the local executor sends it every call that is steady and
runs the others as before (a first chunk, a cache still filling, LoRA adapters, several
streams sharing one forward).
"""

from __future__ import annotations

import weakref

import torch

from .models.attention import StreamRows
from .models.dit import CausalWanDiT, StreamInput
from .models.kv_cache import KVCache, WritePlan
from .models.staging import StagedTensor


class StaticStep:
    """One steady call signature of one cache: its input buffers, and on a GPU its graph.

    The first call runs eagerly (on a side stream on a GPU: the warm-up CUDA graphs need);
    on a GPU the second captures the forward and every call from then on replays it.
    Capturing runs nothing, so no call's work is done twice and every call's result is
    the forward's on that call's values."""

    def __init__(self, dit: CausalWanDiT, call: StreamInput, *, graphs: bool, pool=None):
        self.dit = dit
        self.latents = torch.empty_like(call.latents, memory_format=torch.contiguous_format)
        self.timesteps = torch.empty(call.timesteps.shape, dtype=call.timesteps.dtype, device=call.latents.device)
        self.rope_times = StagedTensor(tuple(call.timesteps.shape), torch.long, call.latents.device)
        self.context_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per block, copied into
        self._context_kv_source = None  # the cache's text K/V last copied in
        self.graphs, self.pool = graphs, pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.flow: torch.Tensor | None = None  # the captured forward's output
        self.runs = 0  # calls run, the eager warm-up included
        self.replays = 0  # of them, replays of the captured graph

    def run(self, call: StreamInput, plan: WritePlan, frame_numbers: list[list[int]]) -> torch.Tensor:
        """The flow of ``call``, whose cache ``plan`` was made in place. On a GPU the result
        is the graph's output buffer, overwritten by this step's next call: use it first."""
        self.latents.copy_(call.latents)
        self.timesteps.copy_(call.timesteps)
        self.rope_times.write(self.dit.rope_times(frame_numbers))
        self._load_context_kv(call)
        streams = [StreamRows(slice(None), call.cache, plan, self.context_kv)]
        if not self.graphs:
            flow = self.dit.compute(self.latents, self.timesteps, self.rope_times.tensor, streams)
        elif self.runs == 0:
            flow = self._warm_up(streams)
        else:
            if self.graph is None:
                self._capture(streams)
            self.graph.replay()
            self.replays += 1
            flow = self.flow
        call.cache.end_write(plan)
        self.runs += 1
        return flow

    def _load_context_kv(self, call: StreamInput) -> None:
        """Copy the text's keys and values into the step's buffers when they changed
        (a new prompt, a transition's next blend): the graph reads the buffers."""
        source = self.dit.cached_context_kv(call)  # computed once per context, kept in the cache
        if source is self._context_kv_source:
            return
        if self.context_kv is None:
            self.context_kv = [(k.clone(), v.clone()) for k, v in source]
        else:
            for (k, v), (k_new, v_new) in zip(self.context_kv, source):
                k.copy_(k_new)
                v.copy_(v_new)
        self._context_kv_source = source

    def _warm_up(self, streams: list[StreamRows]) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            flow = self.dit.compute(self.latents, self.timesteps, self.rope_times.tensor, streams)
        torch.cuda.current_stream().wait_stream(side)
        return flow

    def _capture(self, streams: list[StreamRows]) -> None:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.flow = self.dit.compute(self.latents, self.timesteps, self.rope_times.tensor, streams)


class StaticSteps:
    """The static steps of one DiT, one per call signature, kept while their cache lives.
    Where the DiT is on a GPU they capture and replay CUDA graphs; elsewhere they run
    eagerly on their buffers."""

    def __init__(self, dit: CausalWanDiT):
        self.dit = dit
        self.graphs = next(dit.parameters()).device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None  # one memory pool for every graph
        self._steps: weakref.WeakKeyDictionary[KVCache, dict[tuple, StaticStep]] = weakref.WeakKeyDictionary()

    @staticmethod
    def is_steady(calls: list[StreamInput]) -> bool:
        """Whether a forward of these calls can run as a static step: one stream, no LoRA
        adapters, its cache full (every slot holds a frame, so no mask and no new slot)."""
        call = calls[0]
        return len(calls) == 1 and call.adapters is None and call.cache is not None and call.cache.is_full()

    def run(self, call: StreamInput) -> torch.Tensor:
        """The flow of a steady call (``is_steady``), as ``CausalWanDiT.forward_streams`` gives it."""
        self.dit.check_arguments(call.latents, call.timesteps, call.context, call.cache)
        cache, frames = call.cache, call.latents.shape[2]
        frame_numbers = cache.frame_numbers(frames)
        plan = cache.begin_write(frames, in_place=True)
        # What the captured forward depends on besides the values in its buffers.
        signature = (tuple(call.latents.shape), call.timesteps.dtype, call.context.shape[0],
                     plan.adapt is not None, plan.find_sink_directions)
        steps = self._steps.setdefault(cache, {})
        if signature not in steps:
            steps[signature] = StaticStep(self.dit, call, graphs=self.graphs, pool=self.pool)
        return steps[signature].run(call, plan, frame_numbers)

    def all(self) -> list[StaticStep]:
        """Every step kept now (to count their runs and replays)."""
        return [step for steps in self._steps.values() for step in steps.values()]
