"""`python -m engine demo`: the whole loop on one machine, as a host application sees it.

It starts an engine (`python -m engine serve`) on a free loopback port, streams a
generated test pattern to it in real time through an EngineClient (shared memory by
default), writes the frames that come back to a video, prints the output frame rate
and the glass-to-glass latency percentiles, and stops the engine.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

import numpy as np

from bridge.client import EngineClient, Output, describe_scheduler

from .cli import model_size, test_pattern, write_video

LOAD_TIMEOUT_S = 900.0  # a large model's first load can take minutes
DRAIN_S = 1.0  # after the last frame, how long to wait for the frames still on their way


def run_demo(args: argparse.Namespace) -> None:
    height, width = (int(v) for v in args.size.lower().split("x"))
    model_height, model_width = model_size(args.model, args.model_size)
    engine, address = start_engine(args.model, args.weights, f"{model_height}x{model_width}")
    try:
        with EngineClient(address, transport=args.transport, width=width, height=height, prompt=args.prompt,
                          latency_ms=args.latency_ms) as client:
            wait_until_ready(client, engine)
            print(f"streaming {args.frames} frames of {width}x{height} at {args.fps:g} fps through {args.transport} "
                  f"(model at {model_width}x{model_height}) ...", flush=True)
            received, arrivals = stream(client, test_pattern(args.frames, height, width), args.fps)
            stats = client.stats()
    finally:
        stop_engine(engine)
    report(args, received, arrivals, stats)


def start_engine(model: str, weights: str | None, size: str) -> tuple[subprocess.Popen, str]:
    """An engine process on a free loopback port, and the address it listens at."""
    command = [sys.executable, "-m", "engine", "serve", "--model", model, "--size", size,
               "--bind", "tcp://127.0.0.1:*"]
    if weights:
        command += ["--weights", weights]
    engine = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    for line in engine.stdout:
        print(line, end="", flush=True)
        if match := re.search(r"listening at (\S+)", line):
            return engine, match.group(1)
    engine.wait()
    raise SystemExit(f"error: the engine exited ({engine.returncode}) before listening; see its messages above")


def wait_until_ready(client: EngineClient, engine: subprocess.Popen) -> None:
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while client.state not in ("ready", "streaming"):
        if engine.poll() is not None or client.state in ("error", "disconnected"):
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


def stop_engine(engine: subprocess.Popen) -> None:
    """SIGTERM, which the engine takes as a clean shutdown (its shared memory unlinked)."""
    if engine.poll() is None:
        engine.terminate()
        try:
            engine.wait(timeout=30)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()
    for line in engine.stdout:
        print(line, end="")
    engine.stdout.close()


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
