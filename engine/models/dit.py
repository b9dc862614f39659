"""The causal Wan2.1 video DiT that StreamDiffusionV2 streams.

Wan2.1's text-to-video transformer with two changes that make it causal: every
latent frame has its own timestep, and self-attention sees only the frames of its
own call and those in the rolling KV cache (or, offline, a block-causal mask over
the same window). Parameter names and shapes are Wan2.1's own, so the published
Wan2.1 and StreamDiffusionV2 checkpoints load with ``strict=True``.

Shapes: ``latents`` [B, C=in_dim, F, H, W]; a patch of (1, 2, 2) makes
``frame_tokens = H/2 * W/2`` tokens per latent frame, in (f, h, w) order.

Several streams (sessions) of the same size can share one forward
(:meth:`CausalWanDiT.forward_streams`): their rows go through the linear layers
together, which read the weights once, and attend each to their own cache and text.
Each stream may bring its own LoRA adapters (a :class:`~.lora.LoraMix`), which adapt
its rows alone (engine/models/lora.py).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .attention import CrossAttention, SelfAttention, StreamRows, window_mask
from .kv_cache import KVCache
from .lora import Adapters, context_rows, lora_rows
from .rope import RotaryTable, rotary_position

log = logging.getLogger(__name__)


def compile_problem(device, backend: str = "inductor") -> str | None:
    """Why torch.compile cannot compile with ``backend`` for ``device`` here, or None if it can."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return f"torch {torch.__version__} cannot compile on this platform and Python"
    if backend != "inductor":
        return None
    if torch.device(device).type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "inductor writes CUDA kernels with Triton, which is not installed (pip install triton)"
    elif not any(shutil.which(name) for name in ("g++", "clang++", "c++")):
        return "inductor builds CPU kernels with a C++ compiler, and none is installed (g++ or clang++)"
    return None


def sinusoidal_embedding(dim: int, timesteps: torch.Tensor) -> torch.Tensor:
    """[cos, sin] features of raw integer timesteps (e.g. 700), frequencies 10000^(-k/half)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timesteps.device) / half)
    angles = torch.outer(timesteps.to(torch.float64), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the weights' dtype, as Wan does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return nn.functional.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class WanBlock(nn.Module):
    """Modulated self-attention, cross-attention and feed-forward, each residual.

    ``modulation + time_projection(t)`` gives, per frame, the shift, scale and gate
    of the self-attention input and of the feed-forward input.

    The work around the two attentions (``DENSE_PARTS``) reads tensors only, no stream,
    cache or Python state, so torch.compile can fuse it into a few kernels whatever
    the streams (:meth:`CausalWanDiT.set_compiled`); the attentions, which write the
    caches, run as they are."""

    DENSE_PARTS = ("attention_input", "cross_attention_input", "feed_forward")

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, config.num_heads, eps)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, config.num_heads, eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, time_mod: torch.Tensor, freqs: torch.Tensor, streams: list[StreamRows], *,
                layer_index: int, mask=None) -> torch.Tensor:
        # x: [B, F, T, dim]; time_mod: [B, F, 6, dim] float32.
        tokens = x.shape[:1] + (-1, x.shape[-1])
        h, terms = self.attention_input(x, time_mod)
        y = self.self_attn(h.reshape(tokens), freqs, streams, layer_index=layer_index, mask=mask)
        x, h = self.cross_attention_input(x, y.view_as(x), terms)
        x = x + self.cross_attn(h.reshape(tokens), streams, layer_index=layer_index).view_as(x)
        return self.feed_forward(x, terms)

    def attention_input(self, x: torch.Tensor, time_mod: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """The self-attention's input, and the six modulation terms [B, F, 1, dim]: shift,
        scale and gate of the self-attention input, then of the feed-forward input."""
        terms = (self.modulation.float()[:, None] + time_mod).unsqueeze(3).unbind(2)
        shift_msa, scale_msa = terms[:2]
        return (self.norm1(x) * (1 + scale_msa) + shift_msa).type_as(x), terms

    def cross_attention_input(self, x: torch.Tensor, y: torch.Tensor,
                              terms: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` plus the gated self-attention output ``y``, and the cross-attention's input."""
        gate_msa = terms[2]
        x = (x.float() + y.float() * gate_msa).type_as(x)
        return x, self.norm3(x).type_as(x)

    def feed_forward(self, x: torch.Tensor, terms: tuple) -> torch.Tensor:
        """``x`` plus the gated feed-forward of its modulated norm: the block's output."""
        shift_ffn, scale_ffn, gate_ffn = terms[3:]
        h = (self.norm2(x) * (1 + scale_ffn) + shift_ffn).type_as(x)
        return (x.float() + self.ffn(h).float() * gate_ffn).type_as(x)


class Head(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = FP32LayerNorm(config.dim, config.eps, elementwise_affine=False)
        self.head = nn.Linear(config.dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        # time_emb: [B, F, dim] float32 -> shift and scale [B, F, 1, dim]
        shift, scale = (self.modulation.float()[:, None] + time_emb[:, :, None]).unsqueeze(3).unbind(2)
        return self.head((self.norm(x) * (1 + scale) + shift).type_as(x))


@dataclass
class StreamInput:
    """One stream's part of a forward: as the arguments of :meth:`CausalWanDiT.forward`."""

    latents: torch.Tensor  # [rows, in_dim, F, H, W]
    timesteps: torch.Tensor  # [rows, F]
    context: torch.Tensor  # [1 or rows, L, text_dim]
    cache: KVCache | None
    adapters: Adapters = None  # its LoRA adapters, if any: one mix, or one per row


class CausalWanDiT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = Head(config)
        self.rope = RotaryTable(config.head_dim, config.rope_max_positions)
        self.compiled_shapes: set[tuple[int, ...]] | None = None  # latents shapes run since set_compiled; None: eager

    def set_compiled(self, backend: str | None) -> None:
        """torch.compile every block's dense parts (``WanBlock.DENSE_PARTS``) with ``backend``
        ("inductor"; "aot_eager" traces the same graphs without generating code, which the
        CPU tests use), or run them eagerly again (None).

        Torch's default mode: the kernels are fused, not put in CUDA graphs of their own, so
        the static step (engine/static_step.py) captures them in its graph like any others.
        The blocks share their compiled code; a new latents shape compiles on its first
        forward (logged, with the time it took) and, after the second, the changed sizes are
        compiled as dynamic. Inductor keeps what it compiled on disk (its FX graph cache, in
        ``TORCHINDUCTOR_CACHE_DIR``, by default /tmp/torchinductor_$USER), so a later run of
        the same shapes loads the kernels instead of compiling them again."""
        for block in self.blocks:
            if block is None:
                continue
            for part in WanBlock.DENSE_PARTS:
                vars(block).pop(part, None)  # back to the method
                if backend is not None:
                    setattr(block, part, torch.compile(getattr(block, part), backend=backend))
        self.compiled_shapes = None if backend is None else set()

    # -- public helpers ----------------------------------------------------------
    def frame_tokens(self, height: int, width: int) -> int:
        _, ph, pw = self.config.patch_size
        return (height // ph) * (width // pw)

    def new_cache(self, batch: int, height: int, width: int) -> KVCache:
        """An empty KV cache for ``batch`` streams of latents of this size, over the
        blocks this model holds (all of them unless :meth:`keep_only` dropped some)."""
        param = next(self.parameters())
        return KVCache(self.config, batch, self.frame_tokens(height, width), layers=self.held_layers,
                       dtype=param.dtype, device=param.device)

    def context_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-block cross-attention keys and values of a text context [B, L <= text_len, text_dim]."""
        kv = self.blocks_context_kv(self.embed_context(context), self.held_layers)
        return [kv.get(index) for index in range(len(self.blocks))]  # None for a block not held

    def embed_context(self, context: torch.Tensor) -> torch.Tensor:
        """The text context [B, L <= text_len, text_dim] zero-padded to text_len, as Wan
        does, and embedded: [B, text_len, dim], what every block's cross-attention reads."""
        pad = self.config.text_len - context.shape[1]
        context = nn.functional.pad(context, (0, 0, 0, pad))
        return self.text_embedding(context.to(self.patch_embedding.weight.dtype))

    def blocks_context_kv(self, embedded: torch.Tensor, layers) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys and values of an embedded context for the blocks ``layers``."""
        return {index: self.blocks[index].cross_attn.context_kv(embedded) for index in layers}

    # -- pipeline stages -----------------------------------------------------------
    # A pipeline stage runs part of the model: the first stage embeds, every stage
    # runs its range of blocks, the last stage applies the head. ``forward`` is the
    # same parts in one process.
    @property
    def held_layers(self) -> list[int]:
        """Numbers of the blocks this model holds."""
        return [index for index, block in enumerate(self.blocks) if block is not None]

    def keep_only(self, layers, *, embeddings: bool, head: bool) -> "CausalWanDiT":
        """Drop what one pipeline stage does not run: the blocks outside ``layers``,
        the patch/text/time embeddings unless ``embeddings``, the head unless ``head``.
        Dropped parts become None; the kept ones keep their numbers and parameter
        names, so a checkpoint's entries load by name and blocks move by number."""
        for index in range(len(self.blocks)):
            if index not in layers:
                self.blocks[index] = None
        if not embeddings:
            self.patch_embedding = self.text_embedding = self.time_embedding = self.time_projection = None
        if not head:
            self.head = None
        return self

    def embed(self, latents: torch.Tensor, timesteps: torch.Tensor):
        """Tokens [B, F, T, dim] of ``latents`` [B, in_dim, F, H, W], and the float32
        time terms of ``timesteps`` [B, F]: block modulation [B, F, 6, dim] and head
        modulation [B, F, dim]."""
        batch, _, frames = latents.shape[:3]
        x = self.patch_embedding(latents.to(self.patch_embedding.weight.dtype))
        x = x.flatten(3).permute(0, 2, 3, 1)
        # Batch first throughout, as in every linear layer (LoRA adapters go by batch rows).
        sinusoid = sinusoidal_embedding(self.config.freq_dim, timesteps.flatten()).view(batch, frames, -1)
        time_emb = self.time_embedding(sinusoid.to(x.dtype)).float()
        time_mod = self.time_projection(time_emb.to(x.dtype)).float().view(batch, frames, 6, -1)
        return x, time_mod, time_emb

    def rope_times(self, frame_numbers: list[list[int]]) -> list[list[int]]:
        """The temporal RoPE index of frames with these absolute numbers (per batch element)."""
        return [[rotary_position(f, self.config.num_kv_cache, self.config.rope_refresh_at) for f in row]
                for row in frame_numbers]

    def rope_frequencies(self, frame_numbers: list[list[int]], grid_h: int, grid_w: int,
                         device: torch.device) -> torch.Tensor:
        """Rotations of every token of frames with these absolute numbers (per batch element)."""
        return self.rope.frequencies(torch.tensor(self.rope_times(frame_numbers), device=device), grid_h, grid_w)

    def run_blocks(self, x: torch.Tensor, time_mod: torch.Tensor, freqs: torch.Tensor, streams: list[StreamRows],
                   layers, *, mask=None) -> torch.Tensor:
        """Blocks ``layers`` (a range) on tokens ``x``, whose rows belong to ``streams``."""
        for index in layers:
            block = self.blocks[index]
            if block is None:
                raise ValueError(f"block {index} is not held by this model (it holds {self.held_layers})")
            x = block(x, time_mod, freqs, streams, layer_index=index, mask=mask)
        return x

    def finish(self, x: torch.Tensor, time_emb: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """The head on the last block's tokens: the flow [B, out_dim, F, H, W]."""
        return self._unpatchify(self.head(x, time_emb), grid_h, grid_w)

    # -- forward -------------------------------------------------------------------
    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, *,
                cache: KVCache | None = None, block_size: int | None = None,
                adapters: Adapters = None) -> torch.Tensor:
        """Predict the flow of ``latents`` [B, in_dim, F, H, W] at ``timesteps`` [B, F],
        with the LoRA ``adapters`` if given.

        Without ``cache`` the F frames attend to each other (``block_size=k``: in
        blocks of k frames, block-causal within the cache window). With ``cache``
        they attend to each other and to the cached frames, and are written into it
        at the cache's current stream position."""
        self.check_arguments(latents, timesteps, context, cache, block_size)
        stream = StreamInput(latents, timesteps, context, cache, adapters)
        if cache is not None:
            return self._forward(latents, timesteps, [stream])
        frames, height, width = latents.shape[2:]
        mask = None
        if block_size is not None:
            mask = self._block_mask(frames, block_size, self.frame_tokens(height, width), latents.device)
        return self._forward(latents, timesteps, [stream], mask=mask)

    def forward_streams(self, inputs: list[StreamInput]) -> list[torch.Tensor]:
        """The flows of several streams' latents in one forward, each with its own cache.

        Every input holds the same number of frames of the same size (one model
        size); the result is what ``forward`` gives each input alone, up to rounding."""
        if not inputs:
            return []
        shape = inputs[0].latents.shape[2:]
        for index, part in enumerate(inputs):
            if part.cache is None:
                raise ValueError(f"inputs[{index}].cache is None: forward_streams runs cached streams")
            try:
                self.check_arguments(part.latents, part.timesteps, part.context, part.cache)
            except ValueError as error:
                raise ValueError(f"inputs[{index}]: {error}") from None
            if part.latents.shape[2:] != shape:
                raise ValueError(f"inputs[{index}].latents hold frames, height, width {list(part.latents.shape[2:])}; "
                                 f"streams in one forward must all hold {list(shape)}")
        latents = torch.cat([part.latents for part in inputs])
        timesteps = torch.cat([part.timesteps for part in inputs])
        flow = self._forward(latents, timesteps, inputs)
        return list(flow.split([part.latents.shape[0] for part in inputs]))

    def _forward(self, latents: torch.Tensor, timesteps: torch.Tensor, inputs: list[StreamInput], *,
                 mask=None) -> torch.Tensor:
        frames = latents.shape[2]
        streams, frame_numbers, start = [], [], 0
        for part in inputs:
            batch = part.latents.shape[0]
            rows = slice(start, start + batch)
            start += batch
            if part.cache is None:
                with lora_rows(self, [(slice(None), part.adapters)]):
                    streams.append(StreamRows(rows, None, None, self.context_kv(context_rows(part.context,
                                                                                             part.adapters))))
                frame_numbers += [list(range(frames))] * batch
            else:
                frame_numbers += part.cache.frame_numbers(frames)
                plan = part.cache.begin_write(frames)
                streams.append(StreamRows(rows, part.cache, plan, self.cached_context_kv(part)))
        rope_times = torch.tensor(self.rope_times(frame_numbers), device=latents.device)
        with lora_rows(self, [(stream.rows, part.adapters) for stream, part in zip(streams, inputs)]):
            flow = self.compute(latents, timesteps, rope_times, streams, mask=mask)
        for stream in streams:
            if stream.cache is not None:
                stream.cache.end_write(stream.plan)
        return flow

    def compute(self, latents: torch.Tensor, timesteps: torch.Tensor, rope_times: torch.Tensor,
                streams: list[StreamRows], *, mask=None) -> torch.Tensor:
        """The device work of a forward whose host work is done (caches' plans made, text
        K/V at hand): the flow of ``latents`` at ``timesteps`` [B, F] and RoPE times [B, F].
        It reads no host value and changes no host state, so one call can be captured as
        a CUDA graph and replayed on new values of the same tensors (engine/static_step.py)."""
        _, ph, pw = self.config.patch_size
        grid_h, grid_w = latents.shape[3] // ph, latents.shape[4] // pw
        with self._compiling(latents):
            x, time_mod, time_emb = self.embed(latents, timesteps)
            freqs = self.rope.frequencies(rope_times, grid_h, grid_w)
            x = self.run_blocks(x, time_mod, freqs, streams, range(len(self.blocks)), mask=mask)
            return self.finish(x, time_emb, grid_h, grid_w)

    @contextmanager
    def _compiling(self, latents: torch.Tensor):
        """With compiled blocks, log the first forward of each latents shape, which compiles
        them for it, and the time it took (waiting for the device, this once)."""
        shape = tuple(latents.shape)
        if self.compiled_shapes is None or shape in self.compiled_shapes:
            yield
            return
        label = "x".join(map(str, shape))
        log.info("compiling the DiT's blocks for latents %s ...", label)
        start = time.perf_counter()
        yield
        if latents.is_cuda:
            torch.cuda.synchronize(latents.device)
        self.compiled_shapes.add(shape)
        log.info("compiled the DiT's blocks for latents %s in %.1f s", label, time.perf_counter() - start)

    def cached_context_kv(self, part: StreamInput):
        """Cross-attention K/V of a cached stream's context, kept in its cache while the same
        context tensor and adapters are passed."""
        cache, context = part.cache, part.context
        if not cache.holds_context(context, part.adapters):
            with lora_rows(self, [(slice(None), part.adapters)]):
                cache.cross_kv = self.context_kv(context_rows(context, part.adapters))
            cache.context, cache.context_version, cache.context_adapters = context, context._version, part.adapters
        return cache.cross_kv

    def _block_mask(self, frames: int, block_size: int, frame_tokens: int, device) -> torch.Tensor:
        cfg = self.config
        visible = window_mask(frames, block_size, cfg.num_sink, cfg.num_kv_cache).to(device)
        return visible.repeat_interleave(frame_tokens, 0).repeat_interleave(frame_tokens, 1)

    def _unpatchify(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        # [B, F, h*w, pt*ph*pw*C] -> [B, C, F*pt, h*ph, w*pw]
        batch, frames = x.shape[:2]
        pt, ph, pw = self.config.patch_size
        x = x.view(batch, frames, grid_h, grid_w, pt, ph, pw, self.config.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(batch, self.config.out_dim, frames * pt, grid_h * ph, grid_w * pw)

    def check_arguments(self, latents, timesteps, context, cache, block_size=None) -> None:
        """Raise a ValueError naming the argument that does not fit this model, if any."""
        cfg = self.config
        if len(self.held_layers) != len(self.blocks) or self.head is None or self.patch_embedding is None:
            raise ValueError(f"this model holds only part of the DiT (blocks {self.held_layers}); "
                             "a pipeline stage runs its part with embed/run_blocks/finish")
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
            raise ValueError(f"latents must be a tensor [batch, {cfg.in_dim}, frames, height, width], "
                             f"got {_describe(latents)}")
        batch, channels, frames, height, width = latents.shape
        _, ph, pw = cfg.patch_size
        if channels != cfg.in_dim:
            raise ValueError(f"latents must have {cfg.in_dim} channels (dim 1), got {channels}")
        if frames < 1:
            raise ValueError("latents must hold at least one frame (dim 2)")
        if height % ph or width % pw or height == 0 or width == 0:
            raise ValueError(f"latents height and width must be positive multiples of the patch "
                             f"({ph}x{pw}), got {height}x{width}")
        if not isinstance(timesteps, torch.Tensor) or tuple(timesteps.shape) != (batch, frames):
            raise ValueError(f"timesteps must be shaped [batch, frames] = [{batch}, {frames}] "
                             f"(one timestep per latent frame), got {_describe(timesteps)}")
        if (not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[-1] != cfg.text_dim
                or context.shape[0] not in (1, batch)):
            raise ValueError(f"context must be shaped [1 or {batch}, length <= {cfg.text_len}, {cfg.text_dim}], "
                             f"got {_describe(context)}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context is {context.shape[1]} tokens long, more than text_len={cfg.text_len}")
        if block_size is not None:
            if cache is not None:
                raise ValueError("block_size is the offline form; pass either block_size or cache, not both")
            if not isinstance(block_size, int) or block_size < 1 or frames % block_size:
                raise ValueError(f"block_size must be a positive divisor of the frame count {frames}, "
                                 f"got {block_size!r}")
        if cache is not None:
            if cache.batch != batch or cache.frame_tokens != (height // ph) * (width // pw):
                raise ValueError(f"cache was made for batch {cache.batch} and {cache.frame_tokens} tokens per "
                                 f"frame; latents have batch {batch} and {(height // ph) * (width // pw)}")
            ring = cfg.num_kv_cache - cfg.num_sink
            if frames > ring:
                raise ValueError(f"latents hold {frames} frames; a cached call takes at most "
                                 f"num_kv_cache - num_sink = {ring}")


def _describe(value) -> str:
    return f"shape {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
