"""`python -m engine demo`: the whole loop on one machine, as a host application sees it.

It starts an engine (`python -m engine serve`, through bridge/launcher.py) on a free
loopback port, streams a generated test pattern to it in real time through an
EngineClient (shared memory by default), writes the frames that come back to a video,
prints the output frame rate and the glass-to-glass latency percentiles, and stops the
engine with a shutdown request. The engine's own log goes to bridge.launcher's log folder.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bridge.client import EngineClient, Output, describe_scheduler
from bridge.launcher import EngineProcess, EngineStartError, log_path

from .cli import model_size, test_pattern, write_video

LOAD_TIMEOUT_S = 900.0  # a large model's first load can take minutes
DRAIN_S = 1.0  # after the last frame, how long to wait for the frames still on their way


def run_demo(args: argparse.Namespace) -> None:
    height, width = (int(v) for v in args.size.lower().split("x"))
    model_height, model_width = model_size(args.model, args.model_size)
    engine = start_engine(args.model, args.weights, f"{model_height}x{model_width}")
    try:
        with EngineClient(engine.address, transport=args.transport, width=width, height=height, prompt=args.prompt,
                          latency_ms=args.latency_ms) as client:
            wait_until_ready(client, engine)
            print(f"streaming {args.frames} frames of {width}x{height} at {args.fps:g} fps through {args.transport} "
                  f"(model at {model_width}x{model_height}) ...", flush=True)
            received, arrivals = stream(client, test_pattern(args.frames, height, width), args.fps)
            stats = client.stats()
    finally:
        print(f"stopping the engine ({engine.describe()}) ...", flush=True)
        engine.stop()
        print(f"the engine {engine.describe()}; its log: {engine.log_path}")
    report(args, received, arrivals, stats)


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


def stream(client: EngineClient, frames: np.ndarray, fps: float) -> tuple[list[Output], list[float]]:
    """Send frames at fps, as a camera would, collecting what comes back meanwhile."""
    received, arrivals = [], []

    def collect_until(deadline: float) -> None:
        while (remaining := deadline - time.monotonic()) > 0:
            output = client.receive(timeout=remaining)
            if output is not None:
                received.append(output)
                arrivals.append(time.monotonic())

    start = time.monotonic()
    for index, frame in enumerate(frames):
        collect_until(start + index / fps)
        client.send(frame)
    collect_until(time.monotonic() + DRAIN_S)
    return received, arrivals


def report(args: argparse.Namespace, received: list[Output], arrivals: list[float], stats: dict) -> None:
    print(f"frames sent {args.frames}, received {len(received)}; the engine took {stats['frames_processed']} into "
          f"{stats['steps']} steps ({stats['step_ms']:.0f} ms a step), dropped {stats['frames_dropped']} stale; "
          f"outputs trail inputs by {stats['lag_frames']} frames")
    if len(received) < 2:
        raise SystemExit("error: too few frames came back to measure")
    fps = (len(received) - 1) / (arrivals[-1] - arrivals[0])
    p50, p90, p99 = np.percentile([output.latency_ms for output in received], [50, 90, 99])
    print(f"output {fps:.1f} frames/s; glass-to-glass latency p50 {p50:.0f} ms, p90 {p90:.0f} ms, p99 {p99:.0f} ms "
          f"(budget {args.latency_ms:g} ms; the scheduler: {describe_scheduler(stats)})")
    write_video(args.output, [np.stack([output.pixels for output in received])], args.fps)
    print(f"wrote {args.output}")
