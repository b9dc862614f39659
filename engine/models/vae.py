"""The Wan2.1 video VAE, with streaming encode and decode for live video.

What it does. Frames ``[B, 3, T, H, W]`` in [-1, 1] become latents
``[B, 16, t, H/8, W/8]`` and back. Time is compressed 4x, except that a clip's
first frame is encoded alone: a clip of 1 + 4k frames gives 1 + k latents, and
decoding 1 + k latents gives back 1 + 4k frames.

Why it can stream. Every convolution over time is causal: the output at frame t
sees frames <= t only (time is padded at the front). So a clip can be processed
chunk by chunk if each time-aware layer remembers the few input frames it needs
from the previous chunk:

- ``CausalConv3d`` (kernel 3 in time) keeps its last 2 input frames;
- the encoder's time downsampling (``Downsample``, stride 2 in time) keeps its
  last input frame, and passes a clip's first frame through alone;
- the decoder's time upsampling (``Upsample``) turns each frame into two, except
  a clip's first frame, which stays one frame; it keeps its last 2 input frames.

That memory is a :class:`VAEStreamState`, one per stream, so one model serves
several streams; its size is fixed by the frame size, not by the stream length.
Chunks: a stream's first ``stream_encode`` call takes 1 + 4k frames (StreamDiffusionV2
sends 5 for 2 latents), later calls 4k frames for k latents. ``stream_decode``
gives 1 frame for a stream's first latent and 4 for each later one. Fed in any
such chunks, the results equal :meth:`WanVAE.encode` / :meth:`WanVAE.decode` of
the whole clip, which run the same layers over all frames at once.

Latent scale. ``encode`` returns the encoder's mean ("mu") as is, NOT normalised,
which is what the StreamDiffusionV2 DiT expects; ``decode`` first de-normalises
(``z * std + mean`` with the 16 published per-channel constants). The log-variance
half of the encoder output is never used (no sampling at inference).

Weights. The module and parameter names are those of the published
``Wan2.1_VAE.pth`` (a raw state dict; RMS norm weights are called ``gamma``), so
:func:`load_vae` loads it strictly. Upstream's ``Sequential`` indices are kept,
which is why some layers sit at fixed positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.weights import load_strict, read_state_dict

# Per-channel statistics of the Wan2.1 latents, published with the VAE.
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


@dataclass(frozen=True)
class WanVAEConfig:
    """Layer widths and down/upsampling pattern; the defaults are the published Wan2.1 VAE."""

    z_dim: int = 16  # latent channels
    base_dim: int = 96  # channels of the first encoder level and the last decoder level
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)  # channel multiplier per level
    num_res_blocks: int = 2  # per encoder level; the decoder has one more
    # Per encoder downsampling step: does it also halve time? (The decoder mirrors it.)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN21_LATENT_STD

    def __post_init__(self) -> None:
        if self.z_dim < 1 or self.base_dim < 1 or self.num_res_blocks < 1:
            raise ValueError("z_dim, base_dim and num_res_blocks must be positive")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs one flag per downsampling step "
                             f"({len(self.dim_mult) - 1}), got {self.temporal_downsample}")
        if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
            raise ValueError(f"latent_mean and latent_std need {self.z_dim} values each")
        if any(self.base_dim * m % 2 for m in self.dim_mult):
            raise ValueError("every level width must be even (decoder upsampling halves it)")

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent, along height and along width."""
        return 2 ** len(self.temporal_downsample)

    @property
    def temporal_factor(self) -> int:
        """Frames per latent (after a clip's first frame, which has a latent of its own)."""
        return 2 ** sum(self.temporal_downsample)


WAN21_VAE = WanVAEConfig()
# Same structure, factors and latent space with narrow layers: for tests and the CPU demo.
TINY_VAE = WanVAEConfig(base_dim=8)
VAE_CONFIGS = {"wan2.1": WAN21_VAE, "tiny": TINY_VAE}


def get_vae_config(name: str) -> WanVAEConfig:
    """The VAE config called ``name`` (one of ``VAE_CONFIGS``)."""
    if name not in VAE_CONFIGS:
        raise ValueError(f"name: unknown VAE config {name!r}; choose one of {sorted(VAE_CONFIGS)}")
    return VAE_CONFIGS[name]


# A stream's memory for one network (encoder or decoder): module path -> past frames.
StreamCache = dict[str, torch.Tensor]


@dataclass
class VAEStreamState:
    """What one stream remembers between calls: past frames of each time-aware layer.

    The caches map a layer's module path to its remembered frames. They hold a
    fixed number of frames per layer, so their size depends on the batch and
    frame size only, never on how long the stream runs.
    """

    encoder_cache: StreamCache = field(default_factory=dict)
    decoder_cache: StreamCache = field(default_factory=dict)
    frames_encoded: int = 0
    latents_decoded: int = 0
    # (batch, height, width) of the frames and of the latents this stream was started with.
    frames_shape: tuple[int, int, int] | None = None
    latents_shape: tuple[int, int, int] | None = None

    def reset(self) -> None:
        """Forget everything: the next calls start a new stream."""
        self.encoder_cache.clear()
        self.decoder_cache.clear()
        self.frames_encoded = self.latents_decoded = 0
        self.frames_shape = self.latents_shape = None

    def nbytes(self) -> int:
        """Bytes held by the cached frames."""
        caches = (*self.encoder_cache.values(), *self.decoder_cache.values())
        return sum(t.numel() * t.element_size() for t in caches)


# --------------------------------------------------------------------------- layers
# Layers whose forward takes ``cache``: a stream's cache dict, or None for a whole
# clip. An entry missing from the cache means "this is the start of the clip".


class CausalConv3d(nn.Conv3d):
    """A 3-D conv whose output at frame t sees input frames t-2..t only.

    Height and width are zero-padded on both sides as usual; time is padded at
    the front with the input frames that came before: zeros at the start of a
    clip, else the last frames remembered from the previous chunk.
    """

    cache_key: str  # set by WanVAE

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int]):
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size,) * 3
        _, kernel_h, kernel_w = kernel_size
        super().__init__(in_channels, out_channels, kernel_size, padding=(0, kernel_h // 2, kernel_w // 2))
        self.past_frames = kernel_size[0] - 1

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        past = cache.get(self.cache_key) if cache is not None else None
        if past is None:
            b, c, _, h, w = x.shape
            past = x.new_zeros(b, c, self.past_frames, h, w)
        x = torch.cat([past, x], dim=2)
        if cache is not None:
            # clone: a view would keep the whole concatenated chunk alive
            cache[self.cache_key] = x[:, :, -self.past_frames:].clone()
        return super().forward(x)


class RMSNorm(nn.Module):
    """Normalises each position's channel vector to length sqrt(C), then scales per channel."""

    def __init__(self, channels: int, spatial_dims: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels, *([1] * spatial_dims)))
        self.scale = channels ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def _per_frame(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D ``layer`` to every frame of ``x`` [B, C, T, H, W]."""
    b, c, t, h, w = x.shape
    y = layer(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


def _run(layers: nn.Sequential, x: torch.Tensor, cache: StreamCache | None) -> torch.Tensor:
    """Run ``layers`` in order, handing the stream cache to those that take it."""
    for layer in layers:
        if isinstance(layer, (CausalConv3d, ResidualBlock, Downsample, Upsample)):
            x = layer(x, cache)
        else:
            x = layer(x)
    return x


class ResidualBlock(nn.Module):
    """norm, SiLU, conv, norm, SiLU, conv, plus a 1x1x1 conv shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_channels, spatial_dims=3),
            nn.SiLU(),
            CausalConv3d(in_channels, out_channels, 3),
            RMSNorm(out_channels, spatial_dims=3),
            nn.SiLU(),
            nn.Identity(),  # dropout during training; kept so that the conv below is residual.6
            CausalConv3d(out_channels, out_channels, 3),
        )
        self.shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        return _run(self.residual, x, cache) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention among the positions of each frame (not across time)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels, spatial_dims=2)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _per_frame(self._attend, x)

    def _attend(self, frames: torch.Tensor) -> torch.Tensor:
        n, c, h, w = frames.shape
        qkv = self.to_qkv(self.norm(frames)).reshape(n, 3, c, h * w).transpose(2, 3)
        q, k, v = qkv.unbind(1)  # each [n, h*w, c]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, c, h, w))


class Downsample(nn.Module):
    """Halve height and width (stride-2 conv); if ``temporal``, also halve time.

    Time is halved by a stride-2 conv over windows of 3 frames (t-2, t-1, t) for
    even t >= 2, so each output frame pairs two new frames with the last one of
    the previous pair. A clip's first frame has no pair and passes through alone:
    1 + 2k frames become 1 + k.
    """

    cache_key: str  # set by WanVAE

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        # pad right and bottom only, as the published weights were trained with
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(channels, channels, 3, stride=2))
        self.time_conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        x = _per_frame(self.resample, x)
        if self.time_conv is None:
            return x
        previous = cache.get(self.cache_key) if cache is not None else None
        if cache is not None:
            cache[self.cache_key] = x[:, :, -1:].clone()
        if previous is not None:
            return self.time_conv(torch.cat([previous, x], dim=2))
        if x.shape[2] == 1:
            return x
        return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)


class Upsample(nn.Module):
    """Double height and width (nearest, then a conv that halves the channels);
    if ``temporal``, first double time.

    Time is doubled by a causal conv with twice the channels, whose two halves
    become two consecutive frames. A clip's first frame is not doubled, which is
    why a stream's first latent decodes to 1 frame and each later one to 4.
    """

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                      nn.Conv2d(channels, channels // 2, 3, padding=1))
        self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        if self.time_conv is not None:
            x = self._double_time(x, cache)
        return _per_frame(self.resample, x)

    def _double_time(self, x: torch.Tensor, cache: StreamCache | None) -> torch.Tensor:
        started = cache is not None and self.time_conv.cache_key in cache
        if started:
            return self._interleave(self.time_conv(x, cache))
        first, rest = x[:, :, :1], x[:, :, 1:]
        if cache is not None:
            # Mark the stream as started. An all-zero past is what the frames after
            # the first see anyway: the causal padding at the start of a clip.
            b, c, _, h, w = x.shape
            cache[self.time_conv.cache_key] = x.new_zeros(b, c, self.time_conv.past_frames, h, w)
        if rest.shape[2] == 0:
            return first
        return torch.cat([first, self._interleave(self.time_conv(rest, cache))], dim=2)

    @staticmethod
    def _interleave(pairs: torch.Tensor) -> torch.Tensor:
        """[B, 2C, T, H, W] -> [B, C, 2T, H, W]: channel halves become frames 2t and 2t+1."""
        b, c2, t, h, w = pairs.shape
        return pairs.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)


# --------------------------------------------------------------------------- encoder / decoder


def _middle(channels: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(channels, channels), AttentionBlock(channels),
                         ResidualBlock(channels, channels))


def _head(channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(channels, spatial_dims=3), nn.SiLU(), CausalConv3d(channels, out_channels, 3))


class Encoder(nn.Module):
    """Frames -> 2 * z_dim channels (mean and log-variance) at 1/8 size and 1/4 time."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        widths = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(3, widths[0], 3)
        blocks: list[nn.Module] = []
        in_width = widths[0]
        for level, width in enumerate(widths[1:]):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_width, width))
                in_width = width
            if level < len(config.temporal_downsample):
                blocks.append(Downsample(width, temporal=config.temporal_downsample[level]))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(in_width)
        self.head = _head(in_width, 2 * config.z_dim)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for part in (self.downsamples, self.middle, self.head):
            x = _run(part, x, cache)
        return x


class Decoder(nn.Module):
    """z_dim channels -> frames, mirroring the encoder (one more residual block per level)."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        widths = [config.base_dim * m for m in (config.dim_mult[-1], *reversed(config.dim_mult))]
        temporal_upsample = tuple(reversed(config.temporal_downsample))
        self.conv1 = CausalConv3d(config.z_dim, widths[0], 3)
        self.middle = _middle(widths[0])
        blocks: list[nn.Module] = []
        in_width = widths[0]
        for level, width in enumerate(widths[1:]):
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_width, width))
                in_width = width
            if level < len(temporal_upsample):
                blocks.append(Upsample(width, temporal=temporal_upsample[level]))
                in_width = width // 2
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(in_width, 3)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for part in (self.middle, self.upsamples, self.head):
            x = _run(part, x, cache)
        return x


# --------------------------------------------------------------------------- the VAE


class WanVAE(nn.Module):
    """The Wan2.1 VAE: offline ``encode``/``decode`` of whole clips, and
    ``stream_encode``/``stream_decode`` of chunks with a :class:`VAEStreamState`.

    Inputs are cast to the weights' dtype; outputs come in that dtype.
    """

    def __init__(self, config: WanVAEConfig = WAN21_VAE):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.conv1 = nn.Conv3d(2 * config.z_dim, 2 * config.z_dim, 1)  # to mean and log-variance
        self.conv2 = nn.Conv3d(config.z_dim, config.z_dim, 1)  # first step of decoding
        self.decoder = Decoder(config)
        # A layer's entry in a stream cache is its module path: unique, and readable when debugging.
        for name, module in self.named_modules():
            if isinstance(module, (CausalConv3d, Downsample)):
                module.cache_key = name
        # (device, dtype) -> (mean, std) shaped [1, z, 1, 1, 1]: made once per device, not per call
        self._statistics: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.channels_last = False

    def set_channels_last(self, enabled: bool = True) -> "WanVAE":
        """Keep weights and activations in channels-last memory (NDHWC; NHWC for the
        per-frame 2-D layers), the layout cuDNN's fastest convolutions use. The same
        arithmetic in another memory order: equal up to float rounding, on any device."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                layout = torch.channels_last_3d if module.weight.ndim == 5 else torch.channels_last
                if not enabled:
                    layout = torch.contiguous_format
                module.weight.data = module.weight.data.contiguous(memory_format=layout)
        self.channels_last = enabled
        return self

    def new_stream(self) -> VAEStreamState:
        """An empty state for one new stream."""
        return VAEStreamState()

    # offline -------------------------------------------------------------

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Latents of a whole clip: [B, 3, 1+4k, H, W] in [-1, 1] -> [B, z, 1+k, H/8, W/8], not normalised.

        All frames go through each layer at once; for long clips at high resolution
        :meth:`stream_encode` gives the same latents in bounded memory.
        """
        self._check_frames(video, "video")
        t, step = video.shape[2], self.config.temporal_factor
        if t % step != 1:
            raise ValueError(f"video: a whole clip has 1 + {step}k frames "
                             f"(1, {1 + step}, {1 + 2 * step}, ...), got {t}")
        return self._mean(self.encoder(self._to_weights(video)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Frames of a whole clip: [B, z, 1+k, h, w] (DiT latent space) -> [B, 3, 1+4k, 8h, 8w] in [-1, 1]."""
        self._check_latents(latents)
        x = self.conv2(self._denormalize(self._to_weights(latents)))
        return self.decoder(x).clamp(-1, 1)

    # streaming -----------------------------------------------------------
    # No autograd: cached frames carrying graphs would chain every chunk to the last.

    @torch.no_grad()
    def stream_encode(self, frames: torch.Tensor, state: VAEStreamState) -> torch.Tensor:
        """Latents of the next chunk of a stream, not normalised.

        The first call of a stream takes 1 + 4k frames (1 + k latents, e.g. 5 -> 2),
        each later call 4k frames (k latents). Equal to :meth:`encode` of the whole clip.
        """
        self._check_frames(frames, "frames")
        b, _, t, h, w = frames.shape
        step = self.config.temporal_factor
        first = state.frames_encoded == 0
        if first and t % step != 1:
            raise ValueError(f"frames: the first chunk of a stream takes 1 + {step}k frames "
                             f"(1, {1 + step}, {1 + 2 * step}, ...), got {t}")
        if not first and (t == 0 or t % step):
            raise ValueError(f"frames: after the first chunk a stream takes a multiple of {step} "
                             f"frames ({step}, {2 * step}, ...), got {t}")
        if first:
            state.frames_shape = (b, h, w)
        elif (b, h, w) != state.frames_shape:
            raise ValueError(f"frames: batch, height, width {(b, h, w)} differ from this stream's "
                             f"{state.frames_shape}; reset the state to start a new stream")
        frames = self._to_weights(frames)
        # One encoder call per latent, as published: bounded activation memory.
        groups = [frames[:, :, :1]] if first else []
        rest = frames[:, :, 1:] if first else frames
        groups += [rest[:, :, i:i + step] for i in range(0, rest.shape[2], step)]
        latents = torch.cat([self.encoder(group, state.encoder_cache) for group in groups], dim=2)
        state.frames_encoded += t
        return self._mean(latents)

    @torch.no_grad()
    def stream_decode(self, latents: torch.Tensor, state: VAEStreamState) -> torch.Tensor:
        """Frames of the next latents of a stream, in [-1, 1].

        Latents are in DiT space (as ``stream_encode`` gives them) and are
        de-normalised here. A stream's first latent gives 1 frame, each later one 4.
        Equal to :meth:`decode` of the whole clip.
        """
        self._check_latents(latents)
        b, _, t, h, w = latents.shape
        if state.latents_decoded == 0:
            state.latents_shape = (b, h, w)
        elif (b, h, w) != state.latents_shape:
            raise ValueError(f"latents: batch, height, width {(b, h, w)} differ from this stream's "
                             f"{state.latents_shape}; reset the state to start a new stream")
        x = self.conv2(self._denormalize(self._to_weights(latents)))
        frames = [self.decoder(x[:, :, i:i + 1], state.decoder_cache) for i in range(t)]
        state.latents_decoded += t
        return torch.cat(frames, dim=2).clamp(-1, 1)

    # helpers -------------------------------------------------------------

    def _mean(self, moments: torch.Tensor) -> torch.Tensor:
        """The mean half of conv1's output; the log-variance half is unused at inference."""
        return self.conv1(moments)[:, :self.config.z_dim]

    def _denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_statistics(latents)
        return latents * std + mean

    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The published mean and std on ``like``'s device and dtype, made there once
        (a per-call copy from the host would be a host-device wait on CUDA)."""
        key = (like.device, like.dtype)
        if key not in self._statistics:
            shape = (1, self.config.z_dim, 1, 1, 1)
            self._statistics[key] = tuple(
                torch.tensor(values, dtype=like.dtype, device=like.device).view(shape)
                for values in (self.config.latent_mean, self.config.latent_std))
        return self._statistics[key]

    def _to_weights(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.conv2.weight.dtype)
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    def _check_frames(self, frames: torch.Tensor, name: str) -> None:
        if frames.ndim != 5:
            raise ValueError(f"{name}: expected [B, 3, T, H, W], got shape {list(frames.shape)}")
        if frames.shape[1] != 3:
            raise ValueError(f"{name}: expected 3 (RGB) channels in dim 1, got {frames.shape[1]} "
                             f"(shape {list(frames.shape)}; layout is [B, C, T, H, W])")
        factor = self.config.spatial_factor
        if frames.shape[3] % factor or frames.shape[4] % factor:
            raise ValueError(f"{name}: height and width must be multiples of {factor}, "
                             f"got {frames.shape[3]}x{frames.shape[4]}")

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5:
            raise ValueError(f"latents: expected [B, {self.config.z_dim}, t, h, w], got shape {list(latents.shape)}")
        if latents.shape[1] != self.config.z_dim:
            raise ValueError(f"latents: expected {self.config.z_dim} channels in dim 1, got {latents.shape[1]}")
        if latents.shape[2] == 0:
            raise ValueError("latents: got 0 latent frames")


def load_vae(path: str | Path, config: WanVAEConfig = WAN21_VAE) -> WanVAE:
    """A :class:`WanVAE` with the weights of a raw state dict file (e.g. ``Wan2.1_VAE.pth``).

    Loaded strictly: keys or shapes that do not fit raise ``CheckpointMismatch``.
    The weights keep the file's dtype, on the CPU; the model is frozen in eval mode.
    """
    with torch.device("meta"):  # no random init of weights about to be replaced
        vae = WanVAE(config)
    load_strict(vae, read_state_dict(path), what="Wan VAE", path=path)
    return vae.eval().requires_grad_(False)
