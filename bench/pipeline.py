"""Frames per second, time to first frame and where a chunk's time goes, per setting.

    python bench/pipeline.py                       # tiny preset on CPU (+ wan2.1-1.3b when CUDA is there)
    python bench/pipeline.py --gpu-only --chunks 12 --steps 1,2 --sizes 512x512
    python bench/pipeline.py --options all         # every option alone and all together, against eager

Each row is measured in two separate passes over a fresh stream of a warm process:

1. uninstrumented: time to first frame (the first push, 5 frames in, to its frames
   out) and frames per second over the steady chunks (after the stream batch has
   filled), with the clock read, and the device waited on, only at the ends;
2. instrumented: each steady chunk broken down into encode, DiT (the pipeline's
   executor ``submit``: every forward, whatever runs it), decode and the rest.
   On CUDA with CUDA events (no waits added inside a chunk), host-device waits per
   chunk counted with ``torch.cuda.set_sync_debug_mode`` and GPU kernels per chunk
   with ``torch.profiler``; on the CPU with the host clock.

"eager" is the baseline every other row's FPS is divided by ("x eager"); each
option row changes one thing (``--options`` picks them; "all" adds a row with
every exact option on). The Wan runs use random weights (speed does not depend on
them) and the tiny text encoder in place of umT5 (the prompt is encoded once,
outside the loop). Beside each 1.3B row: the published 1-GPU H100 figure and our
ratio to it (compare only rows measured on the same card).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cli import parse_size
from engine.config import SpeedOptions, get_preset  # noqa: E402
from engine.executor import LocalExecutor  # noqa: E402
from engine.models.dit import CausalWanDiT  # noqa: E402
from engine.models.taehv import TAEW2_1, TINY_TAEHV, TAEHV  # noqa: E402
from engine.models.text import TinyTextEncoder  # noqa: E402
from engine.models.vae import TINY_VAE, WAN21_VAE, WanVAE  # noqa: E402
from engine.pipeline import StreamPipeline, StreamSettings  # noqa: E402

PUBLISHED_FPS = {(512, 512): (26.21, 24.02, 21.51, 19.43), (480, 832): (20.47, 17.97, 15.68, 13.95)}


@dataclass(frozen=True)
class Setting:
    """One row's options: the autoencoders, the cache preset, the exact speed options."""

    name: str
    encoder: str = "wan"
    decoder: str = "wan"
    cache: str = "default"
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    cuda_graphs: bool = False  # the executor's static steps (engine/static_step.py), graphs on a GPU
    compile: bool = False  # the DiT's blocks compiled by torch.compile (inductor), as --compile does

    def describe(self) -> str:
        on = ([k for k, v in vars(self.speed).items() if v] + (["cuda_graphs"] if self.cuda_graphs else [])
              + (["compile"] if self.compile else []))
        return (f"encoder={self.encoder} decoder={self.decoder} cache={self.cache} "
                f"speed={','.join(on) or 'none'}")


EAGER = Setting("eager")
OPTIONS = {  # name -> the setting that changes one thing against eager
    "taehv-decode": Setting("taehv-decode", decoder="taehv"),  # the published fast mode's decoder
    "taehv-both": Setting("taehv-both", encoder="taehv", decoder="taehv"),
    "fast-cache": Setting("fast-cache", cache="fast"),
    "vae-channels-last": Setting("vae-channels-last", speed=SpeedOptions(vae_channels_last=True)),
    "cudnn-benchmark": Setting("cudnn-benchmark", speed=SpeedOptions(cudnn_benchmark=True)),
    "cuda-graphs": Setting("cuda-graphs", cuda_graphs=True),  # on the CPU: the same static steps, eager
    "compile": Setting("compile", compile=True),  # its compiling is in the warm-up stream, not in the row's times
}
# Options that leave the frames the same (up to rounding): "all" turns these on together.
EXACT = ("vae-channels-last", "cudnn-benchmark", "cuda-graphs", "compile")
NOT_IMPLEMENTED = ("torch.compile of the VAE and TAEHV", "decode on a second stream", "FlashAttention-3",
                   "FP8 linears")


class Models:
    """The models of a preset, built once (random weights) and shared by every row."""

    def __init__(self, preset: str, device: str, dtype: torch.dtype):
        self.config = get_preset(preset)
        torch.manual_seed(0)
        with torch.device(device):
            self.dit = CausalWanDiT(self.config).to(dtype).eval()
            self.wan = WanVAE(TINY_VAE if preset == "tiny" else WAN21_VAE).to(dtype).eval()
            self.taehv = TAEHV(TINY_TAEHV if preset == "tiny" else TAEW2_1).to(dtype).eval()
        self.text = TinyTextEncoder(self.config.text_len, self.config.text_dim, device=device)
        self.preset, self.device = preset, device

    @contextmanager
    def configured(self, setting: Setting):
        """The DiT with the setting's cache preset and compiled blocks, and the VAE in its memory
        layout, for one row."""
        cudnn = torch.backends.cudnn.benchmark
        self.dit.config = get_preset(self.preset, setting.cache)  # the cache is made from the config
        self.dit.set_compiled("inductor" if setting.compile else None)
        self.wan.set_channels_last(setting.speed.vae_channels_last)
        setting.speed.apply_globals(self.device)
        try:
            yield {"wan": self.wan, "taehv": self.taehv}
        finally:
            self.dit.config = self.config
            self.dit.set_compiled(None)
            self.wan.set_channels_last(False)
            torch.backends.cudnn.benchmark = cudnn

    def pipeline(self, setting: Setting, height: int, width: int, steps: int) -> StreamPipeline:
        autoencoders = {"wan": self.wan, "taehv": self.taehv}
        encoder, decoder = autoencoders[setting.encoder], autoencoders[setting.decoder]
        return StreamPipeline(LocalExecutor(self.dit, cuda_graphs=setting.cuda_graphs), encoder, self.text,
                              StreamSettings(height=height, width=width, steps=steps, prompt="x"),
                              decoder=decoder if decoder is not encoder else None)


class Clock:
    """Times spans: CUDA events on a GPU (read after the chunk, no waits added), else the host clock."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.spans: dict[str, list] = {}

    def wrap(self, owner, name: str, label: str) -> None:
        """Time every call of ``owner.name`` (an instance attribute shadows the method)."""
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                result = inner(*args, **kwargs)
                end.record()
                self.spans.setdefault(label, []).append((start, end))
            else:
                start = time.perf_counter()
                result = inner(*args, **kwargs)
                self.spans.setdefault(label, []).append(time.perf_counter() - start)
            return result

        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        """Milliseconds per label since the last take (the device must have finished them)."""
        totals = {}
        for label, spans in self.spans.items():
            if self.cuda:
                totals[label] = sum(start.elapsed_time(end) for start, end in spans)
            else:
                totals[label] = sum(spans) * 1e3
        self.spans.clear()
        return totals


def frames_for(chunks: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (5 + 4 * chunks, height, width, 3), dtype=np.uint8)


def chunk(frames: np.ndarray, i: int) -> np.ndarray:
    """Push i's frames: 5 for the first, 4 after."""
    return frames[:5] if i == 0 else frames[1 + 4 * i: 5 + 4 * i]


@torch.no_grad()
def measure(models: Models, setting: Setting, height: int, width: int, steps: int, chunks: int) -> dict:
    device = models.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    frames = frames_for(chunks, height, width)
    warm = steps + 1  # chunks before the stream batch gives a frame every push (and one more)
    with models.configured(setting):
        # A warm-up stream: first-call costs (allocator, cuDNN plans, kernels' first launch) stay out.
        pipe = models.pipeline(setting, height, width, steps)
        for i in range(warm + 1):
            pipe.push(chunk(frames, i))

        # 1. uninstrumented: time to first frame, and FPS over the steady chunks
        pipe = models.pipeline(setting, height, width, steps)
        sync()
        start = time.perf_counter()
        first = pipe.push(chunk(frames, 0))
        sync()
        ttff = time.perf_counter() - start
        assert len(first) == 5
        for i in range(1, warm):
            pipe.push(chunk(frames, i))
        sync()
        start, produced = time.perf_counter(), 0
        for i in range(warm, chunks + 1):
            produced += len(pipe.push(chunk(frames, i)))
        sync()
        fps = produced / (time.perf_counter() - start)

        # 2. instrumented: a chunk broken down, waits and kernels counted
        pipe = models.pipeline(setting, height, width, steps)
        clock = Clock(device)
        clock.wrap(pipe.executor, "submit", "dit")
        clock.wrap(pipe.vae, "stream_encode", "encode")
        clock.wrap(pipe.decoder, "stream_decode", "decode")
        parts: dict[str, list[float]] = {"chunk": [], "encode": [], "dit": [], "decode": [], "other": []}
        for i in range(chunks + 1):
            sync()
            start = time.perf_counter()
            pipe.push(chunk(frames, i))
            sync()
            elapsed = (time.perf_counter() - start) * 1e3
            spans = clock.take()
            if i >= warm:
                parts["chunk"].append(elapsed)
                for label in ("encode", "dit", "decode"):
                    parts[label].append(spans.get(label, 0.0))
                parts["other"].append(elapsed - sum(spans.get(k, 0.0) for k in ("encode", "dit", "decode")))
        for owner, name in ((pipe.executor, "submit"), (pipe.vae, "stream_encode"), (pipe.decoder, "stream_decode")):
            vars(owner).pop(name, None)  # unwrap: the models are shared with the next row
        breakdown = {label: statistics.median(values) for label, values in parts.items()}  # per part, ms

        syncs = kernels = None
        if device == "cuda":
            syncs, kernels = count_waits_and_kernels(models, setting, height, width, steps, frames, warm)
    return dict(fps=fps, ttff=ttff, syncs=syncs, kernels=kernels, **breakdown)


def count_waits_and_kernels(models, setting, height, width, steps, frames, warm) -> tuple[float, float]:
    """Host-device waits and GPU kernels per steady chunk (CUDA only)."""
    pipe = models.pipeline(setting, height, width, steps)
    for i in range(warm):
        pipe.push(chunk(frames, i))
    counted = 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(warm, warm + counted):
                pipe.push(chunk(frames, i))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message).lower() for w in caught) / counted
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(warm + counted, warm + 2 * counted):
            pipe.push(chunk(frames, i))
        torch.cuda.synchronize()
    kernels = sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA) / counted
    return syncs, kernels


def describe_machine(device: str) -> list[str]:
    lines = [f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
             f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'}, "
             f"Python {platform.python_version()}"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                     f"compute capability {props.major}.{props.minor}, bf16")
    else:
        lines.append(f"device: CPU ({platform.processor() or platform.machine()}), "
                     f"{torch.get_num_threads()} threads, float32")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=10, help="chunks per pass after the first (at least steps + 5)")
    parser.add_argument("--gpu-only", action="store_true", help="skip the tiny CPU rows")
    parser.add_argument("--steps", default="1,2,3,4", help="denoising steps of the GPU rows (the CPU row runs 2)")
    parser.add_argument("--sizes", default="512x512,832x480", help="GPU rows' sizes, WIDTHxHEIGHT")
    parser.add_argument("--options", default="all",
                        help=f"option rows beside eager: 'all', 'none' or names from {', '.join(OPTIONS)} "
                             "(GPU: at the first size and step count)")
    args = parser.parse_args()
    names = list(OPTIONS) if args.options == "all" else [] if args.options == "none" else args.options.split(",")
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        parser.error(f"--options: unknown {unknown}; choose from {list(OPTIONS)}")

    runs = []  # (preset, device, [(setting, h, w, steps), ...])
    if not args.gpu_only:
        cpu_options = [OPTIONS[n] for n in names if n != "cudnn-benchmark"]
        runs.append(("tiny", "cpu", [(s, 64, 64, 2) for s in [EAGER, *cpu_options]]
                     + ([(combined([n for n in names if n in EXACT and n != "cudnn-benchmark"]), 64, 64, 2)]
                        if args.options == "all" else [])))
    if torch.cuda.is_available():
        sizes = [parse_size("--sizes", size)[::-1] for size in args.sizes.split(",")]  # (height, width)
        steps = [int(s) for s in args.steps.split(",")]
        rows = [(EAGER, h, w, n) for h, w in sizes for n in steps]
        rows += [(OPTIONS[name], *sizes[0], steps[0]) for name in names]
        if args.options == "all":
            rows.append((combined([n for n in names if n in EXACT]), *sizes[0], steps[0]))
        runs.append(("wan2.1-1.3b", "cuda", rows))
    elif args.gpu_only:
        print("no CUDA device: nothing to run with --gpu-only")
        return

    for preset, device, rows in runs:
        print("\n".join(describe_machine(device)))
        print("speed options (each row names its own): " + "; ".join(f"{n}: {OPTIONS[n].describe()}" for n in OPTIONS))
        print("not implemented yet (no row): " + ", ".join(NOT_IMPLEMENTED))
        print(f"{'setting':<18} {'preset':<12} {'size':>8} {'steps':>5} {'FPS':>7} {'x eager':>7} {'TTFF ms':>8} "
              f"{'chunk ms':>8} {'encode':>13} {'DiT':>13} {'decode':>13} {'other':>13} {'waits':>5} {'kernels':>7}"
              f"  {'published':>9} {'ratio':>6}")
        models = Models(preset, device, torch.bfloat16 if device == "cuda" else torch.float32)
        eager_fps = {}
        for setting, h, w, steps in rows:
            r = measure(models, setting, h, w, steps, max(args.chunks, steps + 5))
            if setting is EAGER:
                eager_fps[(h, w, steps)] = r["fps"]
            base = eager_fps.get((h, w, steps))
            ratio = f"{r['fps'] / base:>7.2f}" if base else f"{'-':>7}"
            published = PUBLISHED_FPS.get((h, w), (None,) * 4)[steps - 1] if device == "cuda" and steps <= 4 else None
            ref = f"{published:>9.2f} {r['fps'] / published:>6.2f}" if published else f"{'-':>9} {'-':>6}"
            share = {k: f"{r[k]:>6.1f} ({r[k] / r['chunk']:>3.0%})" for k in ("encode", "dit", "decode", "other")}
            waits = f"{r['syncs']:>5.1f}" if r["syncs"] is not None else f"{'-':>5}"
            kernels = f"{r['kernels']:>7.0f}" if r["kernels"] is not None else f"{'-':>7}"
            print(f"{setting.name:<18} {preset:<12} {f'{h}x{w}':>8} {steps:>5} {r['fps']:>7.2f} {ratio} "
                  f"{r['ttff'] * 1e3:>8.1f} {r['chunk']:>8.1f} {share['encode']:>13} {share['dit']:>13} "
                  f"{share['decode']:>13} {share['other']:>13} {waits} {kernels}  {ref}", flush=True)
        del models
        if device == "cuda":
            torch.cuda.empty_cache()


def combined(names: list[str]) -> Setting:
    """One setting with the speed options of ``names`` all on."""
    speed = SpeedOptions(**{k: any(getattr(OPTIONS[n].speed, k) for n in names) for k in vars(SpeedOptions())})
    return replace(EAGER, name="all exact", speed=speed, cuda_graphs=any(OPTIONS[n].cuda_graphs for n in names),
                   compile=any(OPTIONS[n].compile for n in names))


if __name__ == "__main__":
    main()
