"""Where a stream's DiT calls run: the one seam between StreamPipeline and the device(s).

A pipeline yields DiT calls (:class:`~.models.dit.StreamInput`); ``push_streams``
groups calls of the same size into one forward and hands each group to the
pipelines' executor:

- :class:`LocalExecutor` runs the whole DiT in this process: ``submit`` computes the
  forward at once (``depth`` 1: a result is ready before the next call is made). With
  ``cuda_graphs`` a steady call runs as a static step (engine/static_step.py): on
  buffers that stay put, replayed as a CUDA graph on a GPU;
- the pipeline-stage executor (engine/parallel/stage.py) runs the DiT's blocks over
  torch.distributed ranks: ``submit`` runs rank 0's blocks and sends the activations on,
  and the flow comes back round the ring later. Its ``depth`` is the number of ranks:
  that many stream-batch forwards are in flight at once, one on each rank.

Every executor gives the same flows for the same calls; the pipeline does everything
else (noise, steps, caches' bookkeeping, VAE, prompts), so every mode and setting works
the same on one rank or many.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .models.dit import CausalWanDiT, StreamInput
from .models.kv_cache import KVCache
from .static_step import StaticSteps


class ExecutorFailed(RuntimeError):
    """The executor itself cannot go on (a rank is gone): no stream can, and the engine stops.
    Not a stream's failure, so push_streams lets it through."""


class Ticket(Protocol):
    def result(self) -> list[torch.Tensor | Exception]:
        """Each call's flow, or the exception that failed it (waits for it where it is not back yet)."""


class Executor(Protocol):
    depth: int  # forwards a stream may have in flight at once
    dit: CausalWanDiT  # the part of the DiT held in this process (all of it on one rank)

    def new_cache(self, batch: int, height: int, width: int) -> KVCache:
        """An empty KV cache for the blocks this executor runs (its bookkeeping is kept here)."""

    def repeat_cache(self, cache: KVCache, batch: int) -> KVCache:
        """A cache of ``batch`` elements, each a copy of ``cache``'s element 0 (the stream batch's slots)."""

    def submit(self, calls: list[StreamInput]) -> Ticket:
        """Start one forward of these calls (same latent size); their results come from the ticket."""


class Done:
    """A ticket whose results are already here."""

    def __init__(self, flows: list[torch.Tensor | Exception]):
        self.flows = flows

    def result(self) -> list[torch.Tensor | Exception]:
        return self.flows


class LocalExecutor:
    """The whole DiT in this process. A shared forward that fails is run again call by call,
    so that a failure (running out of memory, say) falls on the stream that causes it.

    ``cuda_graphs``: run each steady call (one stream, no LoRA adapters, its cache full)
    as a static step, captured once as a CUDA graph and replayed where the DiT is on a
    GPU; on the CPU the same step runs eagerly on its buffers (what the tests check).
    Off by default: no GPU measurement says yet that it is faster (bench/speed_gpu.py)."""

    depth = 1

    def __init__(self, dit: CausalWanDiT, *, cuda_graphs: bool = False):
        self.dit = dit
        self.static_steps = StaticSteps(dit) if cuda_graphs else None

    def new_cache(self, batch: int, height: int, width: int) -> KVCache:
        return self.dit.new_cache(batch, height, width)

    def repeat_cache(self, cache: KVCache, batch: int) -> KVCache:
        return cache.repeated(batch)

    def submit(self, calls: list[StreamInput]) -> Done:
        return Done(self._forward(calls))

    def _forward(self, calls: list[StreamInput]) -> list[torch.Tensor | Exception]:
        positions = [call.cache.save_position() for call in calls] if len(calls) > 1 else None
        try:
            if self.static_steps is not None and self.static_steps.is_steady(calls):
                return [self.static_steps.run(calls[0])]
            return self.dit.forward_streams(calls)
        except Exception as error:  # noqa: BLE001 - retried alone below, or returned for its stream
            if len(calls) == 1:
                return [error]
        # Out of the except clause, so the failed forward's tensors are freed before the retries.
        for call, position in zip(calls, positions):
            call.cache.restore_position(position)
        return [flow for call in calls for flow in self._forward([call])]


def executor_for(dit_or_executor) -> Executor:
    """An executor as given, or a local one for a DiT."""
    return LocalExecutor(dit_or_executor) if isinstance(dit_or_executor, CausalWanDiT) else dit_or_executor
