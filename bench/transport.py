"""Frame round-trip times through the bridge transports, against one copy of the frame.

    .venv/bin/python bench/transport.py

For each frame size (RGBA), a frame goes out and comes back through:

  shm   a ring to an echo process, which writes each frame it reads into a second
        ring that this process reads, both processes polling without sleeping. The
        echo does what the engine does with a frame: it copies it out of the ring (the
        engine holds a frame until its chunk is complete, longer than the host's ring
        keeps it) and writes its output into its own ring's slot (the engine converts
        straight into the slot, RingWriter.write_in_place). With the host's write and
        read that is four copies of the frame, each read into a reused buffer.
  zmq   a HostSocket to an echo process serving an EngineSocket on loopback TCP,
        which sends each frame straight back.
  ndi   the real NDI runtime (cyndilib's libndi) over loopback: this process sends the
        frame as an NDI source, an echo process receives it and sends it back as another,
        which this process receives (bridge/ndi.py both ways, the frame's seq carried as
        NDI metadata). It runs inside a private NDI network (tests/ndi_network.py: its own
        D-Bus and avahi-daemon, NDI allowed 127.0.0.1 only), which needs root and the
        avahi-daemon and dbus-daemon programs; without them the row says why. NDI
        compresses each frame (SpeedHQ) both ways, and both ends poll every 0.5 ms.

The targets are as set: a shm round trip within 3x one copy of the frame (one numpy
copy into a reused buffer, in this process), and a zmq round trip under 5 ms at
512x512; NDI has none, and its time is set beside zmq's ("/ zmq"). Four copies are
more than three, so the shm target cannot be met by any ring that copies in and out
at each end; the table says by how much it is missed and how much of the time is not
copying. Times are medians over many round trips after a warm-up. This is a measurement, never a pass/fail test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # for the private NDI network

from bridge.protocol import Bye, FrameHeader  # noqa: E402
from bridge.shm import RingReader, RingWriter  # noqa: E402
from bridge.zmq_io import EngineSocket, HostSocket  # noqa: E402

SIZES = [(512, 512), (1920, 1080)]
WARMUP = 10
ROUND_TRIPS = {(512, 512): 300, (1920, 1080): 60}
SHM_COPIES = 4  # copies of the frame in one shm round trip
SHM_TARGET_RATIO = 3.0  # the target: a shm round trip within 3x one copy of the frame
ZMQ_TARGET_MS_512 = 5.0  # the target: a zmq round trip under 5 ms at 512x512
TIMEOUT_S = 60.0  # generous: a busy machine answers late, and a late answer is no failure here
NDI_ROUND_TRIPS = {(512, 512): 100, (1920, 1080): 30}  # NDI's round trips are slower: fewer of them
NDI_POLL_S = 0.0005
NDI_RESEND_S = 1.0  # a frame NDI has not brought back by then is sent again (counted in the table)
NDI_OUT, NDI_BACK = "sdbridge-bench-out", "sdbridge-bench-back"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--echo", choices=["shm", "zmq", "ndi"], help=argparse.SUPPRESS)  # the echo process's role
    parser.add_argument("--ring", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo == "shm":
        echo_shm(args.ring)
    elif args.echo == "zmq":
        echo_zmq()
    elif args.echo == "ndi":
        echo_ndi()
    else:
        run_benchmark()


def run_benchmark() -> None:
    rows = []
    with ndi_echo() as ndi:  # an echo process in a private NDI network, or why there is none
        for width, height in SIZES:
            frame = np.random.default_rng(0).integers(0, 256, (height, width, 4), dtype=np.uint8)
            count = ROUND_TRIPS[(width, height)]
            floor = copy_floor(frame, count)
            ndi_row = ndi(frame, NDI_ROUND_TRIPS[(width, height)]) if callable(ndi) else None
            rows.append((width, height, floor, shm_round_trip(frame, count), zmq_round_trip(frame, count), ndi_row))

    print(f"Round trip of one RGBA frame to an echo process and back: median of "
          f"{' / '.join(map(str, ROUND_TRIPS.values()))} trips "
          f"(NDI: {' / '.join(map(str, NDI_ROUND_TRIPS.values()))}).")
    print(f"one copy: numpy copying the frame into a reused buffer. A shm round trip makes {SHM_COPIES} copies; "
          "'not copying' is the rest of its time.")
    print()
    print(f"{'frame':>10} {'MB':>6} {'one copy':>9} {'shm rt':>9} {'/ copy':>7} {'target':>7} {'':<7}"
          f" {'not copying':>11} {'zmq rt':>9} {'target':>7} {'':<7} {'ndi rt':>9} {'/ zmq':>7}")
    for width, height, floor, shm, zmq, ndi_row in rows:
        ratio = shm / floor
        zmq_target, zmq_verdict = "-", ""  # set at 512x512 only
        if (width, height) == (512, 512):
            zmq_target, zmq_verdict = f"{ZMQ_TARGET_MS_512:g} ms", verdict(zmq * 1e3 < ZMQ_TARGET_MS_512)
        ndi_cells = "-"
        if ndi_row is not None:
            ndi_rt, resent = ndi_row
            ndi_cells = f"{ms(ndi_rt):>9} {ndi_rt / zmq:6.1f}x" + (f" ({resent} resent)" if resent else "")
        print(f"{f'{width}x{height}':>10} {width * height * 4 / 1e6:6.2f} {ms(floor):>9} {ms(shm):>9} "
              f"{ratio:6.1f}x {f'{SHM_TARGET_RATIO:g}x':>7} {verdict(ratio <= SHM_TARGET_RATIO):<7} "
              f"{ms(shm - SHM_COPIES * floor):>11} {ms(zmq):>9} {zmq_target:>7} {zmq_verdict:<7} {ndi_cells}")
    if not callable(ndi):
        print(f"\nndi: not measured: {ndi}")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def copy_floor(frame: np.ndarray, count: int) -> float:
    target = np.empty_like(frame)
    times = []
    for _ in range(WARMUP + count):
        start = time.perf_counter()
        np.copyto(target, frame)
        times.append(time.perf_counter() - start)
    return statistics.median(times[WARMUP:])


def shm_round_trip(frame: np.ndarray, count: int) -> float:
    height, width, _ = frame.shape
    outbound = RingWriter.create(width, height)
    echo = start_echo("shm", "--ring", outbound.name)
    try:
        with RingReader.attach(wait_for_line(echo)) as returning:  # the echo's ring
            received = np.empty_like(frame)
            times = []
            for seq in range(WARMUP + count):
                start = time.perf_counter()
                outbound.write(frame, seq, time.monotonic_ns())
                while (got := returning.read_latest(received)) is None or got.seq != seq:
                    check_deadline(start)
                times.append(time.perf_counter() - start)
    finally:
        outbound.close()  # the echo sees the shutdown flag and exits
        finish(echo)
    return statistics.median(times[WARMUP:])


def echo_shm(ring_name: str) -> None:
    """Echo process: copy every frame from the given ring into a ring of its own."""
    inbound = RingReader.attach(ring_name)
    with RingWriter.create(inbound.width, inbound.height, inbound.format) as outbound:
        print(outbound.name, flush=True)
        received = np.empty((inbound.height, inbound.width, 4), np.uint8)
        while inbound.writer_alive(TIMEOUT_S):
            got = inbound.read_latest(received)
            if got is not None:
                outbound.write(got.pixels, got.seq, got.t_capture_ns)
    inbound.close()


def zmq_round_trip(frame: np.ndarray, count: int) -> float:
    echo = start_echo("zmq")
    try:
        with HostSocket(wait_for_line(echo)) as host:  # the echo's address
            host.ping(TIMEOUT_S)  # connected
            times = []
            for seq in range(WARMUP + count):
                header = FrameHeader.for_array(frame, session="bench", seq=seq, t_capture_ns=time.monotonic_ns())
                start = time.perf_counter()
                while not host.send_frame(header, frame):
                    check_deadline(start)
                while (got := host.recv_latest_frame(TIMEOUT_S)) is None or got.header.seq != seq:
                    check_deadline(start)
                times.append(time.perf_counter() - start)
            host.request(Bye(session="bench"), TIMEOUT_S)  # the echo exits
    finally:
        finish(echo)
    return statistics.median(times[WARMUP:])


def echo_zmq() -> None:
    """Echo process: send every frame straight back to the host it came from, until bye."""
    engine = EngineSocket("tcp://127.0.0.1:*")
    print(engine.address, flush=True)
    while True:
        inbox = engine.poll(0.1)
        for received in inbox.frames:
            engine.send_frame(received.sender, received.header, received.pixels)
        for request in inbox.requests:
            engine.reply_ok(request)
            if isinstance(request.message, Bye):
                engine.close(linger_s=TIMEOUT_S)  # the reply goes out first
                return


def ndi_unavailable() -> str | None:
    """Why NDI cannot be measured here, or None."""
    try:
        import cyndilib  # noqa: F401
    except ImportError as error:
        return f"cyndilib is not installed ({error}); pip install .[ndi]"
    import ndi_network

    return ndi_network.missing()


@contextlib.contextmanager
def ndi_echo():
    """Yields a function timing NDI round trips (frame, count) -> (median seconds, frames resent),
    or, where NDI cannot run here, the reason."""
    why = ndi_unavailable()
    if why is not None:
        yield why
        return
    import ndi_network

    with tempfile.TemporaryDirectory() as folder, ndi_network.NdiNetwork.start(Path(folder)) as network:
        os.environ.update(network.environment())  # for this process's NDI and the echo's
        echo = start_echo("ndi")
        try:
            wait_for_line(echo)
            from bridge.ndi import NdiReceiver, NdiSender

            with NdiSender(NDI_OUT, fps=60) as sender, NdiReceiver(NDI_BACK, format="rgba8") as receiver:
                yield lambda frame, count: ndi_round_trip(sender, receiver, frame, count)
        finally:
            echo.terminate()
            finish(echo)


def ndi_round_trip(sender, receiver, frame: np.ndarray, count: int) -> tuple[float, int]:
    times, resent = [], 0
    seq = 1_000_000 * frame.shape[1]  # each size its own numbers: nothing of the last size is taken for this one
    for trip in range(-1, WARMUP + count):  # trip -1: until the echo and both connections are up
        seq += 1
        start = time.perf_counter()
        sender.send(frame, "rgba8", seq=seq)
        last_sent = start
        while (got := receiver.receive()) is None or got.seq != seq:
            now = time.perf_counter()
            if now - last_sent > NDI_RESEND_S:
                sender.send(frame, "rgba8", seq=seq)
                last_sent, resent = now, resent + (trip >= WARMUP)
            check_deadline(start)
            time.sleep(NDI_POLL_S)
        if trip >= WARMUP:
            times.append(time.perf_counter() - start)
    return statistics.median(times), resent


def echo_ndi() -> None:
    """Echo process: receive NDI_OUT's frames and send each back, seq and all, as NDI_BACK (until killed)."""
    from bridge.ndi import NdiReceiver, NdiSender

    with NdiReceiver(NDI_OUT, format="rgba8") as receiver, NdiSender(NDI_BACK, fps=60) as sender:
        print("ready", flush=True)
        while True:
            got = receiver.receive()
            if got is None:
                time.sleep(NDI_POLL_S)
                continue
            sender.send(got.pixels, "rgba8", t_capture_ns=got.t_capture_ns, seq=got.seq)


def start_echo(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--echo", *args], stdout=subprocess.PIPE, text=True)


def wait_for_line(process: subprocess.Popen) -> str:
    line = process.stdout.readline().strip()
    if not line:
        raise RuntimeError(f"echo process exited early with status {process.wait()}")
    return line


def finish(process: subprocess.Popen) -> None:
    """Wait for an echo process to exit by itself (so it cleans up), else kill it."""
    try:
        process.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    process.stdout.close()


def check_deadline(start: float) -> None:
    if time.perf_counter() - start > TIMEOUT_S:
        raise TimeoutError("the echo process stopped answering")


if __name__ == "__main__":
    main()
