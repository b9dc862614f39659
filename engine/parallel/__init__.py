"""Pipeline parallelism: the DiT's blocks split over torch.distributed ranks.

Launched with ``torchrun --nproc-per-node N -m engine run|serve ...`` (NCCL on GPUs,
gloo on CPUs). Rank 0 runs the one StreamPipeline (engine/pipeline.py) with a
:class:`StageExecutor`; the other ranks run their blocks for every forward.

- ``split``: where the blocks go (measured costs, the balancer);
- ``links``: messages between two ranks;
- ``stage``: rank 0's executor and the other ranks' loop;
- ``launch``: starting the ranks, each loading only its part.
"""

from .launch import BuiltModels, PublishedWeights, init_ranks, load_dit_part, model_source, rank_device, start_ranks
from .split import BlockBalancer, CostModel, balanced_split, median_run_seconds, neighbour_step
from .stage import LinkFailed, RemoteStage, StageExecutor

__all__ = ["BlockBalancer", "BuiltModels", "CostModel", "LinkFailed", "PublishedWeights", "RemoteStage",
           "StageExecutor", "balanced_split", "init_ranks", "load_dit_part", "median_run_seconds", "model_source",
           "neighbour_step", "rank_device", "start_ranks"]
