"""The rolling KV cache: sink frames plus a ring of recent frames, per layer.

Each stream-batch slot (batch element) has its own cache of ``num_kv_cache``
latent frames. The first ``num_sink`` slots take the stream's first frames and
are never evicted; the other slots form a ring in which the oldest frame is
overwritten first. Keys are stored after RoPE, so a cached key keeps the position
it was written at and the slot order does not matter.

Where each frame goes is planned on the host once per forward and shared by all
layers, so a step costs one indexed write per layer and no host-device sync. A steady
step (:mod:`engine.static_step`) plans into buffers of the cache that stay at one
address (``begin_write(..., in_place=True)``), so a CUDA graph of the forward can read them.

Adaptive sink replacement: once an element's slots are all filled, a new frame
whose mean key and value (cosine, averaged over K and V) are unlike every sink
frame's, under the threshold, replaces the least similar sink frame instead of
taking a ring slot. Each element decides for itself, as published (per batch
slot), so a slot's cache does not depend on which other chunks share its batch:
the pipeline-parallel schedule batches different chunks than one process does.
The published model decides this in every layer from that layer's keys; here the
first layer's keys decide for all layers, which keeps one slot layout for the
whole model and costs a dozen small operations per step instead of per layer
(about a third of a 1.3B step when launched per layer). The decision is made on
the device into the plan's own tensors; the host reads it at the next step, when it
is long finished (on a GPU through pinned memory, copied when the forward is sent:
``end_write``). Everything the forward changes in the cache is on the device (keys,
values, the sinks' directions, in place), so a captured forward replays exactly.

A pipeline stage's cache holds only its own layers (``layers``; the other
entries of ``keys`` and ``values`` are None). A stage without the first layer
follows the decision made where that layer is (:meth:`KVCache.follow_sink_replacement`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .staging import StagedTensor

EMPTY = -1  # slot value of a slot that holds nothing yet
_numbers = itertools.count()  # every cache's own number (a pipeline stage mirrors caches by it)


@dataclass
class WritePlan:
    """What one forward writes, decided before the first layer runs."""

    targets: torch.Tensor  # [B, F] slot of each new frame (the first layer may redirect to a sink)
    rows: torch.Tensor  # [B, 1] batch index, to pair with targets
    mask: torch.Tensor | None  # [B, 1, 1, L] filled positions, None once every slot is filled
    # [B] elements whose replacement may fire (one fresh frame, its cache full); None if none may
    adapt: torch.Tensor | None
    planned: list[list[int]] | None = None  # host copy of the targets before any redirect
    previous_layout: list[list[int]] | None = None  # slot layout before this write
    # ([B] replaced, [B] which sink): written in place by the first layer; None without adapt
    sink_replacement: tuple[torch.Tensor, torch.Tensor] | None = None
    find_sink_directions: bool = False  # the sinks' directions are out of date: the first layer finds them
    # (pinned host copies of sink_replacement, the event that says they are there); set by end_write
    sink_replacement_on_host: tuple[torch.Tensor, torch.Tensor, torch.cuda.Event] | None = None


@dataclass
class _PlanBuffers:
    """The tensors of one frame count's plans, rewritten in place by every such plan."""

    targets: StagedTensor  # [B, F]
    adapt: StagedTensor  # [B]
    rows: torch.Tensor  # [B, 1]
    sink_replacement: tuple[torch.Tensor, torch.Tensor]  # [B] replaced, [B] which sink


class KVCache:
    """Self-attention caches of every layer (or of ``layers``) plus each batch element's stream position.

    The caller owns the position: a forward with this cache processes frames
    ``frame_start[b] ...`` of element ``b``; calling the model again without
    ``advance()`` re-processes the same frames (a later denoising step), which
    overwrites their slots instead of taking new ones.
    """

    def __init__(self, config, batch: int, frame_tokens: int, *, layers=None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.uid = next(_numbers)
        self.num_frames = config.num_kv_cache
        self.num_sink = config.num_sink
        self.adapt_sink_threshold = config.adapt_sink_threshold
        self.frame_tokens = frame_tokens
        self.batch = batch
        self.device = torch.device(device)
        shape = (batch, self.num_frames * frame_tokens, config.num_heads, config.head_dim)
        held = range(config.num_layers) if layers is None else set(layers)
        self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) if i in held else None
                     for i in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=self.device) if i in held else None
                       for i in range(config.num_layers)]
        # The planned slot layout, shared by all layers: absolute frame number per slot.
        self.slot_frame = [[EMPTY] * self.num_frames for _ in range(batch)]
        self.frame_start = [0] * batch  # first frame of each element's next forward
        # First layer's unit mean key and value of each sink frame [B, sinks, 2, C],
        # kept up to date while adaptive replacement runs instead of recomputed. A buffer
        # made by the first forward that needs it and then updated in place; sinks_known
        # says whether it holds the sinks' directions now.
        self.sink_directions: torch.Tensor | None = None
        self.sinks_known = False
        self._pending: WritePlan | None = None  # the last plan that may replace a sink, not yet read back
        self._plan_buffers: dict[int, _PlanBuffers] = {}  # frames -> buffers of in-place plans
        self._sink_replacement_on_host = None  # pinned host buffers end_write copies a decision into
        # Cross-attention keys/values of the last context, reused while it and its LoRA adapters are unchanged.
        self.context, self.context_version, self.context_adapters = None, -1, None
        self.cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def holds_context(self, context: torch.Tensor, adapters) -> bool:
        """Whether ``cross_kv`` are this context tensor's (unchanged since) with these LoRA adapters."""
        return (self.context is context and self.context_version == context._version
                and self.context_adapters == adapters)  # the same mix, or per row the same mixes

    # -- stream position -------------------------------------------------------
    def advance(self, frames: int = 1) -> None:
        """Move every element on to its next frame(s) once the current ones are final."""
        self.frame_start = [s + frames for s in self.frame_start]

    def reset(self, element: int | None = None) -> None:
        """Forget one element's history (or every element's) to start a new stream."""
        for b in range(self.batch) if element is None else [element]:
            self.slot_frame[b] = [EMPTY] * self.num_frames
            self.frame_start[b] = 0
        self.sinks_known, self._pending = False, None

    def frame_numbers(self, frames: int) -> list[list[int]]:
        return [[start + f for f in range(frames)] for start in self.frame_start]

    def is_full(self) -> bool:
        return all(EMPTY not in slots for slots in self.slot_frame)

    def repeated(self, batch: int) -> "KVCache":
        """A cache of ``batch`` elements that all start as copies of element 0
        (how each stream-batch slot inherits the first chunk's cache)."""
        copy = object.__new__(KVCache)
        copy.__dict__.update(self.__dict__)
        copy.uid, copy.batch = next(_numbers), batch
        copy.keys = [None if k is None else k[:1].repeat(batch, 1, 1, 1) for k in self.keys]
        copy.values = [None if v is None else v[:1].repeat(batch, 1, 1, 1) for v in self.values]
        copy.slot_frame = [list(self.slot_frame[0]) for _ in range(batch)]
        copy.frame_start = [self.frame_start[0]] * batch
        copy.sink_directions, copy.sinks_known, copy._pending = None, False, None
        copy._plan_buffers, copy._sink_replacement_on_host = {}, None
        return copy

    def save_position(self) -> tuple:
        """The cache's bookkeeping (not its keys and values), to undo a forward that failed
        part-way: planned again from here, the retry writes where the failed one did.
        Holds a copy of the sinks' directions, which a forward updates in place."""
        directions = self.sink_directions.clone() if self.sinks_known else None
        return ([list(slots) for slots in self.slot_frame], list(self.frame_start), self.sinks_known, directions,
                self._pending)

    def restore_position(self, saved: tuple) -> None:
        slot_frame, frame_start, self.sinks_known, directions, self._pending = saved
        self.slot_frame, self.frame_start = [list(slots) for slots in slot_frame], list(frame_start)
        if directions is not None:
            self.sink_directions.copy_(directions)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    # -- layers (a pipeline stage holds some) ------------------------------------
    @property
    def layers(self) -> list[int]:
        """Numbers of the layers whose keys and values this cache holds."""
        return [layer for layer, keys in enumerate(self.keys) if keys is not None]

    def take_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove one layer's keys and values, to hand them to another stage."""
        keys, values = self.keys[layer], self.values[layer]
        self.keys[layer] = self.values[layer] = None
        return keys, values

    def put_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold a layer's keys and values taken from another stage's cache of the same stream."""
        self.keys[layer], self.values[layer] = keys, values

    # -- writing ---------------------------------------------------------------
    def begin_write(self, frames: int, *, in_place: bool = False) -> WritePlan:
        """Plan the slots of the next ``frames`` frames of every element and commit
        them to the slot layout; called once per forward, before the first layer.

        A frame being re-processed keeps its slot; a new one takes the first empty
        sink slot, else the oldest ring slot (empty ring slots count as oldest).
        An element's adaptive replacement starts once its slots are all filled.

        ``in_place``: the plan's tensors are this cache's buffers for ``frames`` frames,
        rewritten without allocating (a steady step's, whose forward may be a CUDA graph);
        only for a full cache, and while no earlier forward of the cache may still be
        planned (one executor in this process: the GPU runs the forwards in order)."""
        self._settle_sink_replacements()
        previous = [list(slots) for slots in self.slot_frame]
        targets, eligible = [], []
        for slots, frame_numbers in zip(self.slot_frame, self.frame_numbers(frames)):
            full, fresh = EMPTY not in slots, all(frame not in slots for frame in frame_numbers)
            eligible.append(full and fresh)
            row = []
            for frame in frame_numbers:
                row.append(self._slot_for(slots, frame))
                slots[row[-1]] = frame
            targets.append(row)
        if any(t < self.num_sink for row in targets for t in row):
            self.sinks_known = False  # a sink is rewritten: find its direction again when needed
        may_adapt = self.num_sink > 0 and self.adapt_sink_threshold > -1 and frames == 1 and any(eligible)
        if in_place:
            if not self.is_full():
                raise ValueError("begin_write(in_place=True) plans a full cache's write; this cache has empty slots")
            buffers = self._buffers_for(frames)
            plan = WritePlan(targets=buffers.targets.write(targets), rows=buffers.rows, mask=None,
                             adapt=buffers.adapt.write(eligible) if may_adapt else None)
            if may_adapt:
                plan.sink_replacement = buffers.sink_replacement
        else:
            mask = None
            if not self.is_full():
                filled = torch.tensor([[s != EMPTY for s in slots] for slots in self.slot_frame], device=self.device)
                mask = filled.repeat_interleave(self.frame_tokens, dim=1)[:, None, None, :]
            plan = WritePlan(targets=torch.tensor(targets, device=self.device),
                             rows=torch.arange(self.batch, device=self.device)[:, None], mask=mask,
                             adapt=torch.tensor(eligible, device=self.device) if may_adapt else None)
            if may_adapt:
                plan.sink_replacement = self._sink_decision(device=self.device)
        plan.planned, plan.previous_layout = targets, previous
        if may_adapt:
            # What the forward will do, known now: the host changes nothing while it runs.
            plan.find_sink_directions, self.sinks_known = not self.sinks_known, True
            self._pending = plan
        return plan

    def _buffers_for(self, frames: int) -> _PlanBuffers:
        if frames not in self._plan_buffers:
            self._plan_buffers[frames] = _PlanBuffers(
                targets=StagedTensor((self.batch, frames), torch.long, self.device),
                adapt=StagedTensor((self.batch,), torch.bool, self.device),
                rows=torch.arange(self.batch, device=self.device)[:, None],
                sink_replacement=self._sink_decision(device=self.device))
        return self._plan_buffers[frames]

    def _sink_decision(self, **where) -> tuple[torch.Tensor, torch.Tensor]:
        """Room for a sink decision: [B] replaced, [B] which sink (``where``: device= or pin_memory=)."""
        return (torch.zeros(self.batch, dtype=torch.bool, **where), torch.zeros(self.batch, dtype=torch.long, **where))

    def end_write(self, plan: WritePlan) -> None:
        """Called once a forward with ``plan`` is sent: on a GPU, start copying its sink
        decision to pinned host memory, so that the next ``begin_write`` reads it without a
        device round trip (it waits only for that copy, behind the forward, if ever)."""
        if plan.sink_replacement is None or self.device.type == "cpu":
            return
        if self._sink_replacement_on_host is None:
            self._sink_replacement_on_host = (*self._sink_decision(pin_memory=True), torch.cuda.Event())
        replaced, sink, copied = self._sink_replacement_on_host
        replaced.copy_(plan.sink_replacement[0], non_blocking=True)
        sink.copy_(plan.sink_replacement[1], non_blocking=True)
        copied.record()
        plan.sink_replacement_on_host = self._sink_replacement_on_host

    def _settle_sink_replacements(self) -> None:
        """Bring the host's slot layout up to date with the last step's replacements:
        the new frame sits in a sink slot, and its planned ring slot still holds the
        frame it held before (the ring does not advance, as published)."""
        plan, self._pending = self._pending, None
        if plan is None:
            return
        if plan.sink_replacement_on_host is not None:
            replaced, least_similar, copied = plan.sink_replacement_on_host
            copied.synchronize()
        else:  # on the CPU (no wait), or a forward whose executor did not call end_write
            replaced, least_similar = plan.sink_replacement
        for b, (was_replaced, sink) in enumerate(zip(replaced.tolist(), least_similar.tolist())):
            if was_replaced:
                ring_slot = plan.planned[b][0]
                self.slot_frame[b][sink] = self.slot_frame[b][ring_slot]
                self.slot_frame[b][ring_slot] = plan.previous_layout[b][ring_slot]

    def _slot_for(self, slots: list[int], frame: int) -> int:
        if frame in slots:
            return slots.index(frame)
        if EMPTY in slots[:self.num_sink]:
            return slots.index(EMPTY)
        ring = slots[self.num_sink:]
        return self.num_sink + ring.index(min(ring))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: WritePlan):
        """Store one layer's new roped keys and values [B, F*frame_tokens, heads, head_dim];
        return that layer's whole buffer and the mask of filled positions."""
        batch, frames = plan.targets.shape
        k_slots = self.keys[layer].view(batch, self.num_frames, self.frame_tokens, *k.shape[2:])
        v_slots = self.values[layer].view(batch, self.num_frames, self.frame_tokens, *v.shape[2:])
        k_new = k.view(batch, frames, self.frame_tokens, *k.shape[2:])
        v_new = v.view(batch, frames, self.frame_tokens, *v.shape[2:])
        if plan.adapt is not None and layer == 0:
            self._choose_sink_replacements(k_slots, v_slots, k_new[:, 0], v_new[:, 0], plan)
        k_slots[plan.rows, plan.targets] = k_new.to(k_slots.dtype)
        v_slots[plan.rows, plan.targets] = v_new.to(v_slots.dtype)
        return self.keys[layer], self.values[layer], plan.mask

    def _choose_sink_replacements(self, k_slots, v_slots, k_new, v_new, plan: WritePlan) -> None:
        """Redirect ``plan.targets`` to the least similar sink where the new frame is
        unlike every sink (on the device; the host learns it in ``begin_write``)."""
        if plan.find_sink_directions:
            directions = _mean_direction(k_slots[:, :self.num_sink], v_slots[:, :self.num_sink])
            if self.sink_directions is None:
                self.sink_directions = directions
            else:
                self.sink_directions.copy_(directions)
        new_direction = _mean_direction(k_new[:, None], v_new[:, None])  # [B, 1, 2, C]
        similarity = (self.sink_directions * new_direction).sum(dim=-1).mean(dim=-1)  # [B, sinks]
        lowest, least_similar = similarity.min(dim=1)
        replace = (lowest < self.adapt_sink_threshold) & plan.adapt
        replaced_sink = replace[:, None] & (
            torch.arange(self.num_sink, device=replace.device) == least_similar[:, None])
        self.sink_directions.copy_(torch.where(replaced_sink[:, :, None, None], new_direction, self.sink_directions))
        self._redirect(plan, replace, least_similar)

    def follow_sink_replacement(self, plan: WritePlan, replaced: torch.Tensor, sink: torch.Tensor) -> None:
        """Apply the replacement decided by the cache that holds the first layer
        (another pipeline stage's, for this same forward) to this cache's plan."""
        self._redirect(plan, replaced.to(self.device), sink.to(self.device))

    def _redirect(self, plan: WritePlan, replaced: torch.Tensor, sink: torch.Tensor) -> None:
        plan.targets = torch.where(replaced[:, None], sink[:, None], plan.targets)
        plan.sink_replacement[0].copy_(replaced)
        plan.sink_replacement[1].copy_(sink)


def _mean_direction(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unit mean key and value of each frame: [B, frames, 2, heads*head_dim] from
    [B, frames, tokens, heads, head_dim]; dot products of these are cosines."""
    means = torch.stack([k.float().mean(dim=2), v.float().mean(dim=2)], dim=2).flatten(3)
    return F.normalize(means, dim=-1)
