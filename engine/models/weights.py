"""Find and load checkpoints in their published layouts.

Layouts handled:
- a StreamDiffusionV2 ``model.pt``: the DiT state dict under ``generator``,
  ``generator_ema`` or ``state_dict`` (first present), or the raw dict, with an
  optional ``model.`` prefix on every key;
- Wan2.1 base weights: one ``.safetensors`` file, or a folder of shards with its
  ``*.safetensors.index.json``;
- raw ``.pth`` state dicts (the Wan VAE, TAEHV).

A checkpoint that does not fit the model fails with a :class:`CheckpointMismatch`
listing the missing and unexpected keys and the first shape conflicts; a file that is
empty, cut short or something else saved in its place (a broken download) fails with a
:class:`CorruptCheckpoint` before torch or safetensors read it.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

# Where a StreamDiffusionV2 training checkpoint keeps the generator weights, in
# the order the published loader looks for them.
GENERATOR_KEYS = ("generator", "generator_ema", "state_dict")
MAX_LISTED = 8
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6 is a zip archive
PICKLE_MAGIC = b"\x80"  # a pickle's first byte (protocol 2 and later): torch.save's legacy format
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit, in bytes


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


class CorruptCheckpoint(ValueError):
    """A checkpoint file that cannot be what its name says; the message says how to fetch it again."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        # In the Hugging Face cache the file is a link to a blob, which a new download would reuse.
        linked = f" and the file it links to, {path.resolve()}," if path.is_symlink() else ""
        super().__init__(
            f"{path} looks corrupt or truncated: {reason} ({path.stat().st_size} bytes). A broken download leaves "
            f"such a file. Delete it{linked} and fetch it again: `python -m engine download --model NAME` "
            f"({' or '.join(PUBLISHED)}) into the Hugging Face cache, or a new copy into your --weights folder")


def check_checkpoint(path: Path) -> None:
    """Raise CorruptCheckpoint for a file that cannot hold what its suffix says: empty, cut
    short (a zip without its directory, safetensors offsets past the end), or text saved in
    its place (an error page, a Git LFS pointer)."""
    size = path.stat().st_size
    if size == 0:
        raise CorruptCheckpoint(path, "it is empty")
    with open(path, "rb") as file:
        head = file.read(64)
    if all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head):
        first_line = head.decode("ascii").strip().split("\n")[0]
        raise CorruptCheckpoint(path, f"it holds text, not weights: {first_line!r}")
    if path.suffix == ".safetensors":
        problem = _safetensors_problem(path, size)
    else:
        problem = _torch_file_problem(path, head, size)
    if problem:
        raise CorruptCheckpoint(path, problem)


def _torch_file_problem(path: Path, head: bytes, size: int) -> str | None:
    if head.startswith(PICKLE_MAGIC):
        return None
    if not head.startswith(ZIP_MAGIC):
        return "it is neither a zip archive nor a pickle, as torch checkpoints are"
    try:
        with zipfile.ZipFile(path) as archive:  # reads only the directory at the end
            end = max((entry.header_offset + entry.compress_size for entry in archive.infolist()), default=0)
    except zipfile.BadZipFile:
        return "the zip directory at its end is missing or damaged, as when the file is cut short"
    if end > size:
        return f"its zip directory places data up to byte {end}, past its end"
    return None


def _safetensors_problem(path: Path, size: int) -> str | None:
    """A safetensors file: the header's length (8 bytes), the header (JSON: each tensor's
    data_offsets), then the tensors' bytes."""
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        if size < 8 or header_size > MAX_SAFETENSORS_HEADER:
            return "it does not begin with a safetensors header"
        if 8 + header_size > size:
            return f"its header is {header_size} bytes long, more than the file holds"
        try:
            header = json.loads(file.read(header_size))
            end = 8 + header_size + max((entry["data_offsets"][1] for name, entry in header.items()
                                         if name != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not a safetensors header"
    if end > size:
        return f"its header places tensors up to byte {end}, past its end"
    return None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file, a sharded safetensors
    folder, or a torch ``.pt``/``.pth`` file (loaded with ``weights_only``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_sharded_folder(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    check_checkpoint(path)
    try:
        # mmap needs the zip format; a legacy pickle is read whole
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except RuntimeError as error:  # damage the check cannot see: torch's zip reader or storage sizes
        raise CorruptCheckpoint(path, f"torch cannot read it ({str(error).splitlines()[0]})") from error
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, expected a state dict")
    return dict(loaded)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_checkpoint(path)
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise CorruptCheckpoint(path, f"safetensors cannot read it ({str(error).splitlines()[0]})") from error


def _read_sharded_folder(folder: Path) -> dict[str, torch.Tensor]:
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
        state.update(_read_safetensors(shard_path))
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


# -- finding and downloading the published weights --------------------------------

# Files of a Wan2.1 release folder that the engine reads (the base DiT weights are
# not needed when a StreamDiffusionV2 checkpoint is there, and are not downloaded).
WAN_VAE_FILE = "Wan2.1_VAE.pth"
WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = "google/umt5-xxl"
WAN_PATTERNS = ["config.json", WAN_VAE_FILE, WAN_T5_FILE, f"{WAN_TOKENIZER_DIR}/*"]
SDV2_REPO = "jerryfeng/StreamDiffusionV2"
TAEHV_REPO, TAEHV_FILE = "madebyollin/taehv", "taew2_1.pth"
PUBLISHED = {  # preset -> (Wan2.1 repository, StreamDiffusionV2 checkpoint in SDV2_REPO)
    "wan2.1-1.3b": ("Wan-AI/Wan2.1-T2V-1.3B", "wan_causal_dmd_v2v/model.pt"),
    "wan2.1-14b": ("Wan-AI/Wan2.1-T2V-14B", "wan_causal_dmd_v2v_14b/model.pt"),
}


class WeightsNotFound(FileNotFoundError):
    """The published weights are not where the engine looked; the message says what to do."""


class DownloadFailed(ConnectionError):
    """Fetching the published weights failed (the network, a proxy, the Hub); the message says what to do."""


@dataclass(frozen=True)
class WeightFiles:
    dit: Path  # model.pt, a .safetensors file or a Wan2.1 folder
    vae: Path
    text_encoder: Path  # folder with the umT5 checkpoint and google/umt5-xxl/
    taehv: Path | None = None


def locate_weights(preset: str, folder: str | Path | None = None, *, download: bool = False,
                   taehv: bool = False) -> WeightFiles:
    """Where the files of ``preset`` are: in ``folder`` when given (a Wan2.1 release
    folder, with StreamDiffusionV2's ``model.pt`` inside or beside it), else in the
    Hugging Face cache, fetched there first when ``download`` is set (with
    huggingface_hub's progress bars)."""
    if preset not in PUBLISHED:
        raise ValueError(f"preset {preset!r} has no published weights; choose one of {sorted(PUBLISHED)}")
    if folder is not None:
        return _files_in_folder(preset, Path(folder), taehv)
    wan_repo, sdv2_file = PUBLISHED[preset]
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:
        raise WeightsNotFound(f"huggingface_hub, which finds and fetches the published weights, is not installed: "
                              f"pip install 'streamdiffusion-bridge[wan]', or {_by_hand(preset)}") from None
    try:
        wan = Path(snapshot_download(wan_repo, allow_patterns=WAN_PATTERNS, local_files_only=not download))
        dit = Path(hf_hub_download(SDV2_REPO, sdv2_file, local_files_only=not download))
        tiny_decoder = Path(hf_hub_download(TAEHV_REPO, TAEHV_FILE, local_files_only=not download)) if taehv else None
    except Exception as error:  # offline, no cache, gated, refused: say what to do instead
        if download:
            raise DownloadFailed(_download_failed_message(preset, error)) from error
        raise WeightsNotFound(f"the {preset} weights are not in the Hugging Face cache ({_cause(error)}).\n"
                              + _placement(preset)) from error
    return WeightFiles(dit=dit, vae=wan / WAN_VAE_FILE, text_encoder=wan, taehv=tiny_decoder)


def _files_in_folder(preset: str, folder: Path, taehv: bool) -> WeightFiles:
    _, sdv2_file = PUBLISHED[preset]
    dit_candidates = [folder / "model.pt", folder / sdv2_file, folder.parent / sdv2_file]
    dit = next((p for p in dit_candidates if p.is_file()), None)
    if dit is None and list(folder.glob("diffusion_pytorch_model*.safetensors")):
        dit = folder  # the base Wan2.1 weights: they load, but are not distilled for streaming
    wanted = {"the DiT (StreamDiffusionV2 model.pt)": dit, "the VAE": folder / WAN_VAE_FILE,
              "the umT5 encoder": folder / WAN_T5_FILE, "the umT5 tokenizer": folder / WAN_TOKENIZER_DIR}
    tiny_decoder = next((p for p in (folder / TAEHV_FILE, folder.parent / TAEHV_FILE) if p.is_file()), None)
    if taehv:
        wanted["the TAEHV decoder"] = tiny_decoder
    missing = [f"{what}: {path if path else dit_candidates[0]}" for what, path in wanted.items()
               if path is None or not path.exists()]
    if missing:
        raise WeightsNotFound(f"{folder} lacks files of {preset}:\n  " + "\n  ".join(missing)
                              + "\n" + _placement(preset))
    return WeightFiles(dit=dit, vae=folder / WAN_VAE_FILE, text_encoder=folder, taehv=tiny_decoder)


def _placement(preset: str) -> str:
    return f"Fetch them with `python -m engine download --model {preset}`, or {_by_hand(preset)}"


def _by_hand(preset: str) -> str:
    wan_repo, sdv2_file = PUBLISHED[preset]
    return (f"place them by hand in one folder:\n"
            f"  {WAN_VAE_FILE}, {WAN_T5_FILE}, {WAN_TOKENIZER_DIR}/ (from {wan_repo})\n"
            f"  model.pt (from {SDV2_REPO}: {sdv2_file})\n"
            f"  {TAEHV_FILE} (from {TAEHV_REPO}, only for the TAEHV decoder)\n"
            f"and pass that folder with --weights DIR.")


def _download_failed_message(preset: str, error: Exception) -> str:
    from huggingface_hub import constants

    return (f"could not download the {preset} weights from {constants.ENDPOINT} ({_cause(error)}).\n"
            "Check that this machine reaches it: behind a proxy set HTTPS_PROXY, for a mirror set HF_ENDPOINT; "
            f"then run `python -m engine download --model {preset}` again, which keeps what it fetched already.\n"
            f"Or fetch the files on a machine that reaches it and {_by_hand(preset)}")


def _cause(error: Exception) -> str:
    """The first line of what went wrong underneath: huggingface_hub wraps a refused
    connection in an error about the cache."""
    root = error.__cause__ or error
    return f"{type(root).__name__}: {root}".splitlines()[0]


def download_weights(preset: str, *, taehv: bool = True) -> WeightFiles:
    """Fetch the published files of ``preset`` into the Hugging Face cache."""
    return locate_weights(preset, download=True, taehv=taehv)


# -- ready-to-stream models -----------------------------------------------------------

AUTOENCODERS = ("wan", "taehv")  # the choices for encoding and for decoding


@dataclass
class Models:
    dit: nn.Module
    vae: nn.Module  # the encoder: the Wan VAE, or TAEHV (``encoder="taehv"``); it also decodes unless ``decoder``
    text_encoder: object
    decoder: nn.Module | None = None  # the decoder when it is not ``vae`` (e.g. TAEHV after a Wan encode)
    autoencoders: tuple[str, str] = ("wan", "wan")  # (encoder, decoder) as chosen
    executor: object | None = None  # where the DiT runs when not here alone: its blocks over ranks (engine/parallel/)

    @property
    def runs_dit(self):
        """What a StreamPipeline takes to run the DiT: the executor, or the DiT itself."""
        return self.executor or self.dit


def autoencoder_choice(encoder: str = "wan", decoder: str | None = None, taehv: bool = False) -> tuple[str, str]:
    """(encoder, decoder), checked. ``taehv=True`` is the older spelling of ``decoder="taehv"``."""
    if decoder is None:
        decoder = "taehv" if taehv else "wan"
    elif taehv and decoder != "taehv":
        raise ValueError(f"taehv=True asks for the TAEHV decoder, but decoder={decoder!r}; pass one of them")
    for name, value in (("encoder", encoder), ("decoder", decoder)):
        if value not in AUTOENCODERS:
            raise ValueError(f"{name} must be one of {AUTOENCODERS}, got {value!r}")
    return encoder, decoder


def build_models(preset: str, *, weights: str | Path | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, taehv: bool = False, encoder: str = "wan",
                 decoder: str | None = None, cache: str = "default", speed=None, compile_backend: str | None = None,
                 seed: int = 0) -> Models:
    """The DiT, encoder, text encoder (and decoder, when not the encoder) of a preset.

    ``encoder`` and ``decoder`` choose the autoencoder each way: ``"wan"`` (the Wan2.1
    VAE) or ``"taehv"`` (the tiny TAEHV, taew2_1): Wan both ways (the default), Wan
    encode with TAEHV decode (StreamDiffusionV2's fast mode; ``taehv=True`` says the
    same), or TAEHV both ways. ``cache`` is a cache preset of engine/config.py
    (``"default"`` or ``"fast"``); ``speed`` an :class:`~engine.config.SpeedOptions`.
    ``compile_backend``: torch.compile the DiT's blocks with this backend (``"inductor"``;
    see :meth:`~.dit.CausalWanDiT.set_compiled`); None runs them eagerly.

    ``tiny`` has no published weights: it is built from ``seed`` (the same models on
    every machine), for tests and the CPU demo. The Wan presets load from
    ``weights`` (a folder, see :func:`locate_weights`) or the Hugging Face cache."""
    from ..config import SpeedOptions, get_preset
    from .dit import CausalWanDiT
    from .taehv import TINY_TAEHV, TAEHV, load_taehv
    from .text import TinyTextEncoder, UMT5TextEncoder
    from .vae import TINY_VAE, WanVAE, load_vae

    choice = autoencoder_choice(encoder, decoder, taehv)
    speed = speed if speed is not None else SpeedOptions()
    config = get_preset(preset, cache)
    tiny_autoencoder = None
    if preset == "tiny":
        torch.manual_seed(seed)
        dit, wan = CausalWanDiT(config), WanVAE(TINY_VAE)  # built in this order whatever the choice: same weights
        tiny_autoencoder = TAEHV(TINY_TAEHV) if "taehv" in choice else None
        text = TinyTextEncoder(config.text_len, config.text_dim, seed=seed, device=device)
    else:
        files = locate_weights(preset, weights, taehv="taehv" in choice)
        if files.dit.is_dir():
            print(f"note: {files.dit} holds the base Wan2.1 DiT, not the StreamDiffusionV2 one; "
                  "streaming quality needs model.pt", flush=True)
        dit = load_dit(files.dit, config)
        wan = load_vae(files.vae) if "wan" in choice else None
        tiny_autoencoder = load_taehv(files.taehv) if "taehv" in choice else None
        text = UMT5TextEncoder.load(files.text_encoder, device=device)
    dit = dit.to(device, dtype).eval()
    dit.set_compiled(compile_backend)
    encoding, decoding = ready_autoencoders(choice, wan, tiny_autoencoder, device=device, dtype=dtype, speed=speed)
    return Models(dit, encoding, text, decoding, choice)


def ready_autoencoders(choice: tuple[str, str], wan, tiny_autoencoder, *, device, dtype, speed) -> tuple:
    """(encoder, decoder or None when the encoder decodes too) of ``choice``, on the device
    with the speed options applied."""
    modules = {"wan": wan, "taehv": tiny_autoencoder}
    for name in set(choice):
        modules[name] = modules[name].to(device, dtype).eval()
    if modules["wan"] is not None and speed.vae_channels_last:
        modules["wan"].set_channels_last(True)
    speed.apply_globals(device)
    encoding, decoding = modules[choice[0]], modules[choice[1]]
    return encoding, (decoding if decoding is not encoding else None)
