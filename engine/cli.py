"""`python -m engine ...`: run a clip through the pipeline, serve hosts, run the demo, download weights,
list the machine's video paths."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

from bridge import params as table
from bridge.protocol import ProtocolError, param_spec
from bridge.zmq_io import DEFAULT_ADDRESS, check_address
from .models.lora_files import DEFAULT_LORA_DIR

DISTRIBUTION = "streamdiffusion-bridge"  # the name pyproject.toml gives the package

# Session parameters (bridge/params.py) that `run` and `serve` take as flags: the values
# a stream, or every session a host opens without saying otherwise, starts with.
RUN_FLAGS = ("prompt", "strength", "steps", "seed", "fit", "blend", "low_latency_start")
SERVE_FLAGS = (*RUN_FLAGS, "transition_frames", "target_fps", "latency_ms", "virtualcam")


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
    """Stream a clip (or the test pattern) through the model and report the speed. Started by
    torchrun with N ranks, the DiT's blocks are spread over them (engine/parallel/): rank 0
    streams as one process does, the other ranks run their blocks."""
    from .pipeline import StreamPipeline, StreamSettings

    device, dtype = _device_and_dtype(args.device)  # one this torch cannot use fails here, on every rank too
    height, width = model_size(args.model, args.size)
    settings = StreamSettings(height=height, width=width, stream_batch=not args.no_stream_batch,
                              **session_flag_values(args, RUN_FLAGS))
    if ranks() == 1:
        from .models.weights import build_models

        print(f"loading {args.model} on {device} ...", flush=True)
        if args.compile:
            logging.basicConfig(level=logging.INFO, format="%(message)s")  # the compile's progress
        models = build_models(args.model, weights=args.weights, device=device, dtype=dtype, taehv=args.taehv,
                              compile_backend=compile_backend(args, device), **autoencoder_flags(args))
        _stream_clip(args, StreamPipeline(local_executor(args, models.dit, device), models.vae, models.text_encoder,
                                          settings, decoder=models.decoder), height, width)
        return
    for flag in one_rank_flags(args):
        raise SystemExit(f"error: {flag} runs the DiT on one rank; run without torchrun to use it")

    import torch.distributed as dist

    from .parallel import BlockBalancer, init_ranks, model_source, rank_device, start_ranks

    device = rank_device(args.device)
    init_ranks(device)
    try:
        if dist.get_rank() == 0:
            print(f"loading {args.model} over {dist.get_world_size()} ranks ({device.type}) ...", flush=True)
        source = model_source(args.model, weights=args.weights, device=device, dtype=dtype, taehv=args.taehv,
                              **autoencoder_flags(args))
        stage, models = start_ranks(source, settings, balancer=BlockBalancer())
        if models is None:
            stage.serve()
            return
        print(f"split of the blocks over the ranks: {stage.split}", flush=True)
        _stream_clip(args, StreamPipeline(stage, models.vae, models.text_encoder, settings, decoder=models.decoder),
                     height, width)
        print(f"final split {stage.split} after {stage.moves} moves")
        stage.close()
    finally:
        dist.destroy_process_group()


def ranks() -> int:
    """How many ranks torchrun started (1 without torchrun)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def _stream_clip(args: argparse.Namespace, pipe, height: int, width: int) -> None:
    if args.source == "testpattern":
        video, fps = test_pattern(args.frames, height, width), args.fps
    else:
        video, fps = read_video(args.source, args.frames)
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
    outputs.append(pipe.drain())  # what is still in flight on other ranks
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


_TITLES = {"spout": ("Spout", "sender"), "ndi": ("NDI", "source"), "syphon": ("Syphon", "server")}


def _engine_video_session(args: argparse.Namespace, size: tuple[int, int]):
    """The session `serve --KIND-in/--KIND-out` asks the engine to open for itself, or None.

    One kind is its source: the one given --KIND-in, or the only kind named. Every other
    kind given --KIND-out is an extra sink beside it (`--spout-in A --spout-out B --ndi-out C`:
    read Spout, publish over Spout and as an NDI source)."""
    from .server import EngineVideoSession

    asked = [kind for kind in _TITLES
             if getattr(args, f"{kind}_in") is not None or getattr(args, f"{kind}_out") is not None]
    if not asked:
        return None
    reading = [kind for kind in asked if getattr(args, f"{kind}_in") is not None]
    if len(reading) > 1 or (not reading and len(asked) > 1):
        raise SystemExit(f"error: the engine's own session reads one source: give --KIND-in for exactly one of "
                         f"{', '.join(asked)} (the others' --KIND-out publish its output too)")
    kind = (reading or asked)[0]
    given_size = getattr(args, f"{kind}_size")
    # Frames at the model's size unless told otherwise (size is height, width).
    width, height = parse_size(f"--{kind}-size", given_size) if given_size else size[::-1]
    extra = tuple((other, getattr(args, f"{other}_out")) for other in asked if other != kind)
    try:
        return EngineVideoSession(input=getattr(args, f"{kind}_in") or "",
                                  output=getattr(args, f"{kind}_out") or table.PARAMS[f"{kind}_output"].default,
                                  width=width, height=height, transport=kind, extra_outputs=extra)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def serve(args: argparse.Namespace) -> None:
    import zmq

    from bridge.zmq_io import ServerKeys

    from .config import get_preset
    from .models.lora import LoraLibrary
    from .models.weights import build_models
    from .endpoints import EndpointUnavailable
    from .server import EngineServer, Limits, check_bind

    check_address(args.bind, "--bind")
    auth = ServerKeys.from_dir(args.keys) if args.keys else None
    check_bind(args.bind, auth is not None)
    get_preset(args.model)  # an unknown name fails now, not in the worker
    if args.weights:
        _check_readable_folder(args.weights)
    frame_width, frame_height = parse_size("--max-frame-size", args.max_frame_size, example="1920x1080")
    limits = Limits(max_sessions=args.max_sessions, max_frame_width=frame_width, max_frame_height=frame_height,
                    max_prompt_chars=args.max_prompt_chars, max_model_size=args.max_model_size)
    device, dtype = _device_and_dtype(args.device)
    compiled_with = compile_backend(args, device)  # checked now, not when the models load
    size = model_size(args.model, args.size)
    session_defaults = session_flag_values(args, SERVE_FLAGS, only_given=True)
    if args.lora:
        if len(args.lora) > table.MAX_LORAS:
            raise SystemExit(f"error: --lora: a session mixes at most {table.MAX_LORAS} adapters")
        session_defaults["loras"] = tuple(args.lora)
    world = ranks()
    if world > 1:  # started by torchrun: rank 0 serves, every rank runs its blocks of the DiT
        import torch.distributed as dist

        from .parallel import init_ranks, rank_device

        for flag in one_rank_flags(args):
            raise SystemExit(f"error: {flag} runs the DiT on one rank; serve without torchrun to use it")
        device = rank_device(args.device)
        init_ranks(device)
        if dist.get_rank() != 0:
            return _serve_blocks(args, device, dtype, _split_settings(size, session_defaults))
    loras = LoraLibrary(args.lora_dir, get_preset(args.model), device=device, dtype=dtype)
    spout = _engine_video_session(args, size)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")

    stages = []  # rank 0's stage executor, once the models are loaded over the ranks

    def load_models():
        from dataclasses import replace

        if world == 1:
            logging.getLogger(__name__).info("loading %s on %s ...", args.model, device)
            models = build_models(args.model, weights=args.weights, device=device, dtype=dtype, taehv=args.taehv,
                                  compile_backend=compiled_with, **autoencoder_flags(args))
            return replace(models, executor=local_executor(args, models.dit, device)) if args.cuda_graphs else models
        from .parallel import BlockBalancer, model_source, start_ranks

        logging.getLogger(__name__).info("loading %s over %d ranks (%s) ...", args.model, world, device.type)
        source = model_source(args.model, weights=args.weights, device=device, dtype=dtype, taehv=args.taehv,
                              **autoencoder_flags(args))
        stage, models = start_ranks(source, _split_settings(size, session_defaults), balancer=BlockBalancer())
        logging.getLogger(__name__).info("split of the blocks over the ranks: %s", stage.split)
        stages.append(stage)
        return replace(models, executor=stage)

    try:
        server = EngineServer(load_models, model=args.model, address=args.bind, model_size=size,
                              session_timeout_s=args.session_timeout, limits=limits, auth=auth,
                              session_defaults=session_defaults, spout=spout, loras=loras, ranks=world)
    except zmq.ZMQError as error:
        raise SystemExit(f"error: cannot listen at {args.bind} ({error}); is another engine running there? "
                         "Choose another port with --bind") from None
    except EndpointUnavailable as error:
        raise SystemExit(f"error: --{spout.transport}-in/--{spout.transport}-out: {error}") from None
    except ValueError as error:  # --spout-size over --max-frame-size, a --lora that cannot be used
        raise SystemExit(f"error: {error}") from None
    osc = _start_osc(args, server) if args.osc is not None else None
    keys_note = "hosts need keys from " + args.keys if auth else "no keys needed on loopback"
    where = f"{device}" if world == 1 else f"{world} ranks ({device.type})"
    print(f"engine {args.model} on {where}: listening at {server.address} ({keys_note}; Ctrl-C stops it)",
          flush=True)
    if spout is not None:
        title, thing = _TITLES[spout.transport]
        extra = "".join(f", and as {' '.join(_TITLES[kind])} {name!r}" for kind, name in spout.extra_outputs)
        print(f"{title}: reading {thing} {spout.input or '(the first/active one)'!r}, publishing {spout.output!r} at "
              f"{spout.width}x{spout.height}{extra}; no host needed (session id {spout.transport!r})", flush=True)
    if args.ready_file:
        _write_ready_file(Path(args.ready_file), server.address)
    server.serve_forever(parent_pid=args.parent_pid)
    if osc is not None:
        osc.close()
    if world > 1:
        _close_ranks(stages)
    if server.load_error is not None:
        raise SystemExit(f"error: the engine stopped: {args.model} failed to load: {server.load_error}")
    print("engine stopped", flush=True)
    if server.failed:
        raise SystemExit(1)


def _split_settings(size: tuple[int, int], session_defaults: dict):
    """The stream every rank measures its costs at, to split the blocks (the sessions' default)."""
    from .pipeline import StreamSettings

    return StreamSettings(height=size[0], width=size[1],
                          steps=session_defaults.get("steps", table.PARAMS["steps"].default))


def _serve_blocks(args: argparse.Namespace, device, dtype, settings) -> None:
    """Rank 1..N-1 of `torchrun ... -m engine serve`: its blocks for every forward, until rank 0 stops."""
    import signal

    import torch.distributed as dist

    from .parallel import model_source, start_ranks

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every rank; rank 0 stops them all
    try:
        source = model_source(args.model, weights=args.weights, device=device, dtype=dtype, taehv=args.taehv,
                              **autoencoder_flags(args))
        stage, _ = start_ranks(source, settings)
        stage.serve()
    finally:
        dist.destroy_process_group()


def _close_ranks(stages: list) -> None:
    """Stop the other ranks (rank 0, once its server has stopped)."""
    import torch.distributed as dist

    from .parallel import LinkFailed

    try:
        for stage in stages:
            stage.close()
    except (LinkFailed, RuntimeError) as error:  # a rank is gone already: torchrun stops the rest
        logging.getLogger(__name__).warning("%s", error)
    finally:
        dist.destroy_process_group()


def _start_osc(args: argparse.Namespace, server):
    """The OSC control `serve --osc PORT` asks for, listening; where it cannot, the engine closes."""
    from .osc import OscControl

    try:
        osc = OscControl(server, args.osc, args.osc_bind, allow_remote=args.osc_allow_remote)
    except ValueError as error:  # a bind beyond loopback without --osc-allow-remote
        server.close()
        raise SystemExit(f"error: {error}") from None
    except (OSError, OverflowError) as error:  # the port is taken, or not a port (OverflowError)
        server.close()
        raise SystemExit(f"error: cannot listen for OSC at udp://{args.osc_bind}:{args.osc} ({error}); is another "
                         "program using that port? Choose another with --osc") from None
    osc.start()
    return osc


def _write_ready_file(path: Path, address: str) -> None:
    """Say where the engine listens, for bridge/launcher.py: written whole or not at all."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(address + "\n")
    partial.replace(path)


def _check_readable_folder(folder: str) -> None:
    """Fail before listening when the weights cannot be read at all."""
    import os

    path = Path(folder)
    if not path.exists():
        raise FileNotFoundError(f"--weights {folder} does not exist; give the folder with the model's files")
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(f"--weights {folder} is not readable by this user; fix its permissions "
                              f"(chmod u+rx {folder}) or run the engine as its owner")


def keys(args: argparse.Namespace) -> None:
    from bridge.zmq_io import AUTHORIZED_CLIENTS_DIR, make_keys

    directory = Path(args.dir).expanduser()
    written = make_keys(directory, None if args.server_only else args.client)
    for path in written.values():
        print(f"wrote {path}")
    print(f"engine: python -m engine serve --bind tcp://0.0.0.0:5555 --keys {directory}\n"
          f"  ({directory}/server.key_secret stays on the engine machine; the engine accepts the public keys "
          f"in {directory}/{AUTHORIZED_CLIENTS_DIR}/, read when it starts)")
    if not args.server_only:
        print(f"host '{args.client}': copy {directory}/server.key and {directory}/{args.client}.key_secret to it, "
              f"then EngineClient(..., server_key=\"server.key\", client_keys=\"{args.client}.key_secret\")")


def devices(args: argparse.Namespace) -> None:
    from .devices import find_devices, format_table

    print(format_table(find_devices(args.lora_dir)))


def demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args)


def _device_and_dtype(device: str | None):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    return device, torch.bfloat16 if device.startswith("cuda") else torch.float32


def check_device(device: str) -> None:
    """Refuse a --device this torch cannot use with what to do instead (torch itself fails
    later, with an assertion deep in a model's load)."""
    import torch

    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device} is not a device torch knows: give cpu, cuda or cuda:N") from None
    if chosen.type != "cuda":
        return
    if not torch.backends.cuda.is_built():
        release = torch.__version__.split("+")[0]
        raise ValueError(f"--device {device}: the torch installed here ({torch.__version__}) is built without CUDA. "
                         f"Install its CUDA build (pip install torch=={release} --index-url "
                         "https://download.pytorch.org/whl/cuXXX, with the cuXXX pytorch.org lists for your driver) "
                         "or run on the CPU with --device cpu")
    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError(f"--device {device}: torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU here. "
                         "Check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or run on the CPU with "
                         "--device cpu")
    if chosen.index is not None and chosen.index >= count:
        present = ", ".join(f"cuda:{index}" for index in range(count))
        raise ValueError(f"--device {device}: there is no such GPU here; torch finds {present}. "
                         "Give one of those, or --device cpu")


def model_size(model: str, size: str | None, flag: str = "--size") -> tuple[int, int]:
    """(height, width), the order tensors take, from a WIDTHxHEIGHT option or the model's default size."""
    width, height = parse_size(flag, size or ("64x64" if model == "tiny" else "512x512"))
    return height, width


def parse_size(flag: str, size: str, example: str = "512x512") -> tuple[int, int]:
    """(width, height) of a WIDTHxHEIGHT option such as 512x288."""
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        width = height = 0
    if width <= 0 or height <= 0:
        raise ValueError(f"{flag} {size} is not a size: write {flag} WIDTHxHEIGHT in pixels, e.g. {flag} {example}")
    return width, height


def add_session_flags(parser: argparse.ArgumentParser, names: tuple[str, ...], description: str) -> None:
    """A flag per session parameter (--target-fps for target_fps), with the table's
    default, bounds and help, checked as a host's value would be."""
    group = parser.add_argument_group("session parameters", description)
    for name in names:
        param = table.PARAMS[name]
        flag = "--" + name.replace("_", "-")
        bounds = f"{param.minimum} to {param.maximum}" if param.kind in ("int", "float") else ""
        unit = f" {param.unit}" if param.unit else ""
        default = f"default {param.default}"
        help = f"{param.help} ({bounds}{unit}; {default})" if bounds else f"{param.help} ({default})"
        # Left out of args unless given: a target given here counts as stated (engine/slo.py).
        if param.kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:
            group.add_argument(flag, type=_param_value(param, flag), default=argparse.SUPPRESS,
                               choices=param.choices or None, help=help)


def _param_value(param: table.Param, flag: str):
    spec = param_spec(param)
    convert = {"int": int, "float": float, "str": str}[param.kind]

    def value(text: str):
        try:
            return spec.check(flag, convert(text))
        except (ValueError, ProtocolError) as error:
            raise argparse.ArgumentTypeError(getattr(error, "message", f"{flag} takes {param.kind}, got {text!r}"))

    value.__name__ = param.kind  # argparse names the type in its own errors
    return value


def lora_flag(text: str) -> tuple[str, float]:
    """--lora PATH[:SCALE] as a [name or path, scale] pair, checked as a host's would be. A colon
    not followed by a number is part of the path (C:/loras/ink.safetensors); no scale is 1."""
    path, _, scale = text.rpartition(":")
    try:
        pair = (path, float(scale)) if path else (text, 1.0)
    except ValueError:
        pair = (text, 1.0)
    try:
        [checked] = param_spec(table.PARAMS["loras"]).check("--lora", [pair])
    except ProtocolError as error:
        raise argparse.ArgumentTypeError(error.message) from None
    return checked


def add_autoencoder_flags(parser: argparse.ArgumentParser) -> None:
    """--encoder, --decoder and --preset: the speed and quality trades of build_models."""
    parser.add_argument("--encoder", choices=("wan", "taehv"), default="wan",
                        help="encode frames with the Wan VAE or the TAEHV tiny autoencoder (faster, rougher)")
    parser.add_argument("--decoder", choices=("wan", "taehv"), default=None,
                        help="decode with the Wan VAE or TAEHV (default: wan, or taehv with --taehv); "
                             "--decoder taehv is StreamDiffusionV2's fast mode")
    parser.add_argument("--preset", choices=("default", "fast"), default="default",
                        help="KV-cache preset: default 6 frames with 3 sinks and adaptive sinks; fast "
                             "5 frames with 2 sinks, adaptive sinks off (StreamDiffusionV2's fast config)")


def add_speed_flags(parser: argparse.ArgumentParser) -> None:
    """--cuda-graphs and --compile: off by default until a GPU measurement shows them faster
    (bench/speed_gpu.py). Together, the graph replays the compiled kernels."""
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each steady DiT step as a CUDA graph (static buffers, no host-device waits "
                             "in the step); needs a CUDA device and one rank")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the DiT's blocks (inductor): each new shape compiles on its first "
                             "chunk, cached on disk in TORCHINDUCTOR_CACHE_DIR (default /tmp/torchinductor_$USER) "
                             "for later runs; one rank; combines with --cuda-graphs")


def one_rank_flags(args: argparse.Namespace) -> list[str]:
    """The speed flags given that work on one rank only."""
    return [flag for flag, given in (("--cuda-graphs", args.cuda_graphs), ("--compile", args.compile)) if given]


def compile_backend(args: argparse.Namespace, device) -> str | None:
    """build_models' compile_backend as --compile asks, checked for the device."""
    from .models.dit import compile_problem

    if not args.compile:
        return None
    problem = compile_problem(device)
    if problem is not None:
        raise SystemExit(f"error: --compile: {problem}; install it, or run without --compile")
    return "inductor"


def local_executor(args: argparse.Namespace, dit, device):
    """The DiT's executor in this process as --cuda-graphs asks (engine/static_step.py)."""
    import torch

    from .executor import LocalExecutor

    if args.cuda_graphs and torch.device(device).type != "cuda":
        raise SystemExit(f"error: --cuda-graphs needs a CUDA device; the DiT runs on {device}")
    return LocalExecutor(dit, cuda_graphs=args.cuda_graphs)


def autoencoder_flags(args: argparse.Namespace) -> dict:
    """build_models' arguments from add_autoencoder_flags' flags."""
    return dict(encoder=args.encoder, decoder=args.decoder, cache=args.preset)


def session_flag_values(args: argparse.Namespace, names: tuple[str, ...], *, only_given: bool = False) -> dict:
    """The session parameters of add_session_flags by their protocol names: those given, and
    the table's defaults for the others unless only_given."""
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return given if only_given else {**{name: table.PARAMS[name].default for name in names}, **given}


class HelpWithDefaults(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless it has none or the help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or action.default is False or "default" in help:
            return help
        return help + " (default %(default)s)"


class EngineArgumentParser(argparse.ArgumentParser):
    """A parser whose help shows defaults; its subcommands' parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpWithDefaults)
        super().__init__(*args, **kwargs)


class PrintVersions(argparse.Action):
    """--version: torch is imported only when asked, not for every command's help."""

    def __init__(self, option_strings: list[str], dest: str, help: str):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(versions())
        parser.exit()


def versions() -> str:
    """This package's version, torch's, and whether torch can use a GPU here."""
    import torch

    if not torch.backends.cuda.is_built():
        cuda = "built without CUDA (CPU only)"
    elif torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count()))
        cuda = f"CUDA {torch.version.cuda}, GPUs: {names}"
    else:
        cuda = f"CUDA {torch.version.cuda}, but no GPU is visible"
    return f"{DISTRIBUTION} {package_version()}\ntorch {torch.__version__}: {cuda}"


def package_version() -> str:
    """The installed package's version, or pyproject.toml's when running from a checkout not installed."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        found = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.MULTILINE) if pyproject.exists() else None
        return found.group(1) if found else "(version unknown: not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = EngineArgumentParser(prog="python -m engine", description="StreamDiffusionV2 engine")
    parser.add_argument("--version", action=PrintVersions,
                        help="print the versions of this package and torch, and whether CUDA is usable, then exit")
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    run_parser = commands.add_parser("run", help="stream a clip through the pipeline chunk by chunk")
    run_parser.add_argument("--model", default="tiny", help="tiny | wan2.1-1.3b | wan2.1-14b")
    run_parser.add_argument("--weights", metavar="DIR",
                            help="folder with the Wan2.1 release files (default: the Hugging Face cache, which "
                                 "`download` fills; tiny needs none)")
    run_parser.add_argument("--source", default="testpattern", help="'testpattern' or a video file")
    run_parser.add_argument("--frames", type=int, default=65,
                            help="how many frames to stream: of the test pattern, or the video's first")
    run_parser.add_argument("--fps", type=float, default=16.0, help="frame rate of the test pattern")
    run_parser.add_argument("--size", metavar="WxH",
                            help="the model's size WIDTHxHEIGHT, multiples of 16 (default 64x64 for tiny, else "
                                 "512x512)")
    run_parser.add_argument("--no-stream-batch", action="store_true", help="run the steps one after another")
    run_parser.add_argument("--taehv", action="store_true", help="decode with the TAEHV tiny decoder")
    add_autoencoder_flags(run_parser)
    add_speed_flags(run_parser)
    run_parser.add_argument("--device", help="cpu, cuda or cuda:N (default cuda where torch finds a GPU, else cpu)")
    run_parser.add_argument("--output", metavar="FILE",
                            help="write the frames that come out to this video (.mp4); without it nothing is written")
    add_session_flags(run_parser, RUN_FLAGS, "the stream's settings")
    run_parser.set_defaults(handler=run)

    serve_parser = commands.add_parser("serve", help="serve host applications over shared memory, ZeroMQ or Spout")
    serve_parser.add_argument("--model", default=table.DEFAULT_MODEL, help="tiny | wan2.1-1.3b | wan2.1-14b")
    serve_parser.add_argument("--bind", default=DEFAULT_ADDRESS,
                              help="where hosts connect; anything but loopback (tcp://127.0.0.1:PORT, ipc://PATH) "
                                   "needs --keys")
    serve_parser.add_argument("--keys", metavar="DIR",
                              help="require CURVE authentication with the keys `python -m engine keys` made in DIR")
    serve_parser.add_argument("--weights", metavar="DIR",
                              help="folder with the Wan2.1 release files (default: the Hugging Face cache, which "
                                   "`download` fills; tiny needs none)")
    serve_parser.add_argument("--device", help="cpu, cuda or cuda:N (default cuda where torch finds a GPU, else cpu)")
    serve_parser.add_argument("--taehv", action="store_true", help="decode with the TAEHV tiny decoder")
    add_autoencoder_flags(serve_parser)
    add_speed_flags(serve_parser)
    serve_parser.add_argument("--size", metavar="WxH",
                              help="sessions' model size WIDTHxHEIGHT, multiples of 16, unless a session sets "
                                   "model_width and model_height (default 64x64 for tiny, else 512x512)")
    serve_parser.add_argument("--session-timeout", type=float, default=10.0, metavar="SECONDS",
                              help="close a session whose host is silent this long")
    serve_parser.add_argument("--max-sessions", type=int, default=8, help="sessions served at once")
    serve_parser.add_argument("--max-frame-size", default="3840x2160", metavar="WxH",
                              help="largest frame a host may send, WIDTHxHEIGHT")
    serve_parser.add_argument("--max-prompt-chars", type=int, default=1000, help="longest prompt taken")
    serve_parser.add_argument("--max-model-size", type=int, default=1024, metavar="PIXELS",
                              help="largest model_width and model_height a session may ask for")
    serve_parser.add_argument("--parent-pid", type=int, metavar="PID",
                              help="stop when the process PID ends (applications that start the engine pass their "
                                   "own, so a crash leaves no engine behind)")
    serve_parser.add_argument("--ready-file", metavar="PATH",
                              help="once listening, write the address hosts connect to into PATH (for launchers; "
                                   "with --bind tcp://127.0.0.1:* it holds the port picked)")
    serve_parser.add_argument("--spout-in", metavar="NAME",
                              help="open a Spout session in the engine, with no host: read this Spout sender "
                                   "('' for the active one; Windows)")
    serve_parser.add_argument("--spout-out", metavar="NAME",
                              help="... and publish its output as this Spout sender "
                                   f"(default {table.PARAMS['spout_output'].default})")
    serve_parser.add_argument("--spout-size", metavar="WxH",
                              help="size WIDTHxHEIGHT of the --spout-in/--spout-out session's frames; other sizes are "
                                   "fitted to it (default: the model size)")
    for kind, title, thing, note in (("ndi", "NDI", "source", "as NDI lists it, MACHINE (NAME), or NAME; '' for the "
                                                              "first found"),
                                     ("syphon", "Syphon", "server", "'' for the first found; macOS")):
        serve_parser.add_argument(f"--{kind}-in", metavar="NAME",
                                  help=f"open a {title} session in the engine, with no host: read this {title} {thing} "
                                       f"({note})")
        serve_parser.add_argument(f"--{kind}-out", metavar="NAME",
                                  help=f"... and publish its output as this {title} {thing} "
                                       f"(default {table.PARAMS[f'{kind}_output'].default}); beside another "
                                       "kind's --KIND-in, an extra output of that session")
        serve_parser.add_argument(f"--{kind}-size", metavar="WxH",
                                  help=f"size WIDTHxHEIGHT of the --{kind}-in/--{kind}-out session's frames; other "
                                       "sizes are fitted to it (default: the model size)")
    serve_parser.add_argument("--osc", type=int, metavar="PORT",
                              help="also take parameter changes as OSC over UDP at PORT: /sd/<param> VALUE for every "
                                   "session, /sd/<session>/<param> VALUE for one (engine/osc.py)")
    serve_parser.add_argument("--osc-bind", default="127.0.0.1", metavar="HOST",
                              help="where OSC listens; beyond loopback needs --osc-allow-remote")
    serve_parser.add_argument("--osc-allow-remote", action="store_true",
                              help="let --osc-bind reach beyond this machine: OSC has no authentication, so anyone "
                                   "who reaches the port can change every session's parameters")
    serve_parser.add_argument("--lora-dir", default=DEFAULT_LORA_DIR, metavar="DIR",
                              help="the LoRA folder: a name in a session's loras is a file here (NAME or "
                                   "NAME.safetensors); `python -m engine devices --lora-dir DIR` lists them")
    add_session_flags(serve_parser, SERVE_FLAGS, "what every session starts with unless its host says otherwise "
                                                 "(the --spout-in/--spout-out session too)")
    serve_parser.add_argument("--lora", action="append", type=lora_flag, metavar="PATH[:SCALE]",
                              help="a LoRA adapter every session starts with, a name in --lora-dir or a path, at "
                                   "SCALE (-2 to 2; default 1); repeat it to mix several")
    serve_parser.set_defaults(handler=serve)

    keys_parser = commands.add_parser("keys", help="create CURVE keys for an engine that hosts on other "
                                                   "machines reach")
    keys_parser.add_argument("--dir", default="~/.sdbridge/keys",
                             help="where the keys go; the engine's pair is made once")
    keys_parser.add_argument("--client", default="client", help="name of the host key pair to add")
    keys_parser.add_argument("--server-only", action="store_true", help="make only the engine's key pair")
    keys_parser.set_defaults(handler=keys)

    demo_parser = commands.add_parser("demo", help="the whole loop: an engine, a host streaming a test pattern "
                                                   "through it in real time, the video that comes back")
    demo_parser.add_argument("--model", default="auto",
                             help="auto | tiny | wan2.1-1.3b | wan2.1-14b (auto: wan2.1-1.3b where a CUDA GPU and "
                                  "its weights are found, else tiny, saying why)")
    demo_parser.add_argument("--weights", help="folder with the Wan2.1 release files (not needed for tiny)")
    demo_parser.add_argument("--download", action="store_true",
                             help="with --model auto on a CUDA GPU: fetch the wan2.1-1.3b weights into the Hugging "
                                  "Face cache first, with progress (several GB the first time)")
    demo_parser.add_argument("--transport", choices=["shm", "zmq"], default="shm",
                             help="how frames travel: shared memory or ZeroMQ")
    demo_parser.add_argument("--frames", type=int, default=160, help="how many test-pattern frames to send")
    demo_parser.add_argument("--fps", type=float, default=16.0, help="frame rate the test pattern is sent at")
    demo_parser.add_argument("--size", default="256x256", metavar="WxH", help="host frame size WIDTHxHEIGHT")
    demo_parser.add_argument("--model-size", metavar="WxH",
                             help="model size WIDTHxHEIGHT, multiples of 16 (default 64x64 for tiny, else 512x512)")
    demo_parser.add_argument("--prompt", default="a watercolour painting", help="what the picture becomes")
    demo_parser.add_argument("--latency-ms", type=float, default=500.0,
                             help="the session's budget from capture to output, which the scheduler holds its "
                                  "frames to (stream batching goes where its lag does not fit)")
    demo_parser.add_argument("--output", default="out/demo.mp4", metavar="FILE",
                             help="the video of the frames that come back")
    demo_parser.set_defaults(handler=demo)

    download_parser = commands.add_parser("download", help="fetch the published weights of a model into the "
                                                           "Hugging Face cache")
    download_parser.add_argument("--model", required=True, help="wan2.1-1.3b | wan2.1-14b")
    download_parser.add_argument("--no-taehv", action="store_true", help="skip the TAEHV decoder")
    download_parser.set_defaults(handler=download)

    devices_parser = commands.add_parser("devices", help="Spout senders, Syphon servers, virtual cameras and LoRA "
                                                         "adapters on this machine: usable or why not, and the fix")
    devices_parser.add_argument("--lora-dir", default=DEFAULT_LORA_DIR, metavar="DIR",
                                help="the LoRA folder whose adapters are listed (as serve --lora-dir)")
    devices_parser.set_defaults(handler=devices)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (OSError, ValueError) as error:  # the message says what to do next (FileExistsError, PermissionError...)
        raise SystemExit(f"error: {error}") from None


def download(args: argparse.Namespace) -> None:
    from .models.weights import download_weights

    files = download_weights(args.model, taehv=not args.no_taehv)
    print(f"{args.model} is ready:\n  DiT {files.dit}\n  VAE {files.vae}\n  text encoder {files.text_encoder}"
          + (f"\n  TAEHV {files.taehv}" if files.taehv else ""))
