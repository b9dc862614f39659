"""TAEHV: madebyollin's tiny video autoencoder, a fast Wan2.1 encoder and decoder.

The published ``taew2_1.pth`` is a raw state dict of two ``nn.Sequential``s,
``encoder.N...`` and ``decoder.N...``, built from 2-D convs (3x3, padding 1) and
three kinds of time-aware layers:

- ``MemBlock``: a residual block that sees the current frame and the block's
  input one frame earlier (zeros before the first frame), concatenated on channels;
- ``TimePool`` (``TPool`` upstream): merges ``stride`` consecutive frames into one
  with a 1x1 conv over their stacked channels (encoder only);
- ``TimeGrow`` (``TGrow`` upstream): splits each frame into ``stride`` frames with a
  1x1 conv producing ``stride`` channel groups (decoder only).

The decoder is causal: frame t depends on frames <= t only, so it can run one
latent at a time if each MemBlock keeps its last input frame. That memory is the
whole streaming state, one frame per MemBlock, so it does not grow with the stream,
and a stream decoded in any chunks equals the offline decode of the whole clip.
(StreamDiffusionV2's wrapper instead re-decodes the last 3 latents plus the new
one from empty memory each call: 4x the work, and only close to the offline result.)

Frame counts. Each latent grows to 4 frames; the first 3 frames of a video are
dropped (upstream's ``frames_to_trim``), which lines the output up with the Wan
VAE: t latents give 4t - 3 frames, i.e. 1 frame for the first latent of a stream
and 4 for every later one, the same contract as the Wan VAE's stream decode.

Latent scaling. TAEHV applies no mean/std: it decodes the latents exactly as the
diffusion model produces them (taehv README). In StreamDiffusionV2 the Wan VAE
decode receives the DiT's x0 and de-normalises it itself (z * std + mean) before
its decoder; the TAEHV wrapper hands that same x0 to TAEHV unchanged
(``models/wan/taehv_wrapper.py``). So :meth:`TAEHV.decode` takes the tensor you
would give the Wan VAE decode, in DiT space, and must not be de-normalised.

Pixels: TAEHV works in [0, 1]; this module takes and returns [-1, 1] like the Wan VAE.
Layout: latents ``[B, 16, t, h, w]``, frames ``[B, 3, T, 8h, 8w]``.

Encoding. The published encoder turns every 4 frames into one latent: the first
TimePool merges frame pairs (2k, 2k+1), the second merges those pairs again, the
third keeps one frame per latent; its MemBlocks are causal like the decoder's.
The published ``encode_video`` pads a clip at its END (repeating the last frame)
to a multiple of 4, so its latent k covers frames 4k..4k+3. That does not line up
with the Wan VAE, whose latent 0 is frame 0 alone and latent k covers frames
4k-3..4k, nor with this decoder, which drops 3 frames at the start so that latent
0 gives one frame. So :meth:`TAEHV.stream_encode` puts 3 copies of a stream's
first frame in FRONT of it: latent 0 is the published encode of frame 0 held
for 4 frames (what the published wrapper in daydreamlive/scope computes for a
1-frame first chunk, padded at the end), and latent k covers frames 4k-3..4k,
the Wan VAE's chunking exactly: a stream's first call takes 1 + 4k frames (1 + k
latents), each later call 4k frames (k latents). The encoder's memory is one
frame per MemBlock; TimePool groups never straddle calls (calls hold whole
groups of 4), so a stream encoded in any such chunks equals :meth:`TAEHV.encode`
of the whole clip, which equals the published ``encode_video`` of the clip with
frame 0 repeated 3 times in front.

Encoded latent space. TAEHV's own latents are normalised Wan latents (what the
DiT produces; see above). The Wan VAE's ``stream_encode`` instead returns the raw,
un-normalised encoder mean, which is what the StreamDiffusionV2 DiT is fed. So that
either encoder can feed the DiT, :meth:`TAEHV.stream_encode` returns the same
space as the Wan VAE's: TAEHV's latents de-normalised, ``z * std + mean`` with
the published per-channel statistics (``encode(..., native=True)`` gives TAEHV's
own latents).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.models.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD
from engine.models.weights import load_strict, read_state_dict

@dataclass(frozen=True)
class TAEHVConfig:
    """Layer widths and time pattern; the defaults are the published taew2_1."""

    latent_channels: int = 16
    image_channels: int = 3
    encoder_width: int = 64
    decoder_widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    # Per encoder stage: does its TimePool merge 2 frames (else 1)?
    encoder_time_pool: tuple[bool, bool, bool] = (True, True, False)
    # Per decoder stage: does its TimeGrow split into 2 frames (else 1)?
    decoder_time_grow: tuple[bool, bool, bool] = (False, True, True)
    # Statistics of the Wan latent space: encode() maps TAEHV's latents to the Wan VAE encoder's space.
    latent_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN21_LATENT_STD

    def __post_init__(self) -> None:
        for name in ("latent_channels", "image_channels", "encoder_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if len(self.decoder_widths) != 4 or min(self.decoder_widths) < 1:
            raise ValueError(f"decoder_widths must be 4 positive ints, got {self.decoder_widths}")
        for name in ("encoder_time_pool", "decoder_time_grow"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must have one flag per stage (3), got {getattr(self, name)}")
        if len(self.latent_mean) != self.latent_channels or len(self.latent_std) != self.latent_channels:
            raise ValueError(f"latent_mean and latent_std need {self.latent_channels} values each")

    @property
    def time_upscale(self) -> int:
        """Frames per latent."""
        return 2 ** sum(self.decoder_time_grow)

    @property
    def time_downscale(self) -> int:
        """Frames per latent when encoding."""
        return 2 ** sum(self.encoder_time_pool)

    @property
    def frames_to_trim(self) -> int:
        """Frames dropped at the start of a video so that latent 0 gives one frame."""
        return self.time_upscale - 1


TAEW2_1 = TAEHVConfig()
# Same layers, keys and time pattern with a few channels: runs in milliseconds on a CPU.
TINY_TAEHV = TAEHVConfig(encoder_width=4, decoder_widths=(8, 8, 4, 4))


def conv3x3(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class TanhClamp(nn.Module):
    """Softly limits latents to (-3, 3) before decoding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block over [current frame, previous frame's input].

    Every published MemBlock keeps its width, so the residual path is the identity
    (upstream's ``skip`` is then an ``nn.Identity`` with no weights)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Sequential(conv3x3(2 * width, width), nn.ReLU(),
                                  conv3x3(width, width), nn.ReLU(),
                                  conv3x3(width, width))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class TimePool(nn.Module):
    """Merges each ``stride`` consecutive frames into one: [N * stride, C, H, W] -> [N, C, H, W].

    The frames of a group are stacked on channels, earliest first, then a 1x1 conv."""

    def __init__(self, width: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(width * stride, width, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.conv(x.reshape(n // self.stride, self.stride * c, h, w))


class TimeGrow(nn.Module):
    """Turns each frame into ``stride`` frames: [N, C, H, W] -> [N * stride, C, H, W]."""

    def __init__(self, width: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(width, width * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # Channel group k of input frame i becomes output frame i * stride + k.
        return self.conv(x).reshape(n * self.stride, c, h, w)


def _encoder_layers(config: TAEHVConfig) -> list[nn.Module]:
    width = config.encoder_width
    layers: list[nn.Module] = [conv3x3(config.image_channels, width), nn.ReLU()]
    for pool in config.encoder_time_pool:
        layers += [TimePool(width, 2 if pool else 1), conv3x3(width, width, stride=2, bias=False),
                   MemBlock(width), MemBlock(width), MemBlock(width)]
    return layers + [conv3x3(width, config.latent_channels)]


def _decoder_layers(config: TAEHVConfig) -> list[nn.Module]:
    widths = config.decoder_widths
    layers: list[nn.Module] = [TanhClamp(), conv3x3(config.latent_channels, widths[0]), nn.ReLU()]
    for stage, grow in enumerate(config.decoder_time_grow):
        width, next_width = widths[stage], widths[stage + 1]
        layers += [MemBlock(width), MemBlock(width), MemBlock(width), nn.Upsample(scale_factor=2),
                   TimeGrow(width, 2 if grow else 1), conv3x3(width, next_width, bias=False)]
    return layers + [nn.ReLU(), conv3x3(widths[3], config.image_channels)]


@dataclass
class TAEHVStream:
    """One video stream's state, for decoding and for encoding; make it with :meth:`TAEHV.new_stream`.

    ``memory[i]`` is decoder layer i's last input frame when that layer is a
    MemBlock (None before the first latent and for every other layer);
    ``encoder_memory[i]`` the same for encoder layer i."""

    memory: list[torch.Tensor | None]
    frames_to_trim: int  # start frames still to drop
    shape: tuple[int, int, int] | None = None  # (B, h, w) fixed by the first latent
    encoder_memory: list[torch.Tensor | None] = field(default_factory=list)
    frames_encoded: int = 0
    frames_shape: tuple[int, int, int] | None = None  # (B, H, W) fixed by the first frames encoded

    def nbytes(self) -> int:
        """Bytes held by the remembered frames (encoder and decoder)."""
        return sum(t.numel() * t.element_size() for t in (*self.memory, *self.encoder_memory) if t is not None)


def _run_layer(layer: nn.Module, x: torch.Tensor, memory: list, index: int) -> torch.Tensor:
    """Run one layer over all frames of x = [B, T, C, H, W] at once."""
    batch = x.shape[0]
    if isinstance(layer, MemBlock):
        # Frame t's past is frame t-1's input; the first frame's is the stream memory.
        before = memory[index] if memory[index] is not None else torch.zeros_like(x[:, 0])
        past = torch.cat([before[:, None], x[:, :-1]], dim=1)
        memory[index] = x[:, -1].clone()  # a copy, so the chunk's activations can be freed
        out = layer(x.flatten(0, 1), past.flatten(0, 1))
    else:
        out = layer(x.flatten(0, 1))
    return out.reshape(batch, -1, *out.shape[1:])  # TimeGrow changes the frame count


class TAEHV(nn.Module):
    def __init__(self, config: TAEHVConfig = TAEW2_1):
        super().__init__()
        if not isinstance(config, TAEHVConfig):
            raise ValueError(f"config must be a TAEHVConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = nn.Sequential(*_encoder_layers(config))
        self.decoder = nn.Sequential(*_decoder_layers(config))
        # (device, dtype) -> (mean, std) shaped [1, C, 1, 1, 1]: made once per device, not per call
        self._statistics: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def new_stream(self) -> TAEHVStream:
        return TAEHVStream(memory=[None] * len(self.decoder), frames_to_trim=self.config.frames_to_trim,
                           encoder_memory=[None] * len(self.encoder))

    # encoding ------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor, *, native: bool = False) -> torch.Tensor:
        """Latents of a whole clip: [B, 3, 1 + 4k, H, W] in [-1, 1] -> [B, 16, 1 + k, H/8, W/8].

        In the Wan VAE encoder's space (raw, not normalised) unless ``native``, which
        gives TAEHV's own latents (normalised Wan latents, as the DiT produces them)."""
        return self.stream_encode(video, self.new_stream(), native=native)

    @torch.no_grad()
    def stream_encode(self, frames: torch.Tensor, state: TAEHVStream, *, native: bool = False) -> torch.Tensor:
        """Latents of the next chunk of a stream, as the Wan VAE's ``stream_encode`` gives them.

        The first call of a stream takes 1 + 4k frames (1 + k latents: 1 -> 1, 5 -> 2),
        each later call 4k frames (k latents). Equal to :meth:`encode` of the whole clip."""
        self._check_frames(frames)
        if not isinstance(state, TAEHVStream) or len(state.encoder_memory) != len(self.encoder):
            raise ValueError("state must be a TAEHVStream made by this model's new_stream()")
        batch, _, count, height, width = frames.shape
        step, first = self.config.time_downscale, state.frames_encoded == 0
        if first and count % step != 1:
            raise ValueError(f"frames: the first chunk of a stream takes 1 + {step}k frames "
                             f"(1, {1 + step}, {1 + 2 * step}, ...), got {count}")
        if not first and count % step:
            raise ValueError(f"frames: after the first chunk a stream takes a multiple of {step} "
                             f"frames ({step}, {2 * step}, ...), got {count}")
        if first:
            state.frames_shape = (batch, height, width)
        elif state.frames_shape != (batch, height, width):
            raise ValueError(f"frames: batch, height, width {(batch, height, width)} differ from this "
                             f"stream's {state.frames_shape}; start a new stream for them")
        x = (frames.to(self.encoder[0].weight.dtype).transpose(1, 2) + 1) / 2  # [B, T, 3, H, W] in [0, 1]
        if first:  # frame 0 held for a whole latent: latent k then covers frames 4k-3..4k
            x = torch.cat([x[:, :1].expand(-1, step - 1, -1, -1, -1), x], dim=1)
        for index, layer in enumerate(self.encoder):
            x = _run_layer(layer, x, state.encoder_memory, index)
        state.frames_encoded += count
        latents = x.transpose(1, 2)
        if native:
            return latents
        mean, std = self._latent_statistics(latents)
        return latents * std + mean

    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype)
        if key not in self._statistics:
            shape = (1, self.config.latent_channels, 1, 1, 1)
            self._statistics[key] = tuple(
                torch.tensor(values, dtype=like.dtype, device=like.device).view(shape)
                for values in (self.config.latent_mean, self.config.latent_std))
        return self._statistics[key]

    def _check_frames(self, frames: torch.Tensor) -> None:
        channels = self.config.image_channels
        if not isinstance(frames, torch.Tensor) or frames.ndim != 5 or frames.shape[1] != channels:
            shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise ValueError(f"frames must be a [B, {channels}, T, H, W] tensor in [-1, 1], got {shape}")
        factor = 2 ** len(self.config.encoder_time_pool)
        if min(frames.shape) < 1 or frames.shape[3] % factor or frames.shape[4] % factor:
            raise ValueError(f"frames: height and width must be positive multiples of {factor}, and T at "
                             f"least 1; got shape {tuple(frames.shape)}")

    # decoding ------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode a whole clip: [B, 16, t, h, w] -> [B, 3, 4t - 3, 8h, 8w] in [-1, 1]."""
        return self.stream_decode(latents, self.new_stream())

    @torch.no_grad()
    def stream_decode(self, latents: torch.Tensor, state: TAEHVStream) -> torch.Tensor:
        """Decode the next latents of a stream, updating ``state``.

        The first latent of a stream gives 1 frame, each later latent 4; however
        the stream is cut into calls, the frames equal :meth:`decode` of the whole."""
        self._check_latents(latents)
        if not isinstance(state, TAEHVStream) or len(state.memory) != len(self.decoder):
            raise ValueError("state must be a TAEHVStream made by this model's new_stream()")
        batch, _, _, height, width = latents.shape
        if state.shape is not None and state.shape != (batch, height, width):
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not continue this stream: "
                             f"it decodes batch, height, width = {state.shape}")
        state.shape = (batch, height, width)

        x = latents.to(self.decoder[1].weight.dtype).transpose(1, 2)  # layers work on [B, T, C, H, W]
        for index, layer in enumerate(self.decoder):
            x = _run_layer(layer, x, state.memory, index)
        x = x[:, state.frames_to_trim:]
        state.frames_to_trim = 0
        return x.transpose(1, 2).clamp(0, 1) * 2 - 1

    def _check_latents(self, latents: torch.Tensor) -> None:
        channels = self.config.latent_channels
        if (not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[1] != channels
                or min(latents.shape) < 1):
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a non-empty [B, {channels}, t, h, w] tensor, got {shape}")


def load_taehv(path: str | Path, config: TAEHVConfig = TAEW2_1) -> TAEHV:
    """Build TAEHV, encoder and decoder, from a published checkpoint (e.g. ``taew2_1.pth``
    or ``taew2_1.safetensors``), strictly.

    Returns a float32 model on the CPU in eval mode; move and cast it as needed
    (StreamDiffusionV2 runs it in fp16)."""
    with torch.device("meta"):  # no random init: every weight comes from the file
        model = TAEHV(config)
    load_strict(model, read_state_dict(path), what="TAEHV", path=path)
    return model.float().eval().requires_grad_(False)
