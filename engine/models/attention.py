"""Self-attention over the rolling KV cache and cross-attention with cached text K/V."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rotary

try:  # flash-attention is optional: used on a GPU when installed, SDPA otherwise
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention on [B, L, heads, head_dim] tensors (no causal masking
    of its own: the cache and the block mask decide what is visible)."""
    if mask is None and flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def window_mask(num_frames: int, block_size: int, num_sink: int, num_kv_cache: int) -> torch.Tensor:
    """Frame-level visibility [query frame, key frame] of the offline block-causal form.

    Frames come in blocks of ``block_size``; a block sees itself and earlier
    frames, limited to what a cache of ``num_kv_cache`` frames would hold when the
    block is written: the first ``num_sink`` frames and the most recent
    ``num_kv_cache - num_sink`` frames up to the block's end."""
    ring = num_kv_cache - num_sink
    frames = torch.arange(num_frames)
    block_end = (frames // block_size + 1) * block_size
    keys = frames[None, :]
    before_end = keys < block_end[:, None]
    kept = (keys < num_sink) | (keys >= block_end[:, None] - ring)
    return before_end & kept


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


@dataclass
class StreamRows:
    """One stream's share of a forward that several streams may run together.

    The linear layers run on every stream's rows at once (their weights are read once
    per step, whatever the batch); attention runs per stream, against that stream's
    own KV cache and text. ``cache`` and ``plan`` are None offline."""

    rows: slice  # this stream's rows of the batch
    cache: object | None  # its KVCache
    plan: object | None  # the WritePlan of this forward into that cache
    context_kv: Sequence | Mapping  # block number -> text (keys, values), each [1 or rows, text_len, heads, head_dim]


class SelfAttention(nn.Module):
    """q/k RMS-normed over the full width, RoPE on q and k, keys cached after RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, streams: list[StreamRows], *, layer_index: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        heads = (*x.shape[:2], self.num_heads, -1)
        q = apply_rotary(self.norm_q(self.q(x)).view(heads), freqs)
        k = apply_rotary(self.norm_k(self.k(x)).view(heads), freqs)
        v = self.v(x).view(heads)
        outputs = []
        for stream in streams:
            q_s, k_s, v_s, mask_s = q[stream.rows], k[stream.rows], v[stream.rows], mask
            if stream.cache is not None:
                k_s, v_s, mask_s = stream.cache.write(layer_index, k_s, v_s, stream.plan)
            outputs.append(attention(q_s, k_s, v_s, mask_s))
        return self.o(_joined(outputs).flatten(2))


class CrossAttention(nn.Module):
    """Attention from video tokens to the (embedded) text context; no text mask,
    as published: all ``text_len`` positions, zero padding included, are seen."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the context, computed once per prompt and reused."""
        heads = (*context.shape[:2], self.num_heads, -1)
        return self.norm_k(self.k(context)).view(heads), self.v(context).view(heads)

    def forward(self, x: torch.Tensor, streams: list[StreamRows], *, layer_index: int) -> torch.Tensor:
        q = self.norm_q(self.q(x)).view(*x.shape[:2], self.num_heads, -1)
        outputs = []
        for stream in streams:
            q_s = q[stream.rows]
            k, v = stream.context_kv[layer_index]
            rows = (q_s.shape[0], *k.shape[1:])
            outputs.append(attention(q_s, k.expand(rows), v.expand(rows)))
        return self.o(_joined(outputs).flatten(2))


def _joined(outputs: list[torch.Tensor]) -> torch.Tensor:
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
