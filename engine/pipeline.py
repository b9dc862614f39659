"""StreamPipeline: frames in, stylised frames out, on one device.

One pipeline is one stream. Per chunk of 4 input frames (the first chunk 5, or 1
in low-latency mode):

1. fit the frames to the model size (crop, letterbox or stretch) and map them to [-1, 1];
2. VAE stream-encode them to one latent frame (two for a 5-frame first chunk);
3. the motion controller picks the noise scale s and first timestep t0;
4. the DiT denoises: with stream batching, slot i of one batched forward holds
   the chunk that entered i calls ago at step i, each slot with its own KV cache,
   so every call finishes one chunk after a lag of steps-1 chunks; without, the
   steps of each chunk run one after another;
5. the finished latent is decoded (VAE or TAEHV) and mapped back to the host's size.

Only finished frames come out: while the stream batch fills, ``push`` returns an
empty array, and ``lag_frames`` says how many input frames the output trails by.
Noise is drawn per chunk and step from the seed, so a run is reproducible
however its steps are scheduled.

Several pipelines (sessions) sharing one model step together with
``push_streams``: a pipeline's chunk is a generator that yields each DiT call it
needs, and calls of the same size from different pipelines run as one forward
(``CausalWanDiT.forward_streams``), which reads the weights once for all of them.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from .flow import add_noise, denoising_steps, sigma_for_timestep, x0_from_flow
from .models.dit import CausalWanDiT, StreamInput
from .models.text import PromptCache, TextEncoder, blend_embeddings
from .motion import MotionNoiseController, MotionSettings

FIT_MODES = ("crop", "letterbox", "stretch")
FRAMES_PER_LATENT = 4
MAX_CHUNK_LATENTS = 2  # latent frames a chunk after the first may hold (without stream batching)
# Text-to-video starts from pure noise, so its steps start at the top of the schedule.
T2V_STEPS = (1000, 750, 500, 250)
# The first timestep is 1000 * noise scale - 100: below this it would be negative.
MIN_STRENGTH = 0.1
# Settings that can change between steps; the others rebuild the stream.
LIVE_SETTINGS = ("prompt", "prompts", "blend", "strength", "seed", "fit")


@dataclass(frozen=True)
class StreamSettings:
    height: int = 512
    width: int = 512
    steps: int = 2
    stream_batch: bool = True
    low_latency_start: bool = False  # first chunk of 1 frame (1 latent) instead of 5 (2 latents)
    strength: float = 0.8  # noise scale for a still scene: higher follows the prompt more
    seed: int = 0
    prompt: str = ""
    prompts: tuple[tuple[str, float], ...] = ()  # weighted prompts; replace `prompt` when given
    blend: str = "linear"  # or "slerp"
    fit: str = "letterbox"
    mode: str = "v2v"  # or "t2v": no input frames
    clean_cache_pass: bool = False  # re-run each finished latent at t=0 (no-batch mode only)
    motion: MotionSettings = field(default_factory=MotionSettings)

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value % 16:
                raise ValueError(f"{name} must be a positive multiple of 16, got {value!r}")
        denoising_steps(self.steps)  # validates steps
        if not MIN_STRENGTH <= self.strength <= 1:
            raise ValueError(f"strength must be in [{MIN_STRENGTH}, 1], got {self.strength!r}")
        if self.fit not in FIT_MODES:
            raise ValueError(f"fit must be one of {FIT_MODES}, got {self.fit!r}")
        if self.mode not in ("v2v", "t2v"):
            raise ValueError(f"mode must be 'v2v' or 't2v', got {self.mode!r}")
        if self.blend not in ("linear", "slerp"):
            raise ValueError(f"blend must be 'linear' or 'slerp', got {self.blend!r}")
        if self.clean_cache_pass and self.stream_batch:
            raise ValueError("clean_cache_pass needs stream_batch=False: in a stream batch each slot's "
                             "cache holds its own noise level by design")

    @property
    def lag_frames(self) -> int:
        """Input frames an output trails by (the stream batch's fill)."""
        return FRAMES_PER_LATENT * (self.steps - 1) if self.stream_batch else 0

    @property
    def first_chunk_frames(self) -> int:
        return 1 if self.low_latency_start else 1 + FRAMES_PER_LATENT


def motion_settings(settings: StreamSettings) -> MotionSettings:
    """The motion controller for a strength: still scenes get the strength as noise
    scale, motion lowers it by up to the slope, never under MIN_STRENGTH."""
    slope = min(settings.motion.slope, settings.strength - MIN_STRENGTH)
    return replace(settings.motion, noise_scale=settings.strength, slope=max(slope, 0.0))


class StreamPipeline:
    def __init__(self, dit: CausalWanDiT, vae, text_encoder: TextEncoder | PromptCache,
                 settings: StreamSettings = StreamSettings(), *, decoder=None, offload_text_encoder: bool = False):
        """``vae`` encodes (and decodes unless ``decoder``, e.g. a TAEHV, is given).

        ``offload_text_encoder`` moves the text encoder to the CPU after each new
        prompt (umT5-XXL holds about 11 GB of GPU memory); a prompt change then
        costs a move back, so prompts already seen come from the prompt cache."""
        self.dit, self.vae, self.decoder = dit, vae, decoder or vae
        self.prompts = text_encoder if isinstance(text_encoder, PromptCache) else PromptCache(text_encoder)
        self.offload_text_encoder = offload_text_encoder
        param = next(dit.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.settings = settings
        self.reset()

    # -- settings ---------------------------------------------------------------
    def update(self, **changes) -> bool:
        """Change settings between steps. Live ones (prompt, blend, strength, seed,
        fit) apply at the next chunk and keep the caches; any other change rebuilds
        the stream. Returns whether the stream was rebuilt."""
        new = replace(self.settings, **changes)  # validates
        rebuild = any(getattr(new, k) != getattr(self.settings, k) for k in changes if k not in LIVE_SETTINGS)
        prompt_changed = any(k in changes for k in ("prompt", "prompts", "blend"))
        self.settings = new
        if rebuild:
            self.reset()
        else:
            if prompt_changed:
                self.context = self._encode_prompt()
            # a new strength moves the controller's target; its running average goes on
            self.motion.settings = motion_settings(new)
        return rebuild

    def reset(self) -> None:
        """Start a new stream: empty caches, nothing in flight."""
        s = self.settings
        self.steps = list(T2V_STEPS[:s.steps]) if s.mode == "t2v" else denoising_steps(s.steps)
        self.motion = MotionNoiseController(motion_settings(s))
        self.context = self._encode_prompt()
        self.vae_state = self.vae.new_stream()
        self.decoder_state = self.decoder.new_stream() if self.decoder is not self.vae else self.vae_state
        self.latent_h, self.latent_w = s.height // 8, s.width // 8
        self.cache = None  # made by the first chunk
        self.in_flight = None  # [n, 16, 1, h, w] stream-batch slots, slot i at step i
        self.chunks_in = 0  # chunks pushed since the first one
        self.next_latent = 0  # latent frame number of the next chunk
        self.host_size: tuple[int, int] | None = None
        self.queued_sizes: list[tuple[int, int]] = []  # host size of each chunk in flight

    @property
    def lag_frames(self) -> int:
        """Input frames an output trails by (the stream batch's fill)."""
        return self.settings.lag_frames

    @property
    def first_chunk_frames(self) -> int:
        return self.settings.first_chunk_frames

    @property
    def next_chunk_frames(self) -> int:
        """How many frames the next ``push`` takes (the fewest, see ``chunk_sizes``)."""
        return self.chunk_sizes[0]

    @property
    def started(self) -> bool:
        """Whether the stream's first chunk is done (the next ``push`` takes a later chunk)."""
        return self.cache is not None

    @property
    def chunk_sizes(self) -> tuple[int, ...]:
        """The chunk lengths the next ``push`` takes. Without stream batching a chunk after
        the first may be 2 latent frames (8 video frames): one forward per step for both,
        more frames a second for 4 frames more latency."""
        if not self.started:
            return (self.first_chunk_frames,)
        if self.settings.stream_batch:
            return (FRAMES_PER_LATENT,)
        return tuple(FRAMES_PER_LATENT * latents for latents in range(1, MAX_CHUNK_LATENTS + 1))

    # -- streaming ----------------------------------------------------------------
    def push(self, frames) -> np.ndarray:
        """Take a chunk of frames (uint8 [T, H, W, 3|4], or float in [0, 1]); return
        the finished frames as uint8 [T', H, W, 3], possibly none while filling.

        The first chunk of a stream has ``first_chunk_frames`` frames, every later
        one 4 (or 8 without stream batching: ``chunk_sizes``). In t2v mode ``frames``
        is the number of frames to generate instead (None: ``next_chunk_frames``)."""
        [finished] = push_streams([self], [frames])
        if isinstance(finished, Exception):
            raise finished
        return finished

    def chunk_steps(self, frames) -> ChunkSteps:
        """The work of one ``push``, as a generator: it yields every DiT call it needs
        (a :class:`StreamInput`), is sent back that call's flow, and returns the
        finished frames. ``push_streams`` drives it."""
        first = self.cache is None
        expected = self.chunk_sizes
        if self.settings.mode == "t2v":
            count = expected[0] if frames is None else frames
            if count not in expected:
                raise ValueError(f"frames is {frames!r}; this chunk of the stream takes "
                                 f"{' or '.join(map(str, expected))}")
            latents = self._noise_latents(count, first)
            size = (self.settings.height, self.settings.width)
            pixels = None
        else:
            pixels, size = self._to_model(frames, expected)
            latents = self.vae.stream_encode(pixels, self.vae_state)
        if first:
            return (yield from self._first_chunk(latents, pixels, size))
        return (yield from self._next_chunk(latents, pixels, size))

    def _first_chunk(self, latents, pixels, size) -> ChunkSteps:
        """Denoise the first latents with every step in turn (batch 1), then give
        each stream-batch slot a copy of the cache, as published."""
        s = self.settings
        if s.mode == "t2v":
            noise_scale, first_t = 1.0, self.steps[0]
        else:
            noise_scale, first_t = self.motion.first_chunk(pixels)
        frames = latents.shape[2]
        cache = self.dit.new_cache(1, self.latent_h, self.latent_w)
        x0 = yield from self._denoise_alone(latents, noise_scale, first_t, cache, chunk=0)
        self.next_latent = frames
        width = s.steps if s.stream_batch else 1
        self.cache = cache.repeated(width) if width > 1 else cache
        self.cache.frame_start = [frames] * width
        self.chunks_in = 1
        return self._decode(x0, size)

    def _next_chunk(self, latents, pixels, size) -> ChunkSteps:
        s = self.settings
        if s.mode == "t2v":
            noise_scale, first_t = 1.0, self.steps[0]
        else:
            noise_scale, first_t = self.motion.update(pixels)
        chunk = self.chunks_in
        self.chunks_in += 1
        if not s.stream_batch:
            self.cache.frame_start = [self.next_latent]
            x0 = yield from self._denoise_alone(latents, noise_scale, first_t, self.cache, chunk)
            self.next_latent += latents.shape[2]
            return self._decode(x0, size)
        return (yield from self._stream_batch_step(latents, noise_scale, first_t, size, chunk))

    def _denoise_alone(self, latents, noise_scale, first_t, cache, chunk) -> ChunkSteps:
        """All steps of one chunk in sequence against one cache (re-processing the
        same frames overwrites their slots)."""
        x = add_noise(latents, self._noise(latents.shape, chunk, 0), noise_scale)
        steps = [first_t] + self.steps[1:]
        for i, t in enumerate(steps):
            x0 = yield from self._x0(x, t, cache)
            if i + 1 < len(steps):
                x = add_noise(x0, self._noise(x0.shape, chunk, i + 1), float(sigma_for_timestep(steps[i + 1])))
        if self.settings.clean_cache_pass:
            yield from self._x0(x0, 0, cache)
        return x0

    def _stream_batch_step(self, latents, noise_scale, first_t, size, chunk) -> ChunkSteps:
        """One batched forward: the new chunk enters slot 0 at t0, slot i moves on
        to step i, the last slot's chunk is finished."""
        n = self.settings.steps
        noisy = add_noise(latents, self._noise(latents.shape, chunk, 0), noise_scale)
        if self.in_flight is None:
            self.in_flight = noisy.repeat(n, 1, 1, 1, 1)  # slots not yet filled compute on a copy
        else:
            self.in_flight[0] = noisy[0]
        # A slot that holds no chunk yet re-processes the first streamed latent's
        # frame number: the write lands in the slot its real chunk will overwrite.
        start = self.next_latent
        filled = self.chunks_in - 1  # chunks streamed so far, this one included
        self.cache.frame_start = [start - min(i, filled - 1) for i in range(n)]
        timesteps = [first_t] + self.steps[1:]
        x0 = yield from self._x0(self.in_flight, timesteps, self.cache)
        self.next_latent += 1
        self.queued_sizes.append(size)

        renoised = self.in_flight.clone()
        for i in range(n - 1):  # slot i's x0 moves to slot i+1 at the next step's level
            sigma = float(sigma_for_timestep(self.steps[i + 1]))
            noise = self._noise(x0[i:i + 1].shape, chunk - i, i + 1)
            renoised[i + 1] = add_noise(x0[i:i + 1], noise, sigma)[0]
        self.in_flight = renoised
        if filled < n:
            return np.zeros((0, *size, 3), dtype=np.uint8)
        return self._decode(x0[n - 1:n], self.queued_sizes.pop(0))

    def _x0(self, x: torch.Tensor, timesteps, cache) -> Generator[StreamInput, torch.Tensor, torch.Tensor]:
        batch = x.shape[0]
        t = torch.as_tensor(timesteps, device=self.device).reshape(-1, 1).expand(batch, x.shape[2])
        flow = yield StreamInput(x, t, self.context, cache)
        sigma = sigma_for_timestep(t[:, 0]).to(self.device)
        return x0_from_flow(x, flow, sigma)

    # -- noise ----------------------------------------------------------------
    def _noise(self, shape, chunk: int, step: int) -> torch.Tensor:
        return chunk_noise(shape, self.settings.seed, chunk, step, device=self.device, dtype=self.dtype)

    def _noise_latents(self, frames: int, first: bool) -> torch.Tensor:
        count = 1 + (frames - 1) // FRAMES_PER_LATENT if first else frames // FRAMES_PER_LATENT
        shape = (1, self.dit.config.in_dim, count, self.latent_h, self.latent_w)
        return self._noise(shape, self.chunks_in, 99)

    # -- prompts --------------------------------------------------------------
    def _encode_prompt(self) -> torch.Tensor:
        context = prompt_context(self.prompts, self.settings)
        if self.offload_text_encoder and not self.prompts.encoder.offloaded:
            self.prompts.encoder.offload()
        return context.to(self.device, self.dtype)

    # -- pixels ---------------------------------------------------------------
    def _to_model(self, frames, expected: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, int]]:
        return model_frames(frames, expected, self.settings, device=self.device, dtype=self.dtype)

    def _decode(self, x0: torch.Tensor, size) -> np.ndarray:
        return host_frames(self.decoder.stream_decode(x0, self.decoder_state), size, self.settings.fit)


# A chunk's work: yields DiT calls, is sent their flows, returns the finished frames.
ChunkSteps = Generator[StreamInput, torch.Tensor, np.ndarray]


@torch.no_grad()
def push_streams(pipelines: list[StreamPipeline], chunks: list) -> list[np.ndarray | Exception]:
    """Push one chunk into each pipeline (as ``push``), their DiT calls together.

    Calls of the same size (latent frames, height, width) share one forward. Returns,
    per pipeline, its finished frames or the exception that failed its chunk: a failure
    in a pipeline's own work (its frames, its VAE) fails only that pipeline, and a shared
    forward that fails is run again stream by stream, so that a failure (running out of
    memory, say) falls on the stream that causes it. A failed pipeline needs ``reset``."""
    runs = [pipeline.chunk_steps(frames) for pipeline, frames in zip(pipelines, chunks)]
    results: list[np.ndarray | Exception | None] = [None] * len(runs)
    waiting: dict[int, StreamInput] = {}  # run -> the DiT call it waits on

    def resume(index: int, flow: torch.Tensor | None) -> None:
        try:
            waiting[index] = runs[index].send(flow)
        except StopIteration as done:
            results[index] = done.value
        except Exception as error:  # noqa: BLE001 - this pipeline's failure, returned for it alone
            results[index] = error

    for index in range(len(runs)):
        resume(index, None)
    while waiting:
        groups: dict[tuple, list[int]] = {}
        for index, call in waiting.items():
            groups.setdefault((id(pipelines[index].dit), *call.latents.shape[2:]), []).append(index)
        calls, waiting = waiting, {}
        for indices in groups.values():
            flows = _forward_together(pipelines[indices[0]].dit, [calls[index] for index in indices])
            for index, flow in zip(indices, flows):
                if isinstance(flow, Exception):
                    runs[index].close()
                    results[index] = flow
                else:
                    resume(index, flow)
    return results


def _forward_together(dit: CausalWanDiT, calls: list[StreamInput]) -> list[torch.Tensor | Exception]:
    positions = [call.cache.save_position() for call in calls]
    try:
        return dit.forward_streams(calls)
    except Exception as error:  # noqa: BLE001 - retried alone below, or returned for its stream
        if len(calls) == 1:
            return [error]
    # Out of the except clause, so the failed forward's tensors are freed before the retries.
    for call, position in zip(calls, positions):
        call.cache.restore_position(position)
    return [flow for call in calls for flow in _forward_together(dit, [call])]


# Parts of a step that the pipeline-parallel stream (parallel.py) shares.

def chunk_noise(shape, seed: int, chunk: int, step: int, *, device, dtype) -> torch.Tensor:
    """Noise for one chunk and denoising step, from the seed alone (not a running
    generator), so a stream is the same however its steps are scheduled."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + chunk * 16 + step) % 2**63)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def prompt_context(prompts: PromptCache, settings: StreamSettings) -> torch.Tensor:
    """The text context [1, text_len, text_dim] of the settings' prompt, or of their
    weighted prompts blended."""
    weighted = settings.prompts or ((settings.prompt, 1.0),)
    texts = [p for p, _ in weighted]
    embeddings = prompts.encode(texts)
    if len(texts) == 1:
        return embeddings
    return blend_embeddings(list(embeddings[:, None]), [w for _, w in weighted], method=settings.blend)


def model_frames(frames, expected: tuple[int, ...], settings: StreamSettings, *, device, dtype
                 ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Validate a chunk and fit it to the model: [1, 3, T, h, w] in [-1, 1], and the host's (H, W)."""
    video = _as_video(frames, expected)
    size = tuple(video.shape[1:3])
    video = video.to(device)
    rgb = video[..., :3].permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    if video.dtype == torch.uint8:
        rgb = rgb / 255.0
    fitted = fit_to(rgb, settings.height, settings.width, settings.fit)
    return (fitted * 2 - 1).permute(1, 0, 2, 3)[None].to(dtype), size


def host_frames(decoded: torch.Tensor, size: tuple[int, int], fit: str) -> np.ndarray:
    """Decoded frames [1, 3, T, h, w] in [-1, 1] back at the host's size: uint8 [T, H, W, 3]."""
    rgb = (decoded[0].permute(1, 0, 2, 3).float() + 1) / 2
    restored = fit_back(rgb, *size, fit)
    return (restored.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _as_video(frames, expected: tuple[int, ...]) -> torch.Tensor:
    """[T, H, W, C] tensor from a numpy array or tensor, with readable errors."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise ValueError(f"frames must be an array [frames, height, width, 3 or 4], got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise ValueError(f"frames must be shaped [frames, height, width, 3 or 4] (RGB or RGBA), "
                         f"got shape {list(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError("frames is an empty chunk: expected at least one frame")
    if frames.shape[0] not in expected:
        raise ValueError(f"frames holds {frames.shape[0]} frames; this chunk of the stream takes "
                         f"{' or '.join(map(str, expected))}")
    if frames.dtype != torch.uint8 and not frames.is_floating_point():
        raise ValueError(f"frames must be uint8 (0-255) or float (0-1), got dtype {frames.dtype}")
    if frames.is_floating_point() and not torch.isfinite(frames).all():
        raise ValueError("frames contains NaN or infinite pixels")
    if frames.shape[1] < 2 or frames.shape[2] < 2:
        raise ValueError(f"frames are {frames.shape[1]}x{frames.shape[2]} pixels; at least 2x2 expected")
    return frames


def fit_to(rgb: torch.Tensor, height: int, width: int, fit: str) -> torch.Tensor:
    """Fit [T, 3, H, W] frames to height x width: crop to the aspect, letterbox
    (pad with black) or stretch."""
    src_h, src_w = rgb.shape[-2:]
    if fit == "crop":
        top, left, crop_h, crop_w = _crop_box(src_h, src_w, height, width)
        return _resize(rgb[..., top:top + crop_h, left:left + crop_w], height, width)
    if fit == "letterbox":
        top, left, inner_h, inner_w = _letterbox_box(src_h, src_w, height, width)
        out = rgb.new_zeros(rgb.shape[0], 3, height, width)
        out[..., top:top + inner_h, left:left + inner_w] = _resize(rgb, inner_h, inner_w)
        return out
    return _resize(rgb, height, width)


def fit_back(rgb: torch.Tensor, height: int, width: int, fit: str) -> torch.Tensor:
    """Map model-size frames back to the host's height x width: the inverse of
    ``fit_to`` (crop: the stylised crop in place, black where the input was cut)."""
    model_h, model_w = rgb.shape[-2:]
    if fit == "crop":
        top, left, crop_h, crop_w = _crop_box(height, width, model_h, model_w)
        out = rgb.new_zeros(rgb.shape[0], 3, height, width)
        out[..., top:top + crop_h, left:left + crop_w] = _resize(rgb, crop_h, crop_w)
        return out
    if fit == "letterbox":
        top, left, inner_h, inner_w = _letterbox_box(height, width, model_h, model_w)
        return _resize(rgb[..., top:top + inner_h, left:left + inner_w], height, width)
    return _resize(rgb, height, width)


def _crop_box(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int, int, int]:
    scale = min(src_h / height, src_w / width)
    crop_h, crop_w = max(1, round(height * scale)), max(1, round(width * scale))
    return (src_h - crop_h) // 2, (src_w - crop_w) // 2, crop_h, crop_w


def _letterbox_box(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int, int, int]:
    scale = min(height / src_h, width / src_w)
    inner_h, inner_w = max(1, round(src_h * scale)), max(1, round(src_w * scale))
    return (height - inner_h) // 2, (width - inner_w) // 2, inner_h, inner_w


def _resize(rgb: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(rgb.shape[-2:]) == (height, width):
        return rgb
    return F.interpolate(rgb, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
