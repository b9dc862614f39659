"""Model presets and their cache settings.

Field names follow Wan2.1's ``config.json`` so a preset reads like the published
one; the cache fields are StreamDiffusionV2's (``configs/wan_causal_dmd_v2v.yaml``).

Cache presets (``CACHE_PRESETS``) set the rolling KV cache as StreamDiffusionV2's
configs do: ``default`` as ``wan_causal_dmd_v2v.yaml`` (6 frames, 3 sinks, adaptive
sink at 0.2), ``fast`` as ``wan_causal_dmd_v2v_fast.yaml`` (5 frames, 2 sinks,
adaptive sink off), the cache the published ``--fast`` mode runs with (which also
decodes with TAEHV: ``build_models(..., decoder="taehv")``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelConfig:
    name: str
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    freq_dim: int = 256
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    text_dim: int = 4096
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    # Rolling KV cache, counted in latent frames.
    num_kv_cache: int = 6
    num_sink: int = 3
    adapt_sink_threshold: float = 0.2  # -1 turns adaptive sink replacement off
    rope_refresh_at: int = 50
    rope_max_positions: int = 1024

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of num_heads ({self.num_heads})")
        if self.head_dim % 2 or self.head_dim < 12:
            raise ValueError(f"head_dim ({self.head_dim}) must be even and at least 12 for 3-D RoPE")
        if not 0 <= self.num_sink < self.num_kv_cache:
            raise ValueError(f"num_sink ({self.num_sink}) must be in [0, num_kv_cache={self.num_kv_cache})")
        if not self.num_kv_cache <= self.rope_refresh_at <= self.rope_max_positions:
            raise ValueError("rope_refresh_at must lie between num_kv_cache and rope_max_positions")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def with_cache(self, **changes) -> "ModelConfig":
        """The same model with other cache settings (e.g. ``num_kv_cache=5, num_sink=2``)."""
        return replace(self, **changes)


# name -> the ModelConfig cache fields it sets
CACHE_PRESETS: dict[str, dict] = {
    "default": dict(num_kv_cache=6, num_sink=3, adapt_sink_threshold=0.2),
    "fast": dict(num_kv_cache=5, num_sink=2, adapt_sink_threshold=-1.0),
}

PRESETS: dict[str, ModelConfig] = {
    # A few layers and a small width: a forward takes milliseconds on a CPU.
    "tiny": ModelConfig(name="tiny", dim=64, ffn_dim=128, num_heads=2, num_layers=2,
                        freq_dim=32, text_len=32, text_dim=32),
    "wan2.1-1.3b": ModelConfig(name="wan2.1-1.3b", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-14b": ModelConfig(name="wan2.1-14b", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def get_preset(name: str, cache: str = "default") -> ModelConfig:
    """The model preset ``name`` with the KV cache of the cache preset ``cache``."""
    try:
        config = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
    if cache not in CACHE_PRESETS:
        raise ValueError(f"unknown cache preset {cache!r}; choose one of {sorted(CACHE_PRESETS)}")
    return config.with_cache(**CACHE_PRESETS[cache])


@dataclass(frozen=True)
class SpeedOptions:
    """Speed settings that leave the result the same up to float rounding. Off by
    default: each is for CUDA, where the GPU benchmark (bench/pipeline.py) measures
    it against eager before it may become a default.

    - ``vae_channels_last``: the Wan VAE's weights and activations in channels-last
      memory (NDHWC), the layout cuDNN's fastest 3-D convolutions use; valid (and
      equal to rounding) on the CPU too.
    - ``cudnn_benchmark``: ``torch.backends.cudnn.benchmark``: cuDNN times its
      algorithms for each new input shape and keeps the fastest (a process-wide
      switch; the first chunk of each shape pays for the timing). CUDA only.
    """

    vae_channels_last: bool = False
    cudnn_benchmark: bool = False

    def apply_globals(self, device) -> None:
        """Set the process-wide switches these options name, for ``device``."""
        import torch

        if self.cudnn_benchmark and torch.device(device).type == "cuda":
            torch.backends.cudnn.benchmark = True
