"""LoRA adapters the tests write for a model preset, in each published layout
(engine/models/lora_files.py describes them), and the hand-made reference they must match."""

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.config import get_preset
from engine.models.lora_files import DIFFUSERS_BLOCK_NAMES, DIFFUSERS_NAMES, linear_shapes

LAYOUTS = ("diffusers", "wan")
TO_DIFFUSERS = {wan: diffusers for diffusers, wan in {**DIFFUSERS_BLOCK_NAMES, **DIFFUSERS_NAMES}.items()}


def random_factors(preset: str = "tiny", *, rank: int = 4, alpha: float | None = 2.0, seed: int = 0,
                   magnitude: float = 0.3, config=None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """(down [rank, in], up [out, rank], alpha) for every linear layer of the preset's DiT (or of ``config``'s)."""
    generator = torch.Generator().manual_seed(seed)
    return {layer: (torch.randn(rank, inputs, generator=generator) * magnitude,
                    torch.randn(outputs, rank, generator=generator) * magnitude, alpha)
            for layer, (outputs, inputs) in linear_shapes(config or get_preset(preset)).items()}


def diffusers_name(layer: str) -> str:
    if layer in TO_DIFFUSERS:
        return TO_DIFFUSERS[layer]
    _, number, rest = layer.split(".", 2)  # blocks.N.self_attn.q
    return f"blocks.{number}.{TO_DIFFUSERS[rest]}"


def lora_state(factors, layout: str) -> dict[str, torch.Tensor]:
    """The keys a file of this layout holds: diffusers as PEFT names them (lora_A/lora_B; no
    alpha, which then is the rank), wan as ComfyUI does (lora_down/lora_up and alpha)."""
    state = {}
    for layer, (down, up, alpha) in factors.items():
        if layout == "diffusers":
            module = f"transformer.{diffusers_name(layer)}"
            state.update({f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up})
        else:
            module = f"diffusion_model.{layer}"
            state.update({f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up})
            if alpha is not None:
                state[f"{module}.alpha"] = torch.tensor(alpha)
    return state


def write_lora(path: Path, factors, layout: str = "wan") -> Path:
    """A LoRA file of these factors: safetensors, or a torch file for any other suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: tensor.contiguous() for key, tensor in lora_state(factors, layout).items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def merged(dit, adapters):
    """A copy of the DiT with each adapter's change merged into its weights by hand:
    W + scale * alpha / rank * up @ down on every adapted layer. adapters: (factors, scale, layout)."""
    reference = copy.deepcopy(dit)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for factors, scale, layout in adapters:
            for layer, (down, up, alpha) in factors.items():
                rank = down.shape[0]
                ratio = (alpha if layout == "wan" and alpha is not None else rank) / rank
                modules[layer].weight += scale * ratio * (up @ down)
    return reference
