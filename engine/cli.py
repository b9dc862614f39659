"""`python -m engine ...`: run a clip through the pipeline, download weights."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def test_pattern(frames: int, height: int, width: int) -> np.ndarray:
    """A generated clip that needs no file: moving colour bars and a bouncing square."""
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((frames, height, width, 3), np.uint8)
    side = max(4, min(height, width) // 4)
    for f in range(frames):
        out[f, ..., 0] = ((x + 3 * f) * 255 // width) % 256
        out[f, ..., 1] = (y * 255 // height)
        out[f, ..., 2] = 128 + 127 * np.sin(f / 6)
        top = int((height - side) * (0.5 + 0.5 * np.sin(f / 9)))
        left = int((width - side) * (0.5 + 0.5 * np.cos(f / 7)))
        out[f, top:top + side, left:left + side] = 255
    return out


def read_video(path: str, frames: int) -> tuple[np.ndarray, float]:
    """Up to ``frames`` RGB frames of a video file (PyAV) and its frame rate."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or 16)
        decoded = []
        for frame in container.decode(stream):
            decoded.append(frame.to_ndarray(format="rgb24"))
            if len(decoded) == frames:
                break
    if not decoded:
        raise SystemExit(f"{path} has no video frames")
    return np.stack(decoded), rate


def write_video(path: str, frames: list[np.ndarray], fps: float) -> None:
    import av

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[1:3]
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264" if path.endswith(".mp4") else "mpeg4", rate=round(fps))
        stream.width, stream.height = width - width % 2, height - height % 2
        stream.pix_fmt = "yuv420p"
        for chunk in frames:
            for image in chunk:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:stream.height, :stream.width]),
                                                   format="rgb24")
                container.mux(stream.encode(frame))
        container.mux(stream.encode())


def run(args: argparse.Namespace) -> None:
    import torch

    from .models.weights import build_models
    from .pipeline import StreamPipeline, StreamSettings

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    size = args.size or ("64x64" if args.model == "tiny" else "512x512")
    height, width = (int(v) for v in size.lower().split("x"))
    if args.source == "testpattern":
        video, fps = test_pattern(args.frames, height, width), args.fps
    else:
        video, fps = read_video(args.source, args.frames)

    print(f"loading {args.model} on {device} ...", flush=True)
    models = build_models(args.model, weights=args.weights, device=device, dtype=dtype, taehv=args.taehv)
    settings = StreamSettings(height=height, width=width, steps=args.steps, prompt=args.prompt, seed=args.seed,
                              stream_batch=not args.no_stream_batch, strength=args.strength)
    pipe = StreamPipeline(models.dit, models.vae, models.text_encoder, settings, decoder=models.decoder)

    outputs, chunk_times = [], []
    first = pipe.first_chunk_frames
    chunks = [video[:first]] + [video[i:i + 4] for i in range(first, len(video) - 3, 4)]
    started = time.perf_counter()
    first_frame_at = None
    for index, chunk in enumerate(chunks, 1):
        t = time.perf_counter()
        out = pipe.push(chunk)
        chunk_times.append(time.perf_counter() - t)
        if len(out) and first_frame_at is None:
            first_frame_at = time.perf_counter() - started
        outputs.append(out)
        done = sum(len(o) for o in outputs)
        print(f"\rchunk {index}/{len(chunks)}  frames out {done}", end="", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    print(file=sys.stderr)
    produced = sum(len(o) for o in outputs)
    steady = chunk_times[1:] or chunk_times
    print(f"frames in {sum(len(c) for c in chunks)}, frames out {produced}, lag {pipe.lag_frames} frames")
    print(f"time to first frame {first_frame_at * 1e3:.0f} ms; steady {4 / np.median(steady):.1f} frames/s; "
          f"overall {produced / elapsed:.1f} frames/s")
    if args.output:
        write_video(args.output, [o for o in outputs if len(o)], fps)
        print(f"wrote {args.output}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine", description="StreamDiffusionV2 engine")
    commands = parser.add_subparsers(dest="command", required=True)

    run_parser = commands.add_parser("run", help="stream a clip through the pipeline chunk by chunk")
    run_parser.add_argument("--model", default="tiny", help="tiny | wan2.1-1.3b | wan2.1-14b")
    run_parser.add_argument("--weights", help="folder with the Wan2.1 release files (not needed for tiny)")
    run_parser.add_argument("--source", default="testpattern", help="'testpattern' or a video file")
    run_parser.add_argument("--frames", type=int, default=65)
    run_parser.add_argument("--fps", type=float, default=16.0, help="frame rate of the test pattern")
    run_parser.add_argument("--size", help="model size HxW, multiples of 16 (tiny: 64x64, else 512x512)")
    run_parser.add_argument("--prompt", default="a watercolour painting")
    run_parser.add_argument("--steps", type=int, default=2)
    run_parser.add_argument("--strength", type=float, default=0.8)
    run_parser.add_argument("--seed", type=int, default=0)
    run_parser.add_argument("--no-stream-batch", action="store_true", help="run the steps one after another")
    run_parser.add_argument("--taehv", action="store_true", help="decode with the TAEHV tiny decoder")
    run_parser.add_argument("--device")
    run_parser.add_argument("--output", help="write the result (.mp4)")
    run_parser.set_defaults(handler=run)

    download_parser = commands.add_parser("download", help="fetch the published weights of a model")
    download_parser.add_argument("--model", required=True, help="wan2.1-1.3b | wan2.1-14b")
    download_parser.add_argument("--no-taehv", action="store_true", help="skip the TAEHV decoder")
    download_parser.set_defaults(handler=download)

    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except (FileNotFoundError, ValueError) as error:  # the message says what to do next
        raise SystemExit(f"error: {error}") from None


def download(args: argparse.Namespace) -> None:
    from .models.weights import download_weights

    files = download_weights(args.model, taehv=not args.no_taehv)
    print(f"{args.model} is ready:\n  DiT {files.dit}\n  VAE {files.vae}\n  text encoder {files.text_encoder}"
          + (f"\n  TAEHV {files.taehv}" if files.taehv else ""))
