"""The rolling KV cache: sink frames plus a ring of recent frames, per layer.

Each stream-batch slot (batch element) has its own cache of ``num_kv_cache``
latent frames. The first ``num_sink`` slots take the stream's first frames and
are never evicted; the other slots form a ring in which the oldest frame is
overwritten first. Keys are stored after RoPE, so a cached key keeps the position
it was written at and the slot order does not matter.

Where each frame goes is planned on the host once per forward and shared by all
layers, so a step costs one indexed write per layer and no host-device sync.
Adaptive sink replacement is the exception: it compares each layer's own keys
and values, so it is decided on the device, per layer, as in the published
model: when it fires, that layer writes the new frame over its least similar
sink frame instead of its planned ring slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EMPTY = -1  # slot value of a slot that holds nothing yet


@dataclass(frozen=True)
class WritePlan:
    """What one forward writes, decided before the first layer runs."""

    targets: torch.Tensor  # [B, F] slot of each new frame
    mask: torch.Tensor | None  # [B, 1, 1, L] filled positions, None once every slot is filled
    adapt: bool  # adaptive sink replacement may fire
    sinks_rewritten: bool  # a planned write lands in a sink slot: its mean direction is stale
    fresh: torch.Tensor | None  # [B, F] frames seen for the first time (only these may replace a sink)


class KVCache:
    """Self-attention caches of every layer plus each batch element's stream position.

    The caller owns the position: a forward with this cache processes frames
    ``frame_start[b] ...`` of element ``b``; calling the model again without
    ``advance()`` re-processes the same frames (a later denoising step), which
    overwrites their slots instead of taking new ones.
    """

    def __init__(self, config, batch: int, frame_tokens: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.num_frames = config.num_kv_cache
        self.num_sink = config.num_sink
        self.adapt_sink_threshold = config.adapt_sink_threshold
        self.frame_tokens = frame_tokens
        self.batch = batch
        self.device = torch.device(device)
        shape = (batch, self.num_frames * frame_tokens, config.num_heads, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(config.num_layers)]
        # The planned slot layout, shared by all layers: absolute frame number per slot.
        self.slot_frame = [[EMPTY] * self.num_frames for _ in range(batch)]
        self.frame_start = [0] * batch  # first frame of each element's next forward
        # Per layer, unit mean key and value of each sink frame, kept up to date
        # while adaptive replacement runs so that they are not recomputed each step.
        self.sink_directions: list[torch.Tensor | None] = [None] * config.num_layers
        # Cross-attention keys/values of the last context, reused while it is unchanged.
        self.context, self.context_version = None, -1
        self.cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # -- stream position -------------------------------------------------------
    def advance(self, frames: int = 1) -> None:
        """Move every element on to its next frame(s) once the current ones are final."""
        self.frame_start = [s + frames for s in self.frame_start]

    def reset(self, element: int | None = None) -> None:
        """Forget one element's history (or every element's) to start a new stream."""
        for b in range(self.batch) if element is None else [element]:
            self.slot_frame[b] = [EMPTY] * self.num_frames
            self.frame_start[b] = 0
        self.sink_directions = [None] * len(self.keys)

    def frame_numbers(self, frames: int) -> list[list[int]]:
        return [[start + f for f in range(frames)] for start in self.frame_start]

    def is_full(self) -> bool:
        return all(EMPTY not in slots for slots in self.slot_frame)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # -- writing ---------------------------------------------------------------
    def begin_write(self, frames: int) -> WritePlan:
        """Plan the slots of the next ``frames`` frames of every element and commit
        them to the slot layout; called once per forward, before the first layer.

        A frame being re-processed keeps its slot; a new one takes the first empty
        sink slot, else the oldest ring slot (empty ring slots count as oldest).
        Adaptive replacement starts only once every slot is filled, so that every
        layer holds exactly as many frames as the plan says."""
        adapt = self.num_sink > 0 and self.adapt_sink_threshold > -1 and self.is_full()
        targets, fresh = [], []
        for slots, frame_numbers in zip(self.slot_frame, self.frame_numbers(frames)):
            row, new = [], []
            for frame in frame_numbers:
                new.append(frame not in slots)
                row.append(self._slot_for(slots, frame))
                slots[row[-1]] = frame
            targets.append(row)
            fresh.append(new)
        mask = None
        if not self.is_full():
            filled = torch.tensor([[s != EMPTY for s in slots] for slots in self.slot_frame], device=self.device)
            mask = filled.repeat_interleave(self.frame_tokens, dim=1)[:, None, None, :]
        all_fresh = all(all(row) for row in fresh)
        sinks_rewritten = any(t < self.num_sink for row in targets for t in row)
        return WritePlan(targets=torch.tensor(targets, device=self.device), mask=mask, adapt=adapt,
                         sinks_rewritten=sinks_rewritten,
                         fresh=None if all_fresh else torch.tensor(fresh, device=self.device))

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
        rows = torch.arange(batch, device=k.device)[:, None]
        k_slots = self.keys[layer].view(batch, self.num_frames, self.frame_tokens, *k.shape[2:])
        v_slots = self.values[layer].view(batch, self.num_frames, self.frame_tokens, *v.shape[2:])
        k_new = k.view(batch, frames, self.frame_tokens, *k.shape[2:])
        v_new = v.view(batch, frames, self.frame_tokens, *v.shape[2:])
        if not plan.adapt:
            k_slots[rows, plan.targets] = k_new.to(k_slots.dtype)
            v_slots[rows, plan.targets] = v_new.to(v_slots.dtype)
        else:
            if plan.sinks_rewritten or self.sink_directions[layer] is None:
                self.sink_directions[layer] = _mean_direction(k_slots[:, :self.num_sink], v_slots[:, :self.num_sink])
            for f in range(frames):  # each frame is compared with the sinks as they are when it arrives
                target = self._adaptive_target(layer, k_new[:, f], v_new[:, f], plan, f)
                k_slots[rows[:, 0], target] = k_new[:, f].to(k_slots.dtype)
                v_slots[rows[:, 0], target] = v_new[:, f].to(v_slots.dtype)
        return self.keys[layer], self.values[layer], plan.mask

    def _adaptive_target(self, layer: int, k_new, v_new, plan: WritePlan, frame: int) -> torch.Tensor:
        """The planned slot, or the least similar sink when the cosine similarity of
        mean keys and values (averaged over K and V) is under the threshold."""
        new_direction = _mean_direction(k_new[:, None], v_new[:, None])  # [B, 1, 2, C]
        sinks = self.sink_directions[layer]  # [B, sinks, 2, C]
        similarity = (sinks * new_direction).sum(dim=-1).mean(dim=-1)  # cosines, averaged over K and V
        lowest, least_similar = similarity.min(dim=1)
        replace = lowest < self.adapt_sink_threshold
        if plan.fresh is not None:
            replace = replace & plan.fresh[:, frame]
        # the replaced sink now points the new frame's way
        replaced = replace[:, None] & (torch.arange(self.num_sink, device=replace.device) == least_similar[:, None])
        self.sink_directions[layer] = torch.where(replaced[:, :, None, None], new_direction, sinks)
        return torch.where(replace, least_similar, plan.targets[:, frame])


def _mean_direction(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unit mean key and value of each frame: [B, frames, 2, heads*head_dim] from
    [B, frames, tokens, heads, head_dim]; dot products of these are cosines."""
    means = torch.stack([k.float().mean(dim=2), v.float().mean(dim=2)], dim=2).flatten(3)
    return F.normalize(means, dim=-1)
