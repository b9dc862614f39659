"""`python -m faulty_engine serve ...` (with tests/ on PYTHONPATH): the engine's command line,
with one fault injected. Every step of a session prompted $ENGINE_FAULT_OOM_PROMPT raises
torch.cuda.OutOfMemoryError, as if the device ran out of memory mid-stream; other sessions
step as usual. Tests start it through ServedEngine(..., module="faulty_engine")."""

import os
import sys

import torch

from engine import cli
from engine.pipeline import StreamPipeline

OOM_PROMPT_ENV = "ENGINE_FAULT_OOM_PROMPT"


def run_out_of_memory_for(prompt: str) -> None:
    """Patch StreamPipeline in this process: sessions with this prompt fail every step."""
    chunk_steps = StreamPipeline.chunk_steps

    def chunk_steps_or_run_out_of_memory(pipeline, frames):
        if pipeline.settings.prompt == prompt:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected by {OOM_PROMPT_ENV})")
        return (yield from chunk_steps(pipeline, frames))

    StreamPipeline.chunk_steps = chunk_steps_or_run_out_of_memory


if __name__ == "__main__":
    run_out_of_memory_for(os.environ[OOM_PROMPT_ENV])
    print(f"fault injection: steps of sessions prompted {os.environ[OOM_PROMPT_ENV]!r} will run out of memory",
          file=sys.stderr, flush=True)
    cli.main()
