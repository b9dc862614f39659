"""Small device tensors written from host values each step, without allocating or waiting.

A steady DiT step needs a few host-made values on the device (the cache's write slots,
the frames' RoPE times). Made with ``torch.tensor(..., device=...)`` each step, every one
is a new tensor and, on a GPU, a copy the host waits for; a CUDA graph could not read
them either, since its inputs must stay at one address. A :class:`StagedTensor` is one
such tensor at a fixed address, rewritten in place.
"""

from __future__ import annotations

import torch


class StagedTensor:
    """A device tensor that ``write`` fills from host values in place.

    On the CPU the values go straight into it. On a GPU they go into a pinned host
    buffer and on with a non-blocking copy, queued behind the work already sent, so the
    forwards before it still read the old values. Two pinned buffers take turns, so the
    host never rewrites one that a copy may still be reading (it waits for the copy of
    two writes ago, long finished in a stream of steps)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.tensor = torch.zeros(shape, dtype=dtype, device=device)
        if self.tensor.device.type == "cpu":
            self._staging = [self.tensor]
        else:
            self._staging = [torch.zeros(shape, dtype=dtype, pin_memory=True) for _ in range(2)]
        self._host_views = [buffer.numpy() for buffer in self._staging]  # made once: writing them is no torch op
        # When each pinned buffer's last copy is done (None: not copied yet, or on the CPU).
        self._copied: list[torch.cuda.Event | None] = [None] * len(self._staging)
        self._turn = 0

    def write(self, values) -> torch.Tensor:
        """Put ``values`` (nested lists or an array of the tensor's shape) in the tensor; returns it."""
        turn = self._turn
        self._turn = (turn + 1) % len(self._staging)
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()
        self._host_views[turn][...] = values
        if self._staging[turn] is not self.tensor:
            self.tensor.copy_(self._staging[turn], non_blocking=True)
            self._copied[turn] = self._copied[turn] or torch.cuda.Event()
            self._copied[turn].record()
        return self.tensor
