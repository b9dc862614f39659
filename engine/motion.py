"""Motion-aware noise controller (StreamDiffusionV2, published formula).

Fast motion needs less noise, so the output follows the input instead of
smearing it; a still scene can take more noise and so more stylisation. Per chunk:

    d_f   = sqrt(mean((x_f - x_{f-1})^2))      pixel frames in [-1, 1]; the first
                                                frame is compared with the previous
                                                chunk's last frame
    d_hat = clamp(max_f d_f / diff_scale, 0, 1)
    s     = (noise_scale - slope * d_hat) * ema + (1 - ema) * s_prev
    t0    = int(1000 * s) - timestep_offset    first denoising timestep

With the published defaults (0.8, 0.1, 0.9, 0.2, 100) s stays in [0.7, 0.8] and
t0 in [600, 700]. The latent is noised at sigma = s while the model is told t0,
about 0.1 less: that mismatch is deliberate in the published method.

After the first chunk, s and t0 are computed where the frames are, as 0-dim tensors
(float64 and int64), so a chunk on a GPU costs the host no wait; float64 on the
device rounds each operation as Python's floats do, so the values are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MotionSettings:
    noise_scale: float = 0.8       # s for a still scene (s_max); 0.7 in the published no-batch mode
    slope: float = 0.1             # how far full motion lowers s: s_min = noise_scale - slope
    ema: float = 0.9               # weight of the new value against the previous s
    diff_scale: float = 0.2        # RMS frame difference that counts as full motion
    timestep_offset: int = 100     # t0 = int(num_train_timesteps * s) - timestep_offset
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if not 0 < self.noise_scale <= 1:
            raise ValueError(f"noise_scale must be in (0, 1], got {self.noise_scale}")
        if not 0 <= self.slope <= self.noise_scale:
            raise ValueError(f"slope must be in [0, noise_scale={self.noise_scale}], got {self.slope}")
        if not 0 < self.ema <= 1:
            raise ValueError(f"ema must be in (0, 1], got {self.ema}")
        if not self.diff_scale > 0:
            raise ValueError(f"diff_scale must be positive, got {self.diff_scale}")
        if not 0 <= self.timestep_offset < self.num_train_timesteps:
            raise ValueError(f"timestep_offset must be in [0, num_train_timesteps), "
                             f"got {self.timestep_offset}")


class MotionNoiseController:
    """Picks each chunk's noise scale and first timestep from how much it moves.

    Frames are video tensors in [-1, 1], channels first: ``[B, 3, T, H, W]`` (the
    VAE's input layout) or ``[3, T, H, W]`` for a single clip. As published, the
    difference of a frame is averaged over batch, channels and pixels, so use one
    controller per stream. The only state kept between chunks is the previous
    chunk's last frame and the previous scale.
    """

    def __init__(self, settings: MotionSettings = MotionSettings()):
        self.settings = settings
        self.reset()

    def reset(self) -> None:
        """Forget the stream (new session, new resolution): the next chunk is a first chunk."""
        self.noise_scale = self.settings.noise_scale
        self._last_frame: torch.Tensor | None = None

    def first_timestep(self, noise_scale: float | torch.Tensor) -> int | torch.Tensor:
        """t0 = int(1000 * s) - 100 with the published settings (an int64 tensor for a tensor s)."""
        s = self.settings
        if isinstance(noise_scale, torch.Tensor):  # s > 0, so int()'s truncation is the floor
            return (s.num_train_timesteps * noise_scale).floor().long() - s.timestep_offset
        return int(s.num_train_timesteps * noise_scale) - s.timestep_offset

    def first_chunk(self, frames: torch.Tensor) -> tuple[float, int]:
        """Start the stream: returns the unmodified ``(noise_scale, t0)``.

        The first chunk has no earlier frame to compare with. With the default
        noise_scale 0.8, t0 = 700 is the first entry of the published step list,
        which the published code uses unchanged for the first chunk.
        """
        frames = _as_batched_video(frames)
        self.reset()
        self._remember_last(frames)
        return self.noise_scale, self.first_timestep(self.noise_scale)

    def update(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(noise_scale, t0)`` for this chunk, which follows the previous one, as 0-dim
        tensors on the frames' device (float64, int64)."""
        frames = _as_batched_video(frames)
        if self._last_frame is None:
            raise RuntimeError("call first_chunk() with the stream's first chunk before update()")
        if frames.shape[:2] + frames.shape[3:] != self._last_frame.shape:
            raise ValueError(f"frames of shape {list(frames.shape)} do not continue the previous chunk "
                             f"(last frame {list(self._last_frame.shape)}); call reset() when the "
                             "resolution or batch changes")
        s = self.settings
        previous_and_chunk = torch.cat([self._last_frame.unsqueeze(2), frames.to(self._last_frame)], dim=2)
        differences = previous_and_chunk[:, :, 1:] - previous_and_chunk[:, :, :-1]
        rms_per_frame = differences.square().mean(dim=(0, 1, 3, 4)).sqrt()
        motion = (rms_per_frame.max().double() / s.diff_scale).clamp(0.0, 1.0)
        self.noise_scale = (s.noise_scale - s.slope * motion) * s.ema + (1 - s.ema) * self.noise_scale
        self._remember_last(frames)
        return self.noise_scale, self.first_timestep(self.noise_scale)

    def _remember_last(self, frames: torch.Tensor) -> None:
        # A copy, not a view: a view would keep the whole chunk alive.
        self._last_frame = frames[:, :, -1].detach().to(torch.float32, copy=True)


def _as_batched_video(frames: torch.Tensor) -> torch.Tensor:
    """Check a chunk and give it the [B, 3, T, H, W] layout."""
    if not isinstance(frames, torch.Tensor):
        raise ValueError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
    batched = frames.unsqueeze(0) if frames.dim() == 4 else frames
    if batched.dim() != 5 or batched.shape[1] != 3 or batched.shape[2] == 0:
        raise ValueError(f"frames must be [B, 3, T, H, W] or [3, T, H, W] with T >= 1, "
                         f"got shape {list(frames.shape)}")
    if not batched.is_floating_point():
        raise ValueError(f"frames must be floating point in [-1, 1], got {batched.dtype}")
    # Checked where it costs no device wait; the pipeline checks its frames on the host before upload.
    if batched.device.type == "cpu" and not torch.isfinite(batched).all():
        raise ValueError("frames contain NaN or infinite values")
    return batched
