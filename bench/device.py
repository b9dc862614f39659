"""Where a bench runs: the GPU for a Wan preset where CUDA is there, else the CPU."""

from __future__ import annotations

import torch


def bench_device(preset: str):
    """(device, dtype, sync): bf16 on CUDA for the Wan presets, float32 on the CPU (always for tiny);
    sync waits for the device, so that a timing ends when its work does."""
    device = "cuda" if torch.cuda.is_available() and preset != "tiny" else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return device, dtype, sync
