"""LoRA adapters for the causal Wan DiT: read, mixed at their scales, and applied live.

A session names its adapters as [name or path, scale] pairs (the `loras` parameter);
LoraLibrary reads each file once (engine/models/lora_files.py: the published layouts, and
the checks that name a broken file's keys) and mixes a session's adapters into a LoraMix.

How they apply: unmerged. The base weights are never touched. Each linear layer of the DiT
gets a forward hook, installed when a mix is first used, that adds up @ (down @ x) to the
rows (batch elements) of each stream that has a mix; down stacks each adapter's down factor
times scale * alpha / rank, up stacks their up factors, so a layer costs two small matmuls
whatever the number of adapters. That is what lets sessions with different adapters still
share one forward (CausalWanDiT.forward_streams runs every session's rows through each
linear layer at once), a scale change costs only a new mix (no merge into the weights, and
nothing to undo: scale 0 or no adapter is the base model exactly), and no base copy is
kept. bench/lora.py measures it against merging the deltas into the weights; the README
has the numbers.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .lora_files import LORA_SUFFIX, LoraFileError, linear_shapes, plan_lora
from .weights import CorruptCheckpoint, read_state_dict

KEPT_ADAPTERS = 8  # files a library keeps read, the most recently used (a mix in use keeps its own alive)


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """One LoRA file, checked against the model: per adapted layer (Wan names) its down
    factor [rank, in], already times alpha / rank, and its up factor [out, rank]."""

    path: Path
    layout: str
    rank: str  # e.g. "rank 16", or "ranks 4-16"
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def read_lora(path: str | Path, model: Mapping[str, tuple[int, int]], *, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """A LoRA file (.safetensors, or a torch file of tensors) checked against the model's linear
    layers (lora_files.linear_shapes), its factors on device in dtype. Raises LoraFileError
    naming the file and the first offending keys."""
    path = Path(path)
    try:
        state = read_state_dict(path)
    except CorruptCheckpoint as error:  # its own advice is about the model's downloads
        raise LoraFileError(path, [f"not a safetensors or torch file of tensors: {error.reason}"]) from None
    except Exception as error:  # noqa: BLE001 - whatever the readers raise, the file is not one we can use
        cause = str(error).splitlines()[0][:200] if str(error) else ""
        raise LoraFileError(path, [f"not a safetensors or torch file of tensors ({type(error).__name__}: "
                                   f"{cause})"]) from None
    plan = plan_lora(path, {key: tuple(value.shape) if isinstance(value, torch.Tensor) else None
                            for key, value in state.items()}, model)
    layers = {}
    for layer, keys in plan.layers.items():
        down, up = state[keys.down].float(), state[keys.up].float()
        rank = down.shape[0]
        alpha = float(state[keys.alpha]) if keys.alpha is not None else rank
        layers[layer] = ((down * (alpha / rank)).to(device, dtype), up.to(device, dtype))
    return LoraAdapter(path, plan.layout, plan.rank_text(), layers)


class LoraMix:
    """Adapters at their scales, as one low-rank pair per adapted layer: a layer's input x
    gains up @ (down @ x), where down stacks each adapter's down times its scale and up stacks
    their ups. Adapters at scale 0 are left out; a mix of none adapts nothing."""

    def __init__(self, entries: Sequence[tuple[LoraAdapter, float]]):
        self.entries = tuple(entries)  # holds the adapters while the mix is in use
        parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for adapter, scale in self.entries:
            if scale == 0:
                continue
            for layer, (down, up) in adapter.layers.items():
                parts.setdefault(layer, []).append((down * scale, up))
        self.layers = {layer: (_stacked([down for down, _ in pairs], 0), _stacked([up for _, up in pairs], 1))
                       for layer, pairs in parts.items()}

    def tensors(self) -> list[torch.Tensor]:
        return [tensor for pair in self.layers.values() for tensor in pair]


def _stacked(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


class LoraLibrary:
    """The adapters a model's sessions name, as [name or path, scale] pairs. A name is a file in
    `folder` (NAME or NAME.safetensors); anything with a folder in it, or absolute, is a path
    (relative to the engine's working directory). Each file is read once, and again when it
    changes; KEPT_ADAPTERS stay read while no session uses them. Sessions whose adapters and
    scales agree share one mix. The IO thread and the worker both call it."""

    def __init__(self, folder: str | Path, config, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.folder = Path(folder).expanduser()
        self._shapes = linear_shapes(config)
        self._device, self._dtype = device, dtype
        self._adapters: OrderedDict[Path, tuple[tuple[int, int], LoraAdapter]] = OrderedDict()  # last used last
        self._mixes: weakref.WeakValueDictionary[tuple, LoraMix] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        """The file a name stands for."""
        given = Path(name).expanduser()
        if given.is_absolute() or given.parent != Path("."):
            return given
        exact = self.folder / name
        return exact if exact.is_file() or name.endswith(LORA_SUFFIX) else self.folder / (name + LORA_SUFFIX)

    def adapter(self, name: str) -> LoraAdapter:
        """The adapter a name stands for, read (or re-read, once its file changed) and checked.
        Raises LoraFileError naming the file and what is wrong with it."""
        path = self.path(name)
        try:
            status = path.stat()
        except OSError:
            raise LoraFileError(path, [f"no such file; put {Path(name).name} in the LoRA folder {self.folder} "
                                       "(serve --lora-dir), or give a path"]) from None
        stamp = (status.st_mtime_ns, status.st_size)
        with self._lock:
            kept = self._adapters.get(path)
            if kept is not None and kept[0] == stamp:
                self._adapters.move_to_end(path)
                return kept[1]
            adapter = read_lora(path, self._shapes, device=self._device, dtype=self._dtype)
            self._adapters[path] = (stamp, adapter)
            while len(self._adapters) > KEPT_ADAPTERS:
                self._adapters.popitem(last=False)
            return adapter

    def check(self, loras: Sequence[tuple[str, float]]) -> None:
        """Read and check every adapter of `loras`; raises LoraFileError for the first that cannot be used."""
        for name, _ in loras:
            self.adapter(name)

    def mix(self, loras: Sequence[tuple[str, float]]) -> LoraMix | None:
        """The mix of `loras` ([name or path, scale] pairs), None for none; shared with every
        session that asks for the same adapters at the same scales."""
        if not loras:
            return None
        entries = tuple((self.adapter(name), float(scale)) for name, scale in loras)
        with self._lock:
            mix = self._mixes.get(entries)
            if mix is None:
                mix = self._mixes[entries] = LoraMix(entries)
            return mix

    def nbytes(self) -> int:
        """Bytes of the adapters kept and of the mixes in use (each tensor counted once)."""
        with self._lock:
            tensors = [t for _, adapter in self._adapters.values() for pair in adapter.layers.values() for t in pair]
            tensors += [t for mix in list(self._mixes.values()) for t in mix.tensors()]
        return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())


class _LoraRouter:
    """The forward hooks on a DiT's linear layers that add each stream's mix to its rows."""

    def __init__(self, dit: nn.Module):
        self.routes: list[tuple[slice, LoraMix]] = []  # of the forward under way
        self.hook(dit)

    def hook(self, module: nn.Module, prefix: str = "") -> None:
        """Hook the linear layers of ``module``, named as in the DiT under ``prefix``."""
        for name, layer in module.named_modules(prefix=prefix):
            if isinstance(layer, nn.Linear):
                layer.register_forward_hook(partial(self._add_changes, name))

    def _add_changes(self, layer: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        for rows, mix in self.routes:
            factors = mix.layers.get(layer)
            if factors is not None:
                down, up = factors
                output[rows] += F.linear(F.linear(inputs[0][rows], down), up)
        return output


# A stream's adapters: one mix for all its rows, or one per row (a stream batch during a change of
# adapters, each slot's step as one process would run it), or None.
Adapters = LoraMix | tuple[LoraMix | None, ...] | None


def _mixes_by_row(rows: slice, adapters: Adapters) -> list[tuple[slice, LoraMix | None]]:
    """The mixes of a stream's ``rows`` of the batch: one for all, or one per row."""
    if not isinstance(adapters, tuple):
        return [(rows, adapters)]
    start = rows.start or 0
    return [(slice(start + row, start + row + 1), mix) for row, mix in enumerate(adapters)]


def context_rows(context: torch.Tensor, adapters: Adapters) -> torch.Tensor:
    """A text context [1 or rows, L, dim] with a row for each row's adapters where they differ
    (each row's text K/V are adapted by its own mix)."""
    if isinstance(adapters, tuple) and context.shape[0] == 1:
        return context.expand(len(adapters), -1, -1)
    return context


def block_gained(dit: nn.Module, index: int) -> None:
    """A block that came from another pipeline rank: adapters reach its layers too."""
    router = dit.__dict__.get("_lora_router")
    if router is not None:
        router.hook(dit.blocks[index], prefix=f"blocks.{index}")


@contextmanager
def lora_rows(dit: nn.Module, routes: Sequence[tuple[slice, Adapters]]) -> Iterator[None]:
    """Within the block, each stream's adapters adapt its rows (a slice of dim 0, the batch)
    of the outputs of the DiT's linear layers: one mix all of them, or a tuple one mix per
    row. Rows without a mix run the base model as it is."""
    routes = [(row_slice, mix) for rows, adapters in routes for row_slice, mix in _mixes_by_row(rows, adapters)
              if mix is not None and mix.layers]
    router = dit.__dict__.get("_lora_router")
    if router is None:
        if not routes:
            yield
            return
        router = dit._lora_router = _LoraRouter(dit)  # the hooks, installed on the first mix used
    previous, router.routes = router.routes, routes
    try:
        yield
    finally:
        router.routes = previous
