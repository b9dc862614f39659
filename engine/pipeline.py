"""StreamPipeline: frames in, stylised frames out, on one device or many.

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

A prompt change is live: with ``transition_frames`` the text context fades from
the one in force to the new prompt's over that many output frames
(:class:`PromptTransition`), each chunk conditioned on its own point of the fade.
So is a change of LoRA adapters or their scales (``loras``, read from a
:class:`~.models.lora.LoraLibrary`): the next chunk is denoised with the new mix.

Several pipelines (sessions) sharing one model step together with
``push_streams``: a pipeline's chunk is a generator that yields each DiT call it
needs, and calls of the same size from different pipelines run as one forward
(``CausalWanDiT.forward_streams``), which reads the weights once for all of them.

Where a forward runs is the pipeline's executor (engine/executor.py): the whole DiT
in this process, or its blocks over torch.distributed ranks (engine/parallel/), with
one stream-batch tick in flight per rank. Everything else is this one pipeline on
any number of ranks, so every mode and setting behaves the same on all of them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from bridge.params import LIVE, PARAMS
from bridge.protocol import PARAM_SPECS, ProtocolError

from .executor import Executor, ExecutorFailed, Ticket, executor_for
from .flow import add_noise, denoising_steps, sigma_for_timestep, x0_from_flow
from .models.dit import CausalWanDiT, StreamInput
from .models.lora import Adapters, LoraLibrary, LoraMix
from .models.text import PromptCache, TextEncoder, blend_embeddings
from .motion import MotionNoiseController, MotionSettings
from .slo import stream_lag_frames

FRAMES_PER_LATENT = 4
MAX_CHUNK_LATENTS = 2  # latent frames a chunk after the first may hold (without stream batching)
# Text-to-video starts from pure noise, so its steps start at the top of the schedule.
T2V_STEPS = (1000, 750, 500, 250)
# The first timestep is 1000 * noise scale - 100: below this it would be negative.
MIN_STRENGTH = PARAMS["strength"].minimum


@dataclass(frozen=True)
class StreamSettings:
    """A stream's settings. Those that are session parameters take their defaults from the
    table (bridge/params.py), where each is described."""

    height: int = PARAMS["model_height"].default
    width: int = PARAMS["model_width"].default
    steps: int = PARAMS["steps"].default
    stream_batch: bool = True
    low_latency_start: bool = PARAMS["low_latency_start"].default  # first chunk of 1 frame (1 latent), not 5 (2)
    strength: float = PARAMS["strength"].default  # noise scale for a still scene: higher follows the prompt more
    seed: int = PARAMS["seed"].default
    prompt: str = ""
    prompts: tuple[tuple[str, float], ...] = PARAMS["prompts"].default  # weighted; replace `prompt` when given
    blend: str = PARAMS["blend"].default
    transition_frames: int = PARAMS["transition_frames"].default  # output frames a prompt change fades over
    loras: tuple[tuple[str, float], ...] = PARAMS["loras"].default  # LoRA adapters: (name or path, scale)
    fit: str = PARAMS["fit"].default
    mode: str = "v2v"  # or "t2v": no input frames
    clean_cache_pass: bool = False  # re-run each finished latent at t=0 (no-batch mode only)
    ranks: int = 1  # pipeline ranks the forwards go round (engine/parallel/): each adds to the lag
    motion: MotionSettings = field(default_factory=MotionSettings)

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value % 16:
                raise ValueError(f"{name} must be a positive multiple of 16, got {value!r}")
        denoising_steps(self.steps)  # validates steps
        if not MIN_STRENGTH <= self.strength <= 1:
            raise ValueError(f"strength must be in [{MIN_STRENGTH}, 1], got {self.strength!r}")
        if self.fit not in PARAMS["fit"].choices:
            raise ValueError(f"fit must be one of {PARAMS['fit'].choices}, got {self.fit!r}")
        if self.mode not in ("v2v", "t2v"):
            raise ValueError(f"mode must be 'v2v' or 't2v', got {self.mode!r}")
        if self.blend not in PARAMS["blend"].choices:
            raise ValueError(f"blend must be one of {PARAMS['blend'].choices}, got {self.blend!r}")
        object.__setattr__(self, "prompts", _weighted_prompts(self.prompts))
        if self.blend == "slerp" and len(self.prompts) > 2:
            raise ValueError(f"blend 'slerp' mixes two weighted prompts, but prompts holds {len(self.prompts)}; "
                             "give two prompts, or blend 'linear'")
        try:  # the protocol's check of the table's entry
            object.__setattr__(self, "loras", PARAM_SPECS["loras"].check("loras", self.loras))
        except ProtocolError as error:
            raise ValueError(error.message) from None
        low, high = PARAMS["transition_frames"].minimum, PARAMS["transition_frames"].maximum
        if not isinstance(self.transition_frames, int) or not low <= self.transition_frames <= high:
            raise ValueError(f"transition_frames must be an integer from {low:g} to {high:g}, "
                             f"got {self.transition_frames!r}")
        if not isinstance(self.ranks, int) or self.ranks < 1:
            raise ValueError(f"ranks must be a positive integer, got {self.ranks!r}")
        if self.clean_cache_pass and self.stream_batch:
            raise ValueError("clean_cache_pass needs stream_batch=False: in a stream batch each slot's "
                             "cache holds its own noise level by design")

    @property
    def lag_frames(self) -> int:
        """Input frames an output trails by: the stream batch's fill, on every rank."""
        return stream_lag_frames(self.steps, self.stream_batch, self.ranks)

    @property
    def first_chunk_frames(self) -> int:
        return 1 if self.low_latency_start else 1 + FRAMES_PER_LATENT


def _weighted_prompts(prompts) -> tuple[tuple[str, float], ...]:
    """Weighted prompts as a tuple of (text, weight), checked: weights finite, at least 0, not all 0."""
    try:
        pairs = tuple((text, float(weight)) for text, weight in prompts)
    except (TypeError, ValueError):
        raise ValueError(f"prompts must be [text, weight] pairs, got {prompts!r:.80}") from None
    if not all(isinstance(text, str) for text, _ in pairs):
        raise ValueError(f"prompts must be [text, weight] pairs with text a string, got {prompts!r:.80}")
    weights = [weight for _, weight in pairs]
    if pairs and (not all(math.isfinite(w) and w >= 0 for w in weights) or not any(w > 0 for w in weights)):
        raise ValueError(f"prompts' weights must be finite and at least 0, one of them above 0, got {weights}")
    return pairs


# Settings that change between steps (the table's live parameters); any other change rebuilds the stream.
LIVE_SETTINGS = tuple(name for name, param in PARAMS.items()
                      if param.applies == LIVE and name in StreamSettings.__dataclass_fields__)


def restarts_stream(settings: StreamSettings, changes) -> bool:
    """Whether applying ``changes`` to a stream running with ``settings`` rebuilds it: a setting
    that is not live changes value."""
    return any(getattr(settings, name) != value for name, value in changes.items() if name not in LIVE_SETTINGS)


# Settings that make the text context: a change to one of them starts a prompt transition.
PROMPT_SETTINGS = ("prompt", "prompts", "blend")


def motion_settings(settings: StreamSettings) -> MotionSettings:
    """The motion controller for a strength: still scenes get the strength as noise
    scale, motion lowers it by up to the slope, never under MIN_STRENGTH."""
    slope = min(settings.motion.slope, settings.strength - MIN_STRENGTH)
    return replace(settings.motion, noise_scale=settings.strength, slope=max(slope, 0.0))


@dataclass(frozen=True)
class PromptTransition:
    """The text context moving from ``start`` to ``target`` over ``frames`` output frames.

    Counted in output frames, as the viewer sees them: output frame k after the change
    (k = 1, 2, ...) is at weight min(k / frames, 1). Frames of one chunk come from one
    latent and so share one conditioning: a chunk takes the weight of its last output
    frame. The chunk that holds output frame ``frames`` is thus the first at ``target``
    (with 4-frame chunks and ``frames`` a multiple of 4, exactly the chunk that ends on
    it), every chunk before it is short of it, and ``frames`` = 0 is a cut.
    """

    start: torch.Tensor
    target: torch.Tensor
    frames: int
    after_frame: int  # output frames of the stream before the change
    blend: str  # "linear" or "slerp"

    @classmethod
    def cut(cls, target: torch.Tensor) -> PromptTransition:
        return cls(target, target, 0, 0, "linear")

    def weight(self, last_frame: int) -> float:
        """How far a chunk that ends on the stream's output frame ``last_frame`` is from start (0) to target (1)."""
        if self.frames == 0:
            return 1.0
        return min(max((last_frame - self.after_frame) / self.frames, 0.0), 1.0)

    def context(self, last_frame: int) -> torch.Tensor:
        """The text context of a chunk that ends on output frame ``last_frame``: at the
        ends, ``start`` or ``target`` themselves (the DiT reuses their text K/V)."""
        weight = self.weight(last_frame)
        if weight == 0:
            return self.start
        if weight == 1:
            return self.target
        return blend_embeddings([self.start, self.target], [1 - weight, weight], method=self.blend)


class StreamPipeline:
    def __init__(self, dit: CausalWanDiT | Executor, vae, text_encoder: TextEncoder | PromptCache,
                 settings: StreamSettings = StreamSettings(), *, decoder=None, offload_text_encoder: bool = False,
                 loras: LoraLibrary | None = None):
        """``dit``: the DiT (run here), or an executor that runs it (engine/executor.py: the
        blocks over several ranks, say). ``vae`` encodes (and decodes unless ``decoder``, e.g.
        a TAEHV, is given).

        ``offload_text_encoder`` moves the text encoder to the CPU after each new
        prompt (umT5-XXL holds about 11 GB of GPU memory); a prompt change then
        costs a move back, so prompts already seen come from the prompt cache.
        ``loras``: where the settings' LoRA adapters are read (none can be named without it)."""
        self.executor = executor_for(dit)
        self.dit, self.vae, self.decoder = self.executor.dit, vae, decoder or vae
        self.loras = loras
        self.prompts = text_encoder if isinstance(text_encoder, PromptCache) else PromptCache(text_encoder)
        self.offload_text_encoder = offload_text_encoder
        param = next(self.dit.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.settings = replace(settings, ranks=self.executor.depth)
        self.pending: deque[_Work] = deque()  # stream-batch ticks in flight on the executor, oldest first
        self.finished: deque[np.ndarray] = deque()  # finished frames not yet returned
        self.reset()

    # -- settings ---------------------------------------------------------------
    def update(self, **changes) -> bool:
        """Change settings between steps. Live ones (``LIVE_SETTINGS``: prompts, strength,
        seed, fit, ...) apply at the next chunk and keep the caches; any other change
        rebuilds the stream. Returns whether the stream was rebuilt.

        A new text context fades in from the one in force (mid-transition: from where
        that transition stood) over ``transition_frames`` output frames; the length of
        a running transition stays as it began."""
        new = replace(self.settings, **changes)  # validates
        rebuild = restarts_stream(self.settings, changes)
        # Encoded and read before anything changes, so that a prompt or an adapter that fails changes nothing.
        target = self._encode_prompt(new) if not rebuild and any(k in changes for k in PROMPT_SETTINGS) else None
        adapters = self._lora_mix(new) if not rebuild and "loras" in changes else self.adapters
        self.settings = new
        if rebuild:
            self.reset()
            return True
        self.adapters = adapters
        if target is not None and not torch.equal(target, self.transition.target):
            self.transition = PromptTransition(self.context, target, new.transition_frames, self.settled_frames,
                                               new.blend)
        # a new strength moves the controller's target; its running average goes on
        self.motion.settings = motion_settings(new)
        return False

    def reset(self) -> None:
        """Start a new stream: empty caches, nothing in flight (``drain`` first to keep the
        frames of the ticks in flight on other ranks)."""
        self.fail()
        self.finished.clear()
        s = self.settings
        self.steps = list(T2V_STEPS[:s.steps]) if s.mode == "t2v" else denoising_steps(s.steps)
        # The step list on the device once, and each step's sigma: no step copies a number up.
        self.step_timesteps = torch.tensor(self.steps, device=self.device)
        self.step_sigmas = sigma_for_timestep(self.step_timesteps)
        self.motion = MotionNoiseController(motion_settings(s))
        self.transition = PromptTransition.cut(self._encode_prompt(s))
        self.adapters = self._lora_mix(s)
        self.vae_state = self.vae.new_stream()
        self.decoder_state = self.decoder.new_stream() if self.decoder is not self.vae else self.vae_state
        self.latent_h, self.latent_w = s.height // 8, s.width // 8
        self.cache = None  # made by the first chunk
        self.lanes: dict[int, torch.Tensor] = {}  # tick -> its stream batch [steps, 16, 1, h, w], slot i at step i
        self.chunks_in = 0  # chunks pushed, the first one included (tick m takes chunk m in)
        self.first_latents = 0  # latent frames of the first chunk
        self.next_latent = 0  # latent frame number of the next chunk (without stream batching)
        self.frames_in = 0  # frames pushed (the output frame number the newest chunk ends on)
        self.frames_out = 0  # frames finished
        self.host_size: tuple[int, int] = (s.height, s.width)  # of the latest chunk pushed
        self.sizes: dict[int, tuple[int, int]] = {}  # tick -> host size of its chunk, until it is finished
        # tick -> (frames pushed by then, the prompt transition, settings and LoRA mix then): what
        # each step of a chunk runs with (one process runs chunk c's step i at push c + i)
        self.history: dict[int, tuple[int, PromptTransition, StreamSettings, LoraMix | None]] = {}

    @property
    def lag_frames(self) -> int:
        """Input frames an output trails by: the stream batch's fill, on every rank of the executor."""
        return self.settings.lag_frames

    @property
    def settled_frames(self) -> int:
        """Output frames that one process would have finished by now (the stream batch holds the
        rest). Prompt transitions are timed on it, so they are the same on any number of ranks."""
        if not self.settings.stream_batch or not self.started:
            return self.frames_in
        return self.frames_in - FRAMES_PER_LATENT * min(self.chunks_in - 1, self.settings.steps - 1)

    @property
    def context(self) -> torch.Tensor:
        """The text context in force: what the latest settled output frames were conditioned on
        (the prompt's own once a transition is over)."""
        return self.transition.context(self.settled_frames)

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

    def drain(self) -> np.ndarray:
        """Wait for the ticks in flight on the executor (on one rank there are none) and
        return their finished frames. What the stream batch holds stays there."""
        self._finish_pending()
        return self._take_finished()

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
            count = pixels.shape[2]
            latents = self.vae.stream_encode(pixels, self.vae_state)
        self.frames_in += count
        self.host_size = size
        tick = self.chunks_in
        self.chunks_in += 1
        self.history[tick] = (self.frames_in, self.transition, self.settings, self.adapters)
        if first:
            return (yield from self._first_chunk(latents, pixels, size))
        return (yield from self._next_chunk(tick, latents, pixels, size))

    def _first_chunk(self, latents, pixels, size) -> ChunkSteps:
        """Denoise the first latents with every step in turn (batch 1), then give
        each stream-batch slot a copy of the cache, as published. As published, the
        first chunk is noised at the strength and conditioned on the step list's first
        timestep, whatever the strength (later chunks: the motion controller's t0)."""
        s = self.settings
        noise_scale = 1.0 if s.mode == "t2v" else self.motion.first_chunk(pixels)[0]
        frames = latents.shape[2]
        cache = self.executor.new_cache(1, self.latent_h, self.latent_w)
        x0 = yield from self._denoise_alone(latents, noise_scale, None, cache, chunk=0)
        self.first_latents = self.next_latent = frames
        width = s.steps if s.stream_batch else 1
        self.cache = self.executor.repeat_cache(cache, width) if width > 1 else cache
        self.cache.frame_start = [frames] * width
        return self._decode(x0, size, s.fit)

    def _next_chunk(self, tick, latents, pixels, size) -> ChunkSteps:
        s = self.settings
        if s.mode == "t2v":
            noise_scale, first_t = 1.0, None
        else:
            noise_scale, first_t = self.motion.update(pixels)
        if not s.stream_batch:
            self.cache.frame_start = [self.next_latent]
            x0 = yield from self._denoise_alone(latents, noise_scale, first_t, self.cache, tick)
            self.next_latent += latents.shape[2]
            return self._decode(x0, size, s.fit)
        return (yield from self._stream_batch_step(tick, latents, noise_scale, first_t, size))

    def _denoise_alone(self, latents, noise_scale, first_t, cache, chunk) -> ChunkSteps:
        """All steps of one chunk in sequence against one cache (re-processing the
        same frames overwrites their slots)."""
        context = self.transition.context(self.frames_in)
        x = add_noise(latents, self._noise(latents.shape, chunk, 0), noise_scale)
        timesteps = self._timesteps(first_t)
        for i in range(len(self.steps)):
            x0 = yield from self._x0(x, timesteps[i:i + 1], context, cache)
            if i + 1 < len(self.steps):
                x = add_noise(x0, self._noise(x0.shape, chunk, i + 1), self.step_sigmas[i + 1])
        if self.settings.clean_cache_pass:
            yield from self._x0(x0, torch.zeros_like(timesteps[:1]), context, cache)
        return x0

    def _timesteps(self, first_t: torch.Tensor | None) -> torch.Tensor:
        """Each step's timestep [steps] on the device: the step list's, its first replaced by
        the motion controller's t0 where given."""
        if first_t is None:
            return self.step_timesteps
        return torch.cat([first_t.reshape(1), self.step_timesteps[1:]])

    def _stream_batch_step(self, tick, latents, noise_scale, first_t, size) -> ChunkSteps:
        """One batched forward, tick ``tick``: the new chunk enters slot 0 at t0, slot i
        holds chunk ``tick - i * depth`` at step i, and the last slot's chunk is finished.

        With an executor of depth N (N ranks), N ticks are in flight at once: tick m's
        stream batch is tick m - N's, re-noised. Each slot's cache still sees its chunks
        one after another, and each chunk's step i is conditioned as one process runs it
        (at push c + i: its text, its seed, its fit), so the frames are one process's, later by
        (steps - 1) * (N - 1) chunks."""
        n, depth = self.settings.steps, self.executor.depth
        noisy = add_noise(latents, self._noise(latents.shape, tick, 0), noise_scale)
        batch = self.lanes.pop(tick, None)
        if batch is None:  # slots that hold no chunk yet compute on a copy
            batch = noisy.repeat(n, 1, 1, 1, 1)
        else:
            batch[0] = noisy[0]
        chunks = [tick - i * depth for i in range(n)]
        # A slot that holds no chunk yet re-processes the first streamed latent's
        # frame number: the write lands in the slot its real chunk will overwrite.
        self.cache.frame_start = [self.first_latents + max(chunk, 1) - 1 for chunk in chunks]
        self.sizes[tick] = size
        context = self._conditioning(tick, chunks)
        adapters = self._row_adapters(chunks)
        for old in [t for t in self.history if t < tick - n * depth]:
            del self.history[old]  # no slot refers to it any more
        x0 = yield from self._x0(batch, self._timesteps(first_t), context, self.cache, adapters)

        renoised = batch.clone()
        for i in range(n - 1):  # slot i's x0 moves to slot i+1 at the next step's level
            sigma = self.step_sigmas[i + 1]
            seed = self._as_pushed(chunks[i], i).seed
            noise = chunk_noise(x0[i:i + 1].shape, seed, chunks[i], i + 1, device=self.device, dtype=self.dtype)
            renoised[i + 1] = add_noise(x0[i:i + 1], noise, sigma)[0]
        self.lanes[tick + depth] = renoised
        if chunks[-1] < 1:  # the stream batch is still filling
            return np.zeros((0, *size, 3), dtype=np.uint8)
        return self._decode(x0[n - 1:n], self.sizes.pop(chunks[-1]), self._as_pushed(chunks[-1], n - 1).fit)

    def _as_pushed(self, chunk: int, step: int) -> StreamSettings:
        """The settings chunk ``chunk``'s step ``step`` runs with: as they were at push
        chunk + step (a slot that holds no chunk yet: the newest)."""
        return self.history[chunk + step][2] if chunk >= 1 else self.settings

    def _x0(self, x: torch.Tensor, timesteps: torch.Tensor, context, cache, adapters=None
            ) -> Generator[StreamInput, torch.Tensor, torch.Tensor]:
        """One DiT call on ``x`` at ``timesteps`` (one per row, or one for all; on the device),
        with ``adapters`` (one mix, or one per row) or else the stream's."""
        t = timesteps.reshape(-1, 1).expand(x.shape[0], x.shape[2])
        flow = yield StreamInput(x, t, context, cache, self.adapters if adapters is None else adapters)
        return x0_from_flow(x, flow, sigma_for_timestep(t[:, 0]))

    # -- noise ----------------------------------------------------------------
    def _noise(self, shape, chunk: int, step: int) -> torch.Tensor:
        return chunk_noise(shape, self.settings.seed, chunk, step, device=self.device, dtype=self.dtype)

    def _noise_latents(self, frames: int, first: bool) -> torch.Tensor:
        count = 1 + (frames - 1) // FRAMES_PER_LATENT if first else frames // FRAMES_PER_LATENT
        shape = (1, self.dit.config.in_dim, count, self.latent_h, self.latent_w)
        return self._noise(shape, self.chunks_in, 99)

    # -- prompts and adapters --------------------------------------------------
    def _lora_mix(self, settings: StreamSettings) -> LoraMix | None:
        if settings.loras and self.loras is None:
            raise ValueError("this pipeline was made without a LoRA library (StreamPipeline(..., loras=...)), "
                             "so its settings can name no LoRA adapters")
        return self.loras.mix(settings.loras) if settings.loras else None

    def _encode_prompt(self, settings: StreamSettings) -> torch.Tensor:
        context = prompt_context(self.prompts, settings)
        if self.offload_text_encoder and not self.prompts.encoder.offloaded:
            self.prompts.encoder.offload()
        return context.to(self.device, self.dtype)

    def _conditioning(self, tick: int, chunks: list[int]) -> torch.Tensor:
        """The text context of each stream-batch slot: chunk c's step i as one process runs
        it, at push c + i, by the output frame chunk c ends on. [1 or rows, L, text_dim]:
        while all rows agree it is one tensor kept from call to call, so the DiT reuses its
        cross-attention K/V (kept per tensor) instead of computing them again."""
        frames_in = self.history[tick][0]
        contexts = []
        for i, chunk in enumerate(chunks):
            if chunk >= 1:
                contexts.append(self.history[chunk + i][1].context(self.history[chunk][0]))
            else:  # a slot that holds no chunk yet: its result is never used
                contexts.append(self.transition.context(frames_in - FRAMES_PER_LATENT * i))
        if all(context is contexts[0] for context in contexts):
            return contexts[0]
        return torch.cat(contexts)

    def _row_adapters(self, chunks: list[int]) -> Adapters:
        """The LoRA adapters of each stream-batch slot: chunk c's step i as one process runs it,
        at push c + i. One mix while all slots agree, else one per slot (during a change)."""
        adapters = tuple(self.history[chunk + i][3] if chunk >= 1 else self.adapters for i, chunk in enumerate(chunks))
        return adapters[0] if all(mix is adapters[0] for mix in adapters) else adapters

    # -- pixels ---------------------------------------------------------------
    def _to_model(self, frames, expected: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, int]]:
        return model_frames(frames, expected, self.settings, device=self.device, dtype=self.dtype)

    def _decode(self, x0: torch.Tensor, size, fit: str) -> np.ndarray:
        frames = host_frames(self.decoder.stream_decode(x0, self.decoder_state), size, fit)
        self.frames_out += len(frames)
        return frames

    # -- work in flight ----------------------------------------------------------
    def _finish_pending(self, keep: int = 0) -> None:
        """Finish the ticks in flight, oldest first, until ``keep`` are left (their frames join
        ``finished``). A failure drops the rest and is raised."""
        while len(self.pending) > keep:
            work = self.pending.popleft()
            outcome = work.finish()
            if isinstance(outcome, Exception):
                self.fail()
                raise outcome
            self.finished.append(outcome)

    def fail(self) -> None:
        """Drop the work in flight after a failure; the stream needs ``reset`` to go on."""
        for work in self.pending:
            work.run.close()
        self.pending.clear()

    def _take_finished(self) -> np.ndarray:
        """The finished frames of one host size, oldest first (a size change waits for the next push)."""
        if not self.finished:
            return np.zeros((0, *self.host_size, 3), dtype=np.uint8)
        same = [self.finished.popleft()]
        while self.finished and self.finished[0].shape[1:] == same[0].shape[1:]:
            same.append(self.finished.popleft())
        return same[0] if len(same) == 1 else np.concatenate(same)


# A chunk's work: yields DiT calls, is sent their flows, returns the finished frames.
ChunkSteps = Generator[StreamInput, torch.Tensor, np.ndarray]


@dataclass
class _Work:
    """One chunk's work in progress: its generator, and the forward it waits on."""

    run: ChunkSteps
    executor: Executor
    overlaps: bool  # a stream-batch tick on a deeper executor: may stay in flight while later chunks go in
    call: StreamInput | None = None  # the DiT call it yielded, not yet submitted
    ticket: Ticket | None = None  # the forward it waits on
    place: int = 0  # its call's place in that forward

    def start(self) -> np.ndarray | Exception | None:
        """Run up to the first DiT call; the frames or the failure if it ends before one."""
        return self._resume(None)

    def finish(self) -> np.ndarray | Exception:
        """Wait for the forward and run to the end (a chunk whose steps follow one another
        submits them alone, one after another)."""
        while True:
            flow = self.ticket.result()[self.place]
            if isinstance(flow, Exception):
                self.run.close()
                return flow
            outcome = self._resume(flow)
            if outcome is not None:
                return outcome
            self.submit_alone()

    def step(self) -> np.ndarray | Exception | None:
        """Take the forward's result and run to the next DiT call (None) or the end."""
        flow = self.ticket.result()[self.place]
        if isinstance(flow, Exception):
            self.run.close()
            return flow
        return self._resume(flow)

    def submit_alone(self) -> None:
        self.ticket, self.place, self.call = self.executor.submit([self.call]), 0, None

    def _resume(self, flow) -> np.ndarray | Exception | None:
        try:
            self.call = self.run.send(flow)
            return None
        except StopIteration as done:
            return done.value
        except ExecutorFailed:
            raise
        except Exception as error:  # noqa: BLE001 - this stream's failure, returned for it alone
            return error


@torch.no_grad()
def push_streams(pipelines: list[StreamPipeline], chunks: list) -> list[np.ndarray | Exception]:
    """Push one chunk into each pipeline (as ``push``), their DiT calls together.

    Calls of the same size (latent frames, height, width) to the same DiT share
    one forward. Returns, per pipeline, its finished frames or the exception that failed
    its chunk: a failure in a pipeline's own work (its frames, its VAE) fails only that
    pipeline, and so does one of its calls (the local executor runs a failed shared
    forward again call by call). A failed pipeline needs ``reset``.

    On an executor of depth N a stream-batch tick stays in flight while the next N - 1
    chunks go in; every other chunk (a first chunk, steps one after another) finishes
    within its push."""
    results: list[np.ndarray | Exception | None] = [None] * len(pipelines)

    def fail(index: int, error: Exception) -> None:
        results[index] = error
        pipelines[index].fail()

    # Room for the new chunk: the tick whose stream batch it takes (depth ticks ago) is finished.
    _finish_oldest(pipelines, results, all_but_newest=True)

    works: dict[int, _Work] = {}
    for index, pipeline in enumerate(pipelines):
        if results[index] is None:
            overlaps = pipeline.executor.depth > 1 and pipeline.started and pipeline.settings.stream_batch
            work = _Work(pipeline.chunk_steps(chunks[index]), pipeline.executor, overlaps)
            works[index] = work
            outcome = work.start()
            if outcome is not None:
                _finished_or_failed(index, outcome, pipelines, results, fail)
                del works[index]
    while works:
        groups: dict[tuple, list[int]] = {}
        for index, work in works.items():
            groups.setdefault((id(work.executor.dit), *work.call.latents.shape[2:]), []).append(index)
        for indices in groups.values():
            ticket = works[indices[0]].executor.submit([works[index].call for index in indices])
            for place, index in enumerate(indices):
                works[index].ticket, works[index].place, works[index].call = ticket, place, None
        for index in list(works):
            pipeline, work = pipelines[index], works[index]
            if work.overlaps:
                pipeline.pending.append(work)  # a stream-batch tick: in flight while the next chunks go in
                del works[index]
                continue
            outcome = work.step()
            if outcome is not None:
                _finished_or_failed(index, outcome, pipelines, results, fail)
                del works[index]
    # While the new ticks went out, the others' flows came back: at most depth - 1 ticks stay in flight.
    _finish_oldest(pipelines, results, all_but_newest=False)
    for index, pipeline in enumerate(pipelines):
        if results[index] is None:
            results[index] = pipeline._take_finished()
    return results


def _finish_oldest(pipelines: list[StreamPipeline], results: list, *, all_but_newest: bool) -> None:
    """Finish each pipeline's oldest ticks until depth - 1 are in flight (before a push that
    takes a stream-batch tick: depth - 1 older than it; before any other chunk: none)."""
    for index, pipeline in enumerate(pipelines):
        if results[index] is not None:
            continue
        overlaps = pipeline.started and pipeline.settings.stream_batch
        keep = pipeline.executor.depth - 1 if overlaps or not all_but_newest else 0
        try:
            pipeline._finish_pending(keep=keep)
        except ExecutorFailed:
            raise
        except Exception as error:  # noqa: BLE001 - this pipeline's failure
            results[index] = error


def _finished_or_failed(index, outcome, pipelines, results, fail) -> None:
    if isinstance(outcome, Exception):
        fail(index, outcome)
    else:
        pipelines[index].finished.append(outcome)


# -- the parts of a step ---------------------------------------------------------

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
    video = uploaded(video, device)
    rgb = video[..., :3].permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    if video.dtype == torch.uint8:
        rgb = rgb / 255.0
    fitted = fit_to(rgb, settings.height, settings.width, settings.fit)
    return (fitted * 2 - 1).permute(1, 0, 2, 3)[None].to(dtype), size


def host_frames(decoded: torch.Tensor, size: tuple[int, int], fit: str) -> np.ndarray:
    """Decoded frames [1, 3, T, h, w] in [-1, 1] back at the host's size: uint8 [T, H, W, 3]."""
    rgb = (decoded[0].permute(1, 0, 2, 3).float() + 1) / 2
    restored = fit_back(rgb, *size, fit)
    return downloaded((restored.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1))


def uploaded(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device``. To a GPU through pinned memory with a non-blocking copy:
    queued behind the work already sent, with no wait for it (torch's pinned-memory cache
    keeps the buffer until the copy is done)."""
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def downloaded(frames: torch.Tensor) -> np.ndarray:
    """A device tensor as a numpy array. From a GPU into pinned memory: a direct copy, not
    staged through a driver buffer as into pageable memory (it waits for the work sent before it)."""
    if not frames.is_cuda:
        return frames.cpu().numpy()
    host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
    host.copy_(frames)
    return host.numpy()


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
