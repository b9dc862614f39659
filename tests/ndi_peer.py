"""An NDI peer for tests, run as its own process inside a private NDI network (tests/ndi_network.py):

    python ndi_peer.py send NAME SECONDS WxH [WxH ...]   a generated pattern at 30 fps, the sizes in turn
    python ndi_peer.py receive NAME SECONDS OUT.json      what arrives: size, seq, t_capture_ns, stamped
    python ndi_peer.py list SECONDS                        the sources NDI finds, one a line

The sender stamps each frame with its capture time (bridge.ndi's metadata), as an engine
does; `send` prints each frame's stamp as `sent SEQ T_CAPTURE_NS`.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.ndi import NdiReceiver, NdiSender, list_sources  # noqa: E402

FPS = 30


def pattern(seq: int, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.empty((height, width, 4), np.uint8)
    pixels[..., 0] = (x * 255 // width + 3 * seq) % 256
    pixels[..., 1] = y * 255 // height
    pixels[..., 2] = (seq * 8) % 256
    pixels[..., 3] = 255
    return pixels


def send(name: str, seconds: float, sizes: list[str]) -> None:
    shapes = [tuple(int(v) for v in size.split("x")) for size in sizes]
    with NdiSender(name, fps=FPS) as sender:
        start = time.monotonic()
        seq = 0
        while (elapsed := time.monotonic() - start) < seconds:
            width, height = shapes[min(int(elapsed * len(shapes) / seconds), len(shapes) - 1)]
            t_capture_ns = time.time_ns()
            sender.send(pattern(seq, height, width), "rgba8", t_capture_ns=t_capture_ns, seq=seq)
            print(f"sent {seq} {t_capture_ns} {width}x{height}", flush=True)
            seq += 1
            time.sleep(max(0.0, start + seq / FPS - time.monotonic()))


def receive(name: str, seconds: float, out: str) -> None:
    got = []
    with NdiReceiver(name, format="rgba8") as receiver:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            frame = receiver.receive()
            if frame is None:
                time.sleep(0.002)
                continue
            height, width = frame.pixels.shape[:2]
            got.append({"width": width, "height": height, "seq": frame.seq, "t_capture_ns": frame.t_capture_ns,
                        "stamped": frame.stamped, "received_ns": time.time_ns()})
            _write(out, got)
    _write(out, got)


def _write(out: str, got: list) -> None:
    partial = Path(out + ".partial")
    partial.write_text(json.dumps(got))
    partial.replace(out)  # whole, for a reader at any moment


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "send":
        send(sys.argv[2], float(sys.argv[3]), sys.argv[4:])
    elif command == "receive":
        receive(sys.argv[2], float(sys.argv[3]), sys.argv[4])
    elif command == "list":
        print("\n".join(list_sources(float(sys.argv[2]))))
