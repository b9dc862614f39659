"""3-D rotary position embedding (time, height, width) and RoPE refresh.

A head's channels are split into temporal, height and width parts
(``d - 4*(d//6)``, ``2*(d//6)``, ``2*(d//6)``: 44/42/42 for d=128), each with its
own table of ``max_positions`` rows and ``theta ** (-2k / part)`` frequencies.
Consecutive channel pairs are rotated as complex numbers.
"""

from __future__ import annotations

import torch


def axis_table(max_positions: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Complex unit rotations [max_positions, dim // 2] for one axis."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def rotary_position(frame: int, num_kv_cache: int, refresh_at: int) -> int:
    """Temporal RoPE index of an absolute latent frame number.

    Frames below ``refresh_at`` keep their own index. From there the index restarts
    at ``num_kv_cache - 1`` and counts up to ``refresh_at - 1`` again (a sawtooth),
    so a stream of any length stays inside the table while the newest frame is
    always later than every cached one of the same cycle.
    """
    if frame < refresh_at:
        return frame
    restart = num_kv_cache - 1
    return restart + (frame - refresh_at) % (refresh_at - restart)


class RotaryTable:
    """Precomputed rotations for every (t, h, w) position.

    A plain object, not a module: the tables are no weights (the published state
    dict has none) and are rebuilt per device on first use, so a model built on
    the meta device and loaded with ``assign`` still gets real tables."""

    def __init__(self, head_dim: int, max_positions: int = 1024, theta: float = 10000.0):
        part = head_dim // 6
        self.dims = (head_dim - 4 * part, 2 * part, 2 * part)
        self.max_positions = max_positions
        self.theta = theta
        self._tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            self._tables[device] = tuple(
                axis_table(self.max_positions, dim, self.theta).to(device=device, dtype=torch.complex64)
                for dim in self.dims)
        return self._tables[device]

    def frequencies(self, times: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Rotations [B, F*height*width, head_dim // 2] for tokens in (f, h, w) order.

        ``times`` [B, F] holds each frame's temporal index (see ``rotary_position``)."""
        batch, frames = times.shape
        table_t, table_h, table_w = self.tables(times.device)
        t = table_t[times][:, :, None, None, :].expand(batch, frames, height, width, -1)
        h = table_h[:height][None, None, :, None, :].expand(batch, frames, height, width, -1)
        w = table_w[:width][None, None, None, :, :].expand(batch, frames, height, width, -1)
        return torch.cat([t, h, w], dim=-1).reshape(batch, frames * height * width, -1)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, L, heads, head_dim] by ``freqs`` [B, L, head_dim // 2].

    Computed in float32: the angles are exact there for the 1024 positions, and it
    avoids float64, which is slow on most GPUs."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = torch.view_as_real(pairs * freqs[:, :, None, :]).flatten(-2)
    return rotated.type_as(x)
