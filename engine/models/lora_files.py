"""LoRA files for the causal Wan DiT, read without torch: what each key holds, and whether a
file's factors fit the model's linear layers.

The two layouts published for Wan2.1 (in a .safetensors file, or a torch file of tensors):

    diffusers  transformer.blocks.0.attn1.to_q.lora_A.weight            [rank, in]   PEFT's names, as diffusers
               transformer.blocks.0.attn1.to_q.lora_B.weight            [out, rank]  saves them
    wan        diffusion_model.blocks.0.self_attn.q.lora_down.weight    [rank, in]   the original Wan names, as
               diffusion_model.blocks.0.self_attn.q.lora_up.weight      [out, rank]  ComfyUI reads them
               diffusion_model.blocks.0.self_attn.q.alpha               []

Either layout may spell its factors lora_A/lora_B or lora_down/lora_up, with or without its
prefix (PEFT's own files say base_model.model.), and may give a layer an alpha; without one
alpha is the rank (a factor of 1), as PEFT and diffusers take it. A layer's weight W then
works as W + scale * alpha / rank * up @ down.

Any linear layer of the DiT may be adapted (linear_shapes lists them, by their Wan names,
which the model's own modules have); anything else (norms, the patch embedding's convolution,
a full-weight `diff`) is refused with its keys named (LoraFileError).

engine/devices.py lists the adapters of a folder from their safetensors headers alone, so
this module needs neither torch nor a model; engine/models/lora.py reads the tensors.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LORA_DIR = "~/.sdbridge/loras"  # serve --lora-dir: where the names a session gives are looked for
LORA_SUFFIX = ".safetensors"
MAX_LISTED = 5  # offending keys an error names, per kind of problem
MAX_HEADER_BYTES = 100_000_000  # safetensors' own bound on a header

PREFIXES = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.")
FACTORS = {".lora_A.weight": "down", ".lora_down.weight": "down", ".lora_B.weight": "up",
           ".lora_up.weight": "up", ".alpha": "alpha"}
WAN_LINEAR = re.compile(r"blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]|blocks\.\d+\.ffn\.[02]"
                        r"|(text|time)_embedding\.[02]|time_projection\.1|head\.head")
# diffusers' names of the DiT's linear layers, and Wan's for them
DIFFUSERS_BLOCK_NAMES = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
DIFFUSERS_NAMES = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
}


class LoraFileError(ValueError):
    """A LoRA file that cannot be used: the message names the file and the first offending keys."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.path, self.problems = str(path), problems
        super().__init__(f"LoRA file {path}: " + "; ".join(problems))


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer of the DiT of a model preset (engine/config.py), by name."""
    dim, ffn_dim = config.dim, config.ffn_dim
    shapes = {"text_embedding.0": (dim, config.text_dim), "text_embedding.2": (dim, dim),
              "time_embedding.0": (dim, config.freq_dim), "time_embedding.2": (dim, dim),
              "time_projection.1": (6 * dim, dim), "head.head": (config.out_dim * math.prod(config.patch_size), dim)}
    for block in range(config.num_layers):
        for attention in ("self_attn", "cross_attn"):
            shapes.update({f"blocks.{block}.{attention}.{name}": (dim, dim) for name in "qkvo"})
        shapes[f"blocks.{block}.ffn.0"] = (ffn_dim, dim)
        shapes[f"blocks.{block}.ffn.2"] = (dim, ffn_dim)
    return shapes


@dataclass(frozen=True)
class LayerKeys:
    """The keys of one adapted layer's factors in a file."""

    down: str
    up: str
    alpha: str | None


@dataclass(frozen=True)
class LoraPlan:
    """What a LoRA file adapts, checked: its layout and, by layer (Wan names), its keys and rank."""

    layout: str  # "diffusers", "wan", or both joined by "+" for a file that mixes them
    layers: dict[str, LayerKeys]
    ranks: dict[str, int]

    def rank_text(self) -> str:
        low, high = min(self.ranks.values()), max(self.ranks.values())
        return f"rank {low}" if low == high else f"ranks {low}-{high}"


def parse_key(key: str) -> tuple[str, str, str] | None:
    """(layout, layer, factor) of a key of a LoRA file, factor one of down, up, alpha; None for
    a key of no known layout."""
    suffix = next((suffix for suffix in FACTORS if key.endswith(suffix)), None)
    if suffix is None:
        return None
    module = key[:-len(suffix)]
    prefix = next((prefix for prefix in PREFIXES if module.startswith(prefix)), "")
    module = module[len(prefix):]
    if WAN_LINEAR.fullmatch(module):
        return "wan", module, FACTORS[suffix]
    block = re.fullmatch(r"(blocks\.\d+)\.(.+)", module)
    if block and block[2] in DIFFUSERS_BLOCK_NAMES:
        return "diffusers", f"{block[1]}.{DIFFUSERS_BLOCK_NAMES[block[2]]}", FACTORS[suffix]
    if module in DIFFUSERS_NAMES:
        return "diffusers", DIFFUSERS_NAMES[module], FACTORS[suffix]
    return None


def plan_lora(path: str | Path, shapes: Mapping[str, tuple[int, ...] | None],
              model: Mapping[str, tuple[int, int]] | None = None) -> LoraPlan:
    """Check a LoRA file by its keys and their shapes (None for a value that is no tensor)
    against the model's linear layers (linear_shapes; None checks the file alone). Raises
    LoraFileError naming the file and, for each kind of problem, the first offending keys."""
    layouts, found, unknown = set(), {}, []
    for key, shape in shapes.items():
        parsed = parse_key(key) if shape is not None else None
        if parsed is None:
            unknown.append(key)
            continue
        layout, layer, factor = parsed
        layouts.add(layout)
        found.setdefault(layer, {})[factor] = key
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} keys of no LoRA layout for the Wan DiT's linear layers: {_listing(unknown)}")
    lacking = [keys.get("down") or keys.get("up") or keys["alpha"] for keys in found.values()
               if "down" not in keys or "up" not in keys]
    if lacking:
        problems.append(f"{len(lacking)} layers without both factors (down and up, or A and B): {_listing(lacking)}")
    layers = {layer: LayerKeys(keys["down"], keys["up"], keys.get("alpha"))
              for layer, keys in found.items() if "down" in keys and "up" in keys}
    if model is not None:
        absent = [keys.down for layer, keys in layers.items() if layer not in model]
        if absent:
            problems.append(f"{len(absent)} layers the model does not have: {_listing(absent)}")
    rank_mismatch, wrong_shapes, bad_alpha = [], [], []
    for layer, keys in layers.items():
        down, up = shapes[keys.down], shapes[keys.up]
        if len(down) != 2 or len(up) != 2 or down[0] != up[1]:
            rank_mismatch.append(f"{keys.down} {list(down)} with {keys.up} {list(up)}")
        elif model is not None and layer in model and (up[0], down[1]) != model[layer]:
            out_features, in_features = model[layer]
            wrong_shapes.append(f"{keys.down} {list(down)} and {keys.up} {list(up)} for a layer of "
                                f"{in_features} inputs and {out_features} outputs")
        if keys.alpha is not None and math.prod(shapes[keys.alpha]) != 1:
            bad_alpha.append(f"{keys.alpha} {list(shapes[keys.alpha])}")
    if rank_mismatch:
        problems.append(f"{len(rank_mismatch)} layers whose factors' ranks disagree (down is [rank, in], "
                        f"up [out, rank]): {_listing(rank_mismatch)}")
    if wrong_shapes:
        problems.append(f"{len(wrong_shapes)} layers of another shape than the model's (an adapter for another "
                        f"model?): {_listing(wrong_shapes)}")
    if bad_alpha:
        problems.append(f"{len(bad_alpha)} alphas that are not one number: {_listing(bad_alpha)}")
    if not layers and not problems:
        problems.append("it holds no LoRA factors")
    if problems:
        raise LoraFileError(path, problems)
    ranks = {layer: shapes[keys.down][0] for layer, keys in layers.items()}
    return LoraPlan("+".join(sorted(layouts)), layers, ranks)


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a .safetensors file, from its header alone (no tensor is read)."""
    try:
        with open(path, "rb") as file:
            length = struct.unpack("<Q", file.read(8))[0]
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(file.read(length))
        return {key: tuple(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}
    except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError) as error:
        raise LoraFileError(path, [f"not a safetensors file ({type(error).__name__}: {error})"]) from None


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f", ... (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")
