"""`python -m engine demo`: the whole loop on one machine, as a host application sees it.

It picks the model (--model auto: wan2.1-1.3b where a CUDA GPU and its weights are found,
else the tiny model, saying why), starts an engine (`python -m engine serve`, through
bridge/launcher.py) on a free loopback port, streams a generated test pattern to it in real
time through an EngineClient (shared memory by default), prints the output frame rate and
the glass-to-glass latency percentiles, and stops the engine with a shutdown request. Its
video shows each output beside the input frame it was made from, captioned with the frame
rate and latency as it arrived. The engine's own log goes to bridge.launcher's log folder.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np

from bridge.client import EngineClient, Output, describe_scheduler
from bridge.launcher import EngineProcess, EngineStartError, log_path

from .captions import draw_text, text_mask
from .cli import model_size, parse_size, test_pattern, write_video

LOAD_TIMEOUT_S = 900.0  # a large model's first load can take minutes
DRAIN_S = 1.0  # after the last frame, how long to wait for the frames still on their way
REAL_MODEL = "wan2.1-1.3b"  # what --model auto streams where it can
TINY_IS_NOISE = ("the tiny model has random weights: the picture is noise by design; this shows frames flowing and "
                 "the latency, not a style")
RATE_WINDOW_S = 1.0  # the captions' frame rate counts the outputs of the last second


@dataclass
class Arrival:
    output: Output
    input_index: int  # the test-pattern frame it was made from
    at: float  # time.monotonic() when it came back


def run_demo(args: argparse.Namespace) -> None:
    model = choose_model(args.model, args.weights, args.download)
    width, height = parse_size("--size", args.size)
    model_height, model_width = model_size(model, args.model_size, "--model-size")
    engine = start_engine(model, None if model == "tiny" else args.weights, f"{model_width}x{model_height}")
    inputs = test_pattern(args.frames, height, width)
    try:
        with EngineClient(engine.address, transport=args.transport, width=width, height=height, prompt=args.prompt,
                          latency_ms=args.latency_ms) as client:
            wait_until_ready(client, engine)
            print(f"streaming {args.frames} frames of {width}x{height} at {args.fps:g} fps through {args.transport} "
                  f"(model at {model_width}x{model_height}) ...", flush=True)
            arrivals = stream(client, inputs, args.fps)
            stats = client.stats()
    finally:
        print(f"stopping the engine ({engine.describe()}) ...", flush=True)
        engine.stop()
        print(f"the engine {engine.describe()}; its log: {engine.log_path}")
    report(args, model, arrivals, stats)
    write_video(args.output, [side_by_side(inputs, arrivals, model)], args.fps)
    print(f"wrote {args.output}: each output beside the input frame it was made from, with the frame rate and "
          f"latency as it arrived")


def choose_model(requested: str, weights: str | None, download: bool) -> str:
    """The model named, or for auto the real one where it can run, else tiny; says which and why."""
    if requested != "auto":
        print(f"model: {requested}", flush=True)
        return requested
    why_not = why_not_real_model(weights, download)
    if why_not is None:
        print(f"model: {REAL_MODEL} (a CUDA GPU is here, and its weights)", flush=True)
        return REAL_MODEL
    print(f"model: tiny, not {REAL_MODEL}: {why_not}", flush=True)
    return "tiny"


def why_not_real_model(weights: str | None, download: bool) -> str | None:
    """Why REAL_MODEL cannot stream here, or None when it can (fetching its weights first if download)."""
    import torch

    from .models import weights as published

    if not torch.cuda.is_available():
        return "there is no CUDA GPU here, which it needs" + (" (so nothing was downloaded)" if download else "")
    if download and weights is None:
        print(f"downloading the {REAL_MODEL} weights into the Hugging Face cache ...", flush=True)
        published.download_weights(REAL_MODEL, taehv=False)  # asked for: a failure stops here, saying what to do
        return None
    try:
        published.locate_weights(REAL_MODEL, weights)
    except published.WeightsNotFound as error:
        return (f"{str(error).splitlines()[0].rstrip('.:')}; `python dev.py demo --download` (or `python -m engine "
                f"demo --download`) fetches them, several GB, with progress")
    return None


def start_engine(model: str, weights: str | None, size: str) -> EngineProcess:
    """An engine on a free loopback port, once it answers there."""
    engine = EngineProcess.start(model=model, bind="tcp://127.0.0.1:*",
                                 args=["--size", size, *(["--weights", weights] if weights else [])],
                                 log_file=log_path("demo"))
    print(f"engine starting (pid {engine.pid}); its log: {engine.log_path}", flush=True)
    try:
        engine.wait_until_ready()
    except EngineStartError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"engine answering at {engine.address}", flush=True)
    return engine


def wait_until_ready(client: EngineClient, engine: EngineProcess) -> None:
    """Until the model has loaded and the session is ready for frames."""
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while client.state not in ("ready", "streaming"):
        if engine.returncode is not None or client.state in ("error", "disconnected"):
            raise SystemExit(f"error: the engine is {client.state}: {client.error}")
        if time.monotonic() > deadline:
            raise SystemExit(f"error: the model did not load within {LOAD_TIMEOUT_S:g} s")
        client.receive(timeout=0.1)  # tends the connection, which brings the state


def stream(client: EngineClient, frames: np.ndarray, fps: float) -> list[Arrival]:
    """Send frames at fps, as a camera would, collecting what comes back meanwhile."""
    arrivals, index_of_seq = [], {}

    def collect_until(deadline: float) -> None:
        while (remaining := deadline - time.monotonic()) > 0:
            output = client.receive(timeout=remaining)
            if output is not None:
                arrivals.append(Arrival(output, index_of_seq[output.seq], time.monotonic()))

    start = time.monotonic()
    for index, frame in enumerate(frames):
        collect_until(start + index / fps)
        index_of_seq[client.send(frame)] = index
    collect_until(time.monotonic() + DRAIN_S)
    return arrivals


def report(args: argparse.Namespace, model: str, arrivals: list[Arrival], stats: dict) -> None:
    print(f"frames sent {args.frames}, received {len(arrivals)}; the engine took {stats['frames_processed']} into "
          f"{stats['steps']} steps ({stats['step_ms']:.0f} ms a step), dropped {stats['frames_dropped']} stale; "
          f"outputs trail inputs by {stats['lag_frames']} frames")
    if len(arrivals) < 2:
        raise SystemExit("error: too few frames came back to measure")
    fps = (len(arrivals) - 1) / (arrivals[-1].at - arrivals[0].at)
    p50, p90, p99 = np.percentile([arrival.output.latency_ms for arrival in arrivals], [50, 90, 99])
    print(f"output {fps:.1f} frames/s; glass-to-glass latency p50 {p50:.0f} ms, p90 {p90:.0f} ms, p99 {p99:.0f} ms "
          f"(budget {args.latency_ms:g} ms; the scheduler: {describe_scheduler(stats)})")
    if model == "tiny":
        print(f"note: {TINY_IS_NOISE}")


def frame_rates(times: list[float]) -> list[float | None]:
    """Outputs a second at each arrival, over the RATE_WINDOW_S before it (None while there is one alone)."""
    rates, first = [], 0
    for index, at in enumerate(times):
        while times[first] < at - RATE_WINDOW_S:
            first += 1
        rates.append((index - first) / (at - times[first]) if at > times[first] else None)
    return rates


def side_by_side(inputs: np.ndarray, arrivals: list[Arrival], model: str) -> np.ndarray:
    """The video: each output to the right of its input, captioned with the output frame rate and
    glass-to-glass latency when it arrived (and, for tiny, that its picture is noise)."""
    width = inputs.shape[2]
    scale = max(1, width // 128)  # 2 font pixels to a screen pixel at the demo's 256 wide
    margin = 2 * scale
    tiny_note = ["RANDOM WEIGHTS:", "NOISE BY DESIGN"]
    note_top = inputs.shape[1] - margin - text_mask(tiny_note, scale).shape[0]
    frames = []
    for arrival, rate in zip(arrivals, frame_rates([arrival.at for arrival in arrivals])):
        frame = np.concatenate([inputs[arrival.input_index], arrival.output.pixels[..., :3]], axis=1)
        draw_text(frame, ["INPUT", f"FRAME {arrival.input_index}"], margin, margin, scale)
        draw_text(frame, [f"OUTPUT: {model}", f"{rate:.1f} FPS" if rate is not None else "-- FPS",
                          f"LATENCY {arrival.output.latency_ms:.0f} MS"], margin, width + margin, scale)
        if model == "tiny":
            draw_text(frame, tiny_note, note_top, width + margin, scale)
        frames.append(frame)
    return np.stack(frames)
