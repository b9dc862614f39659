"""Find and load checkpoints in their published layouts.

Layouts handled:
- a StreamDiffusionV2 ``model.pt``: the DiT state dict under ``generator``,
  ``generator_ema`` or ``state_dict`` (first present), or the raw dict, with an
  optional ``model.`` prefix on every key;
- Wan2.1 base weights: one ``.safetensors`` file, or a folder of shards with its
  ``*.safetensors.index.json``;
- raw ``.pth`` state dicts (the Wan VAE, TAEHV).

A checkpoint that does not fit the model fails with a :class:`CheckpointMismatch`
listing the missing and unexpected keys and the first shape conflicts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

# Where a StreamDiffusionV2 training checkpoint keeps the generator weights, in
# the order the published loader looks for them.
GENERATOR_KEYS = ("generator", "generator_ema", "state_dict")
MAX_LISTED = 8


class CheckpointMismatch(ValueError):
    """The checkpoint's keys or shapes do not fit the model."""

    def __init__(self, what: str, path: str, missing: list[str], unexpected: list[str],
                 shape_conflicts: list[tuple[str, tuple, tuple]]):
        self.missing, self.unexpected, self.shape_conflicts = missing, unexpected, shape_conflicts
        lines = [f"{what} checkpoint {path} does not fit the model:"]
        if missing:
            lines.append(f"  {len(missing)} missing keys: {_listing(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys: {_listing(unexpected)}")
        for key, want, got in shape_conflicts[:MAX_LISTED]:
            lines.append(f"  shape of {key}: model wants {list(want)}, checkpoint has {list(got)}")
        lines.append("  Check that the checkpoint matches the chosen model preset "
                     "(e.g. wan2.1-1.3b vs wan2.1-14b) and is not truncated.")
        super().__init__("\n".join(lines))


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f", ... (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file, a sharded safetensors
    folder, or a torch ``.pt``/``.pth`` file (loaded with ``weights_only``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_sharded_folder(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, expected a state dict")
    return dict(loaded)


def _read_sharded_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(
            f"no .safetensors weights in {folder}: expected diffusion_pytorch_model*.safetensors "
            "(and its .index.json when sharded), as in the Wan2.1 release")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        shard_path = folder / shard
        if not shard_path.exists():
            raise FileNotFoundError(f"shard {shard} named in the index is missing from {folder}")
        state.update(load_file(str(shard_path)))
    return state


def unwrap_generator(state: Mapping) -> dict[str, torch.Tensor]:
    """The DiT weights inside a StreamDiffusionV2 checkpoint, ``model.`` prefix stripped."""
    for key in GENERATOR_KEYS:
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    prefix = "model."
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, what: str,
                path: str | Path = "<memory>") -> nn.Module:
    """``load_state_dict(strict=True)`` with a readable error instead of torch's.

    Works on a module built on the meta device too (the tensors are assigned)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    conflicts = [(k, tuple(expected[k].shape), tuple(state[k].shape))
                 for k in expected if k in state and tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or conflicts:
        raise CheckpointMismatch(what, str(path), missing, unexpected, conflicts)
    on_meta = any(t.is_meta for t in expected.values())
    module.load_state_dict(dict(state), strict=True, assign=on_meta)
    return module


def load_dit(path: str | Path, config, *, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> nn.Module:
    """The causal DiT with weights from a StreamDiffusionV2 ``model.pt``, a Wan2.1
    ``.safetensors`` file or a Wan2.1 model folder (sharded or not)."""
    from .dit import CausalWanDiT

    path = Path(path)
    if path.is_dir():
        _check_folder_config(path, config)
    state = unwrap_generator(read_state_dict(path))
    with torch.device("meta"):
        model = CausalWanDiT(config)
    load_strict(model, state, what="DiT", path=path)
    return model.to(device=device, dtype=dtype)


# config.json fields of a Wan2.1 folder that must agree with the chosen preset
WAN_CONFIG_FIELDS = ("dim", "ffn_dim", "freq_dim", "in_dim", "out_dim", "num_heads", "num_layers",
                     "text_len", "text_dim")


def _check_folder_config(folder: Path, config) -> None:
    config_file = folder / "config.json"
    if not config_file.exists():
        return
    published = json.loads(config_file.read_text())
    conflicts = [f"{field}: folder has {published[field]}, preset {config.name!r} has {getattr(config, field)}"
                 for field in WAN_CONFIG_FIELDS if field in published and published[field] != getattr(config, field)]
    if conflicts:
        raise ValueError(f"{config_file} describes another model than preset {config.name!r}:\n  "
                         + "\n  ".join(conflicts) + "\n  Choose the preset that matches the folder.")


# Files of a Wan2.1 release folder (``Wan-AI/Wan2.1-T2V-*``) that the engine reads.
WAN_VAE_FILE = "Wan2.1_VAE.pth"
WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"


def build_models(preset: str, *, weights: str | Path | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0):
    """The DiT, VAE and text encoder of a preset, ready to stream.

    ``tiny`` has no published weights: it is built from ``seed`` (the same models on
    every machine), for tests and the CPU demo. The Wan presets load from a
    folder: a Wan2.1 release folder, optionally with a StreamDiffusionV2
    ``model.pt`` for the DiT inside it or given as ``weights``."""
    from ..config import get_preset
    from .dit import CausalWanDiT
    from .text import TinyTextEncoder, UMT5TextEncoder
    from .vae import TINY_VAE, WanVAE, load_vae

    config = get_preset(preset)
    if preset == "tiny":
        torch.manual_seed(seed)
        dit = CausalWanDiT(config)
        vae = WanVAE(TINY_VAE)
        text = TinyTextEncoder(config.text_len, config.text_dim, seed=seed, device=device)
        return dit.to(device, dtype).eval(), vae.to(device, dtype).eval(), text
    if weights is None:
        raise ValueError(f"preset {preset!r} needs its weights: pass the Wan2.1 folder (see `python -m engine "
                         f"download --model {preset}`)")
    folder = Path(weights)
    dit_file = next((p for p in (folder / "model.pt", folder / "wan_causal_dmd_v2v" / "model.pt") if p.exists()),
                    folder)
    needed = [folder / WAN_VAE_FILE, folder / WAN_T5_FILE, folder / "google" / "umt5-xxl"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(f"the {preset} weights are incomplete; missing:\n  " + "\n  ".join(missing)
                                + f"\n  Place the Wan2.1 release files in {folder} (see `python -m engine download`).")
    dit = load_dit(dit_file, config, device=device, dtype=dtype).eval()
    vae = load_vae(folder / WAN_VAE_FILE).to(device, dtype).eval()
    text = UMT5TextEncoder.load(folder, device=device)
    return dit, vae, text
