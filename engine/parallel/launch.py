"""Starting the ranks: each rank loads only its part of the models, the split is measured
and chosen, and the links between neighbours are made.

Call :func:`start_ranks` on every rank (torch.distributed initialised, as torchrun
does). Rank 0 gets a :class:`StageExecutor` and the models a StreamPipeline needs
(its DiT part, the VAE, the text encoder, the decoder); every other rank gets a
:class:`RemoteStage` to ``serve()`` until rank 0 closes the ring.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import ModelConfig, get_preset
from ..models.dit import CausalWanDiT
from ..models.weights import Models
from ..pipeline import StreamSettings
from .links import Link
from .split import BlockBalancer, CostModel, balanced_split, measure_tick_costs
from .stage import RemoteStage, StageExecutor

# A rank waits on its neighbour for as long as the engine may sit idle between sessions;
# a rank that dies ends the wait at once (its connection closes), and torchrun stops the others.
IDLE_TIMEOUT = timedelta(days=7)


class BuiltModels:
    """Models built whole on every rank (the tiny preset, the same from its seed
    everywhere); each rank keeps its part and lets go of the rest."""

    def __init__(self, models: Models):
        self.models = models
        self.config: ModelConfig = models.dit.config
        param = next(models.dit.parameters())
        self.device, self.dtype = param.device, param.dtype

    def ends(self):
        """Rank 0's other models: (VAE, text encoder, decoder or None)."""
        return self.models.vae, self.models.text_encoder, self.models.decoder

    def dit_part(self, layers: range, *, embeddings: bool, head: bool) -> CausalWanDiT:
        dit = self.models.dit.keep_only(layers, embeddings=embeddings, head=head)
        self.models = None  # the stage holds what it runs; nothing else stays referenced here
        return dit


class PublishedWeights:
    """A Wan preset's published files; each rank reads only what its stage runs. ``choice``
    is build_models' (encoder, decoder, cache, taehv)."""

    def __init__(self, preset: str, folder=None, *, device: torch.device, dtype: torch.dtype, encoder: str = "wan",
                 decoder: str | None = None, cache: str = "default", taehv: bool = False):
        from ..models.weights import autoencoder_choice, locate_weights

        self.config = get_preset(preset, cache)
        self.choice = autoencoder_choice(encoder, decoder, taehv)
        self.files = locate_weights(preset, folder, taehv="taehv" in self.choice)
        self.device, self.dtype = device, dtype

    def ends(self):
        from ..config import SpeedOptions
        from ..models.taehv import load_taehv
        from ..models.text import UMT5TextEncoder
        from ..models.vae import load_vae
        from ..models.weights import ready_autoencoders

        wan = load_vae(self.files.vae) if "wan" in self.choice else None
        tiny_autoencoder = load_taehv(self.files.taehv) if "taehv" in self.choice else None
        encoder, decoder = ready_autoencoders(self.choice, wan, tiny_autoencoder, device=self.device,
                                              dtype=self.dtype, speed=SpeedOptions())
        return encoder, UMT5TextEncoder.load(self.files.text_encoder, device=self.device), decoder

    def dit_part(self, layers: range, *, embeddings: bool, head: bool) -> CausalWanDiT:
        return load_dit_part(self.files.dit, self.config, layers, embeddings=embeddings, head=head,
                             device=self.device, dtype=self.dtype)


def load_dit_part(path, config: ModelConfig, layers: range, *, embeddings: bool, head: bool,
                  device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> CausalWanDiT:
    """The part of a DiT checkpoint one stage runs, the rest never materialised
    (a ``.pt`` is memory-mapped, so only the part's tensors are read)."""
    from ..models.weights import load_strict, read_state_dict, unwrap_generator

    with torch.device("meta"):
        dit = CausalWanDiT(config).keep_only(layers, embeddings=embeddings, head=head)
    wanted = dit.state_dict().keys()
    state = {key: value for key, value in unwrap_generator(read_state_dict(path)).items() if key in wanted}
    load_strict(dit, state, what="DiT", path=path)
    return dit.to(device=device, dtype=dtype).eval()


def model_source(preset: str, *, weights=None, device: torch.device, dtype: torch.dtype, **choice):
    """Where this rank's models come from: built (tiny) or the published files. ``choice``:
    build_models' encoder, decoder, cache and taehv."""
    from ..models.weights import build_models

    if preset == "tiny":
        return BuiltModels(build_models("tiny", device=device, dtype=dtype, **choice))
    return PublishedWeights(preset, weights, device=device, dtype=dtype, **choice)


def rank_device(device: str | None) -> torch.device:
    """This rank's device: its own GPU (LOCAL_RANK) where CUDA is asked for or found, else the CPU."""
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not use_cuda:
        return torch.device("cpu")
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(local)
    return local


def init_ranks(device: torch.device) -> None:
    """Join the ranks torchrun started: NCCL between GPUs, gloo on CPUs."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=IDLE_TIMEOUT)


def start_ranks(source, settings: StreamSettings, *, split=None, balancer: BlockBalancer | None = None,
                max_in_flight: int = 2) -> tuple[StageExecutor | RemoteStage, Models | None]:
    """This rank's stage, and on rank 0 the models a StreamPipeline takes (call on every
    rank). Without ``split``, every rank measures its tick's costs at ``settings``' size
    and the split that makes the slowest stage fastest is chosen; each rank then loads
    only its blocks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    config = source.config
    if not 2 <= world <= config.num_layers:
        raise ValueError(f"pipeline parallelism needs 2 to {config.num_layers} ranks (one block each at least) "
                         f"for {config.name}; got {world}")
    # Headers (and the cost exchange) travel on the CPU: a gloo group beside NCCL.
    control = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    device = torch.device(source.device)
    vae, text_encoder, decoder = source.ends() if rank == 0 else (None, None, None)
    if split is None:
        costs = measure_tick_costs(config, settings, vae=vae, decoder=decoder or vae, device=device,
                                   dtype=source.dtype)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, costs, group=control)
        model = CostModel(blocks=(1.0,) * config.num_layers, role=tuple(c[0] for c in gathered),
                          speed=tuple(c[1] for c in gathered))
        split = balanced_split(config.num_layers, world, model)
    dit = source.dit_part(range(split[rank], split[rank + 1]), embeddings=rank == 0, head=rank == world - 1)
    peers = {rank - 1, rank + 1} | ({world - 1} if rank == 0 else {0} if rank == world - 1 else set())
    links = {peer: Link(peer, device=device, control_group=control, max_in_flight=max_in_flight)
             for peer in peers if 0 <= peer < world and peer != rank}
    if rank == 0:
        return StageExecutor(dit, split, world, links, balancer=balancer), Models(dit, vae, text_encoder, decoder)
    return RemoteStage(dit, split, rank, world, links), None
