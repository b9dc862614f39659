"""Text encoders, a prompt cache and prompt blending.

Every encoder turns a list of prompts into ``[B, text_len, text_dim]`` embeddings
whose rows past each prompt's token count are zero, as the DiT's cross-attention
expects (it attends to all ``text_len`` rows, unmasked).

- :class:`UMT5TextEncoder`: the umT5-XXL encoder Wan2.1 conditions on, run through
  transformers. It loads from a transformers folder or from the Wan release layout.
- :class:`TinyTextEncoder`: a small deterministic stand-in for the tiny preset,
  tests and the CPU demo; it needs no download.

umT5-XXL holds about 11 GB of GPU memory in bf16, so an encoder can
:meth:`~TextEncoder.offload` its weights to the CPU between prompt changes; the
next :meth:`~TextEncoder.encode` moves them back.
"""

from __future__ import annotations

import html
import math
import re
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from engine.models.weights import CheckpointMismatch, load_strict, read_state_dict

# transformers is imported where umT5 is used: the tiny encoder needs torch only.
if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, UMT5Config

# The Wan2.1 release keeps the text encoder beside the DiT weights like this.
WAN_T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_T5_TOKENIZER = "google/umt5-xxl"


def _check_prompts(prompts: list[str]) -> None:
    if (not isinstance(prompts, (list, tuple)) or not prompts
            or not all(isinstance(p, str) for p in prompts)):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")


class TextEncoder(ABC):
    """Prompts in, zero-padded embeddings out, on ``device``.

    Subclasses provide the model (``self.model``) and :meth:`_embed`.
    """

    def __init__(self, model: nn.Module, *, text_len: int, text_dim: int,
                 device: str | torch.device = "cpu"):
        if text_len < 1 or text_dim < 1:
            raise ValueError(f"text_len and text_dim must be positive, got {text_len} and {text_dim}")
        self.text_len = text_len
        self.text_dim = text_dim
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.offloaded = False

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``[len(prompts), text_len, text_dim]`` on ``device``, zero past each prompt's length."""
        _check_prompts(prompts)
        if self.offloaded:
            self.model.to(self.device)
            self.offloaded = False
        with torch.no_grad():
            hidden, lengths = self._embed(list(prompts))
        past_length = torch.arange(self.text_len, device=hidden.device) >= lengths.to(hidden.device)[:, None]
        return hidden.masked_fill(past_length[..., None], 0)

    def offload(self) -> None:
        """Move the weights to the CPU until the next :meth:`encode`."""
        self.model.to("cpu")
        self.offloaded = True

    @abstractmethod
    def _embed(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [B, text_len, text_dim], token counts [B])`` for the prompts."""


# --------------------------------------------------------------------------- tiny


class _ByteEmbedder(nn.Module):
    """UTF-8 bytes -> token and position embeddings -> one linear layer with tanh."""

    PAD, EOS, FIRST_BYTE = 0, 1, 2  # byte b has token id b + FIRST_BYTE

    def __init__(self, text_len: int, text_dim: int, seed: int):
        super().__init__()
        self.token_embedding = nn.Embedding(256 + self.FIRST_BYTE, text_dim)
        self.position_embedding = nn.Parameter(torch.empty(text_len, text_dim))
        self.proj = nn.Linear(text_dim, text_dim)
        # Seeded from its own generator: the same seed always gives the same
        # encoder, and building one leaves torch's global random state alone.
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(text_dim))
            self.token_embedding.weight.mul_(math.sqrt(text_dim))  # unit-scale token vectors

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(self.token_embedding(ids) + self.position_embedding))


class TinyTextEncoder(TextEncoder):
    """A small deterministic encoder with the real encoder's interface.

    Tokens are the prompt's UTF-8 bytes plus an end token, truncated to text_len.
    """

    def __init__(self, text_len: int, text_dim: int, seed: int = 0, device: str | torch.device = "cpu"):
        super().__init__(_ByteEmbedder(text_len, text_dim, seed),
                         text_len=text_len, text_dim=text_dim, device=device)

    def _embed(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(prompts), self.text_len), _ByteEmbedder.PAD, dtype=torch.long)
        lengths = []
        for row, prompt in enumerate(prompts):
            tokens = [b + _ByteEmbedder.FIRST_BYTE for b in prompt.encode("utf-8")][:self.text_len - 1]
            tokens.append(_ByteEmbedder.EOS)
            ids[row, :len(tokens)] = torch.tensor(tokens)
            lengths.append(len(tokens))
        return self.model(ids.to(self.device)), torch.tensor(lengths)


# --------------------------------------------------------------------------- umT5


def umt5_xxl_config() -> UMT5Config:
    """transformers' UMT5Config for umT5-XXL as Wan2.1 uses it (encoder only).

    vocab 256384, d_model 4096, d_ff 10240, 64 heads of 64, 24 layers, 32 relative
    buckets with a bias table in every layer, gated-GELU (tanh) feed-forward.
    """
    from transformers import UMT5Config
    return UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_heads=64,
                      num_layers=24, relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                      layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False)


def wan_t5_key_map(num_layers: int) -> dict[str, str]:
    """Wan's T5 encoder state-dict names -> transformers' ``UMT5EncoderModel`` names.

    Wan's names come from ``wan/modules/t5.py`` (``T5Encoder``, built by
    ``umt5_xxl(encoder_only=True)`` with ``shared_pos=False``). Its feed-forward is
    ``fc2(fc1(x) * gelu(gate(x)))``, transformers' is ``wo(gelu(wi_0(x)) * wi_1(x))``,
    so ``gate.0`` is ``wi_0`` and ``fc1`` is ``wi_1``.
    """
    names = {"token_embedding.weight": "shared.weight",
             "norm.weight": "encoder.final_layer_norm.weight"}
    for n in range(num_layers):
        wan, hf = f"blocks.{n}.", f"encoder.block.{n}.layer."
        names.update({
            wan + "norm1.weight": hf + "0.layer_norm.weight",
            wan + "attn.q.weight": hf + "0.SelfAttention.q.weight",
            wan + "attn.k.weight": hf + "0.SelfAttention.k.weight",
            wan + "attn.v.weight": hf + "0.SelfAttention.v.weight",
            wan + "attn.o.weight": hf + "0.SelfAttention.o.weight",
            wan + "pos_embedding.embedding.weight": hf + "0.SelfAttention.relative_attention_bias.weight",
            wan + "norm2.weight": hf + "1.layer_norm.weight",
            wan + "ffn.gate.0.weight": hf + "1.DenseReluDense.wi_0.weight",
            wan + "ffn.fc1.weight": hf + "1.DenseReluDense.wi_1.weight",
            wan + "ffn.fc2.weight": hf + "1.DenseReluDense.wo.weight",
        })
    return names


# transformers ties the encoder's input embedding to ``shared``; both names are in
# its state dict and both take Wan's token_embedding.
_TIED_EMBEDDING = "encoder.embed_tokens.weight"


def load_wan_t5(path: str | Path, config: UMT5Config | None = None) -> nn.Module:
    """A ``UMT5EncoderModel`` from Wan's ``models_t5_umt5-xxl-enc-bf16.pth``, strictly.

    ``config`` (a UMT5Config) defaults to :func:`umt5_xxl_config`. Weights keep the
    checkpoint's dtype. A checkpoint that does not fit raises
    :class:`CheckpointMismatch` naming keys as Wan spells them.
    """
    from transformers import UMT5EncoderModel
    config = config or umt5_xxl_config()
    names = wan_t5_key_map(config.num_layers)
    state = {names.get(key, key): tensor for key, tensor in read_state_dict(path).items()}
    if "shared.weight" in state:
        state[_TIED_EMBEDDING] = state["shared.weight"]
    with torch.device("meta"):  # no 22 GB of throwaway float32 initialisation
        model = UMT5EncoderModel(config)
    try:
        load_strict(model, state, what="umT5 text encoder (Wan layout)", path=path)
    except CheckpointMismatch as err:
        raise _in_wan_names(err, names, path) from None
    model.tie_weights()  # loading assigned two tensors; keep one embedding table, not two copies
    return model


def _in_wan_names(err: CheckpointMismatch, names: dict[str, str], path: str | Path) -> CheckpointMismatch:
    wan_name = {hf: wan for wan, hf in names.items()}
    wan_name[_TIED_EMBEDDING] = "token_embedding.weight"
    missing = list(dict.fromkeys(wan_name.get(k, k) for k in err.missing))
    conflicts = list({wan_name.get(k, k): (wan_name.get(k, k), want, got)
                      for k, want, got in err.shape_conflicts}.values())
    return CheckpointMismatch("umT5 text encoder (Wan layout)", str(path), missing, err.unexpected, conflicts)


def load_transformers_t5(folder: str | Path, dtype: torch.dtype) -> nn.Module:
    """A ``UMT5EncoderModel`` from a transformers folder (config.json + weights), strictly.

    A full encoder-decoder umT5 folder is accepted: the encoder ignores ``decoder.*``.
    """
    from transformers import UMT5EncoderModel
    model, info = UMT5EncoderModel.from_pretrained(
        str(folder), dtype=dtype, output_loading_info=True,
        ignore_mismatched_sizes=True)  # report shape conflicts below instead of a bare RuntimeError
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith("decoder."))
    conflicts = [(key, tuple(model_shape), tuple(checkpoint_shape))
                 for key, checkpoint_shape, model_shape in sorted(info["mismatched_keys"])]
    if info["missing_keys"] or unexpected or conflicts:
        raise CheckpointMismatch("umT5 text encoder", str(folder), sorted(info["missing_keys"]),
                                 unexpected, conflicts)
    return model


def clean_prompt(prompt: str) -> str:
    """Wan's ``clean='whitespace'``: undo HTML escapes, collapse whitespace.

    Wan also runs ftfy first (repairs mojibake, straightens curly quotes); that is
    left out to spare the dependency, so such prompts may tokenize slightly
    differently than in Wan.
    """
    return re.sub(r"\s+", " ", html.unescape(html.unescape(prompt))).strip()


class UMT5TextEncoder(TextEncoder):
    """The umT5 encoder through transformers: 512 tokens, padded to the full length."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, text_len: int = 512,
                 device: str | torch.device = "cpu"):
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
                             f"{model.config.vocab_size}: they do not belong together")
        super().__init__(model, text_len=text_len, text_dim=model.config.d_model, device=device)
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, folder: str | Path, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.bfloat16, text_len: int = 512,
             wan_config: UMT5Config | None = None) -> UMT5TextEncoder:
        """Load from either layout:

        - Wan release: ``folder/models_t5_umt5-xxl-enc-bf16.pth`` with the tokenizer
          in ``folder/google/umt5-xxl/`` (e.g. ``wan_models/Wan2.1-T2V-1.3B``);
          ``wan_config`` (a UMT5Config) defaults to umT5-XXL;
        - transformers: ``folder/config.json``, the weights and the tokenizer files.
        """
        from transformers import AutoTokenizer
        folder = Path(folder)
        if (folder / WAN_T5_CHECKPOINT).is_file():
            model = load_wan_t5(folder / WAN_T5_CHECKPOINT, wan_config).to(dtype)
            tokenizer_folder = folder / WAN_T5_TOKENIZER
        elif (folder / "config.json").is_file():
            model = load_transformers_t5(folder, dtype)
            tokenizer_folder = folder
        else:
            raise FileNotFoundError(
                f"no umT5 text encoder in {folder}: expected {WAN_T5_CHECKPOINT} and {WAN_T5_TOKENIZER}/ "
                "(the Wan2.1 release, e.g. Wan-AI/Wan2.1-T2V-1.3B) or a transformers folder with config.json")
        if not tokenizer_folder.is_dir():
            raise FileNotFoundError(f"umT5 tokenizer folder {tokenizer_folder} is missing")
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
        return cls(model, tokenizer, text_len=text_len, device=device)

    def _embed(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length",
                                max_length=self.text_len, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        mask = tokens["attention_mask"].to(self.device)
        hidden = self.model(input_ids=tokens["input_ids"].to(self.device), attention_mask=mask)
        return hidden.last_hidden_state, mask.sum(dim=1)


# --------------------------------------------------------------------------- cache


class PromptCache:
    """An encoder in front of a bounded LRU cache of prompt -> embedding.

    :meth:`encode` has the encoder's interface; only prompts not yet cached are
    encoded, in one batch. Entries live on the encoder's device.
    """

    def __init__(self, encoder: TextEncoder, capacity: int = 16):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.encoder = encoder
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._entries

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``[len(prompts), text_len, text_dim]``, as :meth:`TextEncoder.encode`."""
        _check_prompts(prompts)
        new = list(dict.fromkeys(p for p in prompts if p not in self._entries))
        self.hits += len(prompts) - len(new)
        self.misses += len(new)
        # Each row is copied out of the batch, so evicting it frees its memory.
        found = {p: row.clone() for p, row in zip(new, self.encoder.encode(new))} if new else {}
        for prompt in prompts:
            if prompt in self._entries:
                self._entries.move_to_end(prompt)
                found[prompt] = self._entries[prompt]
            else:
                self._entries[prompt] = found[prompt]
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return torch.stack([found[p] for p in prompts])

    def clear(self) -> None:
        self._entries.clear()


# --------------------------------------------------------------------------- blending


def blend_embeddings(embeddings: Sequence[torch.Tensor], weights: Sequence[float],
                     method: str = "linear") -> torch.Tensor:
    """Mix prompt embeddings of one shape by weight (weights are normalised to sum 1).

    ``linear``: the weighted sum. ``slerp``: for two embeddings, each token vector
    turns along the great circle from the first to the second while its length
    moves linearly; rows where a vector is zero (padding) or the two are
    (anti)parallel fall back to linear. Computed in float32, returned in the
    inputs' dtype.
    """
    if method not in ("linear", "slerp"):
        raise ValueError(f"method must be 'linear' or 'slerp', got {method!r}")
    if not embeddings:
        raise ValueError("embeddings must hold at least one tensor")
    shape = embeddings[0].shape
    if any(e.shape != shape for e in embeddings):
        raise ValueError(f"embeddings must share one shape, got {[list(e.shape) for e in embeddings]}")
    if len(weights) != len(embeddings):
        raise ValueError(f"weights has {len(weights)} entries for {len(embeddings)} embeddings")
    weight = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    if not torch.isfinite(weight).all() or (weight < 0).any() or weight.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {list(weights)}")
    weight = weight / weight.sum()
    if method == "slerp" and len(embeddings) > 2:
        raise ValueError(f"method 'slerp' blends two embeddings, got {len(embeddings)}; use 'linear'")

    vectors = [e.to(torch.float32) for e in embeddings]
    if method == "slerp" and len(vectors) == 2:
        blended = _slerp(vectors[0], vectors[1], float(weight[1]))
    else:
        blended = sum(float(w) * v for w, v in zip(weight, vectors))
    return blended.to(embeddings[0].dtype)


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    a_len = a.norm(dim=-1, keepdim=True)
    b_len = b.norm(dim=-1, keepdim=True)
    a_dir = a / a_len.clamp_min(1e-12)
    b_dir = b / b_len.clamp_min(1e-12)
    angle = (a_dir * b_dir).sum(dim=-1, keepdim=True).clamp(-1, 1).acos()
    sin_angle = angle.sin()
    degenerate = (sin_angle < 1e-4) | (a_len < 1e-8) | (b_len < 1e-8)
    sin_angle = torch.where(degenerate, torch.ones_like(sin_angle), sin_angle)  # avoid 0/0
    direction = (((1 - t) * angle).sin() * a_dir + (t * angle).sin() * b_dir) / sin_angle
    spherical = ((1 - t) * a_len + t * b_len) * direction
    return torch.where(degenerate, (1 - t) * a + t * b, spherical)
