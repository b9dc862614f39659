"""Soak: the tiny engine serving hosts that come and go, for N minutes.

    python bench/soak.py --minutes 60 [--hosts 4] [--restart-at 0.5] [--sample-s 60] [--json FILE]

The engine runs as `python -m engine serve --model tiny` in a child process. Each host
is a thread with an EngineClient: it picks shared memory or ZeroMQ at random, streams
a test pattern at --fps, changes live parameters now and then, and after a random
while says bye, pauses and comes back. Once (at --restart-at of the run) the engine is
stopped and started again at the same address; the hosts reconnect by themselves.

Every --sample-s seconds it prints one line: the engine's memory (RSS, and device
memory allocated when it runs on a GPU), its open file descriptors, the shared-memory
segments of this run, glass-to-glass latency percentiles of that period's outputs and
frame counts. When a host closes a session it settles where every frame went
(see `settle`); a frame neither answered nor counted as dropped is reported as lost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bridge.client import EngineClient  # noqa: E402
from bridge.launcher import EngineProcess, EngineStartError  # noqa: E402
from bridge.shm import list_rings  # noqa: E402
from engine.cli import test_pattern  # noqa: E402

HOST_SIZE = 64
PROMPTS = ("a watercolour painting", "a charcoal drawing", "neon city at night", "an oil painting of the sea")
DRAIN_S = 1.5  # after the last frame, how long a leaving host keeps receiving before it settles up
FRAMES_PER_CHUNK = 4  # frames a step takes after the first chunk


# ------------------------------------------------------------------------ the engine


class Engine:
    """`python -m engine serve --model tiny` as a child process (bridge.launcher), once it answers."""

    def __init__(self, address: str, model_size: str, log_path: Path, session_timeout_s: float):
        self.launched = EngineProcess.start(model="tiny", bind=address, cwd=REPO, log_file=log_path,
                                            args=["--size", model_size, "--session-timeout", str(session_timeout_s)])
        try:
            self.address = self.launched.wait_until_ready()
        except EngineStartError as error:
            raise SystemExit(f"the engine did not start: {error}") from None
        self.pid = self.launched.pid

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self) -> int:
        """A shutdown request, as hosts stop it; its exit code."""
        return self.launched.stop(timeout_s=60)


def segments_of(pids: set[int]) -> int:
    """Shared-memory segments (control and frame blocks) of rings these processes own."""
    return sum(len(ring.segments) for ring in list_rings() if ring.owner_pid in pids)


# ------------------------------------------------------------------------ the hosts


@dataclass
class Tally:
    """Shared by the host threads; guarded by lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies_ms: list[float] = field(default_factory=list)  # this period's outputs
    sent: int = 0
    not_sent: int = 0
    received: int = 0
    skipped: int = 0
    engine_dropped: int = 0  # frames the engine dropped as stale, from settled sessions
    sessions: int = 0  # sessions opened
    settled: int = 0  # sessions closed with every frame accounted for
    interrupted: int = 0  # sessions that lived through an engine restart (not settled: the engine's counts died)
    lost: list[dict] = field(default_factory=list)  # settlements that did not add up
    device_memory: int | None = None
    errors: list[str] = field(default_factory=list)


def settle(client: EngineClient) -> dict:
    """Where a leaving host's frames went, from its counters and the engine's stats.

    The host has stopped sending and drained its outputs; then, with the engine's
    counts `before` and `after` a last drain:
    inputs_waiting  frames handed over that the engine neither processed nor dropped:
                    exactly those in its inbox (frames_waiting) once its counts have
                    settled, nothing being in transit any more
    outputs_waiting frames processed but not yet sent or dropped: the stream batch's
                    lag, a chunk whose step is running, and the outbox (the last chunk's
                    frames and those of the chunk before, still going out): 3 chunks
    outputs         sent by the engine before the last drain <= received or skipped by
                    the host <= sent by the engine after it
    """
    before = settled_stats(client)
    drain(client, DRAIN_S / 3)
    after = client.stats()
    counters = client.counters
    handed = counters.sent - counters.not_sent
    inputs_waiting = handed - before["frames_processed"] - before["frames_dropped"]
    outputs_waiting = before["frames_processed"] - before["frames_out"] - before["outputs_dropped"]
    accounted_outputs = counters.received + counters.skipped
    ok = (inputs_waiting == before["frames_waiting"]
          and 0 <= outputs_waiting <= before["lag_frames"] + 3 * max(FRAMES_PER_CHUNK, before["next_chunk_frames"])
          and before["frames_out"] <= accounted_outputs <= after["frames_out"])
    return {"ok": ok, "inputs_waiting": inputs_waiting, "outputs_waiting": outputs_waiting,
            "accounted_outputs": accounted_outputs, "counters": counters.as_dict(), "before": before, "after": after}


def settled_stats(client: EngineClient, patience_s: float = 30.0) -> dict:
    """The session's stats once the engine has stopped taking in its frames: on a busy
    machine a step can take longer than the drain, and a chunk still being taken would
    look like frames gone missing."""
    stats = client.stats()
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        drain(client, 0.5)
        again = client.stats()
        if all(again[name] == stats[name] for name in ("frames_in", "frames_processed", "frames_dropped", "frames_out")):
            return again
        stats = again
    return stats


def drain(client: EngineClient, seconds: float, tally: Tally | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        output = client.receive(0.05)
        if output is not None and tally is not None:
            with tally.lock:
                tally.latencies_ms.append(output.latency_ms)


def fold(client: EngineClient, folded: dict[str, int], tally: Tally) -> None:
    """Add what the client counted since the last fold into the tally."""
    counters = client.counters.as_dict()
    with tally.lock:
        for name in ("sent", "not_sent", "received", "skipped"):
            setattr(tally, name, getattr(tally, name) + counters[name] - folded.get(name, 0))
    folded.update(counters)


def host(index: int, address_of: callable, restarts: list, tally: Tally, stop: threading.Event,
         fps: float, seed: int) -> None:
    rng = random.Random(seed + index)
    frames = test_pattern(32, HOST_SIZE, HOST_SIZE)
    while not stop.is_set():
        transport = rng.choice(["shm", "zmq"])
        stay_s = rng.uniform(10, 40)
        restarts_before = len(restarts)
        try:
            client = EngineClient(address_of(), transport=transport, width=HOST_SIZE, height=HOST_SIZE,
                                  timeout_s=30, prompt=rng.choice(PROMPTS)).open()
        except (TimeoutError, ConnectionError):
            time.sleep(1)  # the engine is restarting
            continue
        with tally.lock:
            tally.sessions += 1
        first_session = client.session
        folded: dict[str, int] = {}
        started = time.monotonic()
        next_change = started + rng.uniform(2, 8)
        n = 0
        try:
            while time.monotonic() - started < stay_s and not stop.is_set():
                client.send(frames[n % len(frames)])
                n += 1
                if n % 16 == 0:
                    fold(client, folded, tally)
                output = client.receive(1 / fps)
                if output is not None:
                    with tally.lock:
                        tally.latencies_ms.append(output.latency_ms)
                if time.monotonic() >= next_change:
                    next_change = time.monotonic() + rng.uniform(2, 8)
                    client.set(**rng.choice([{"prompt": rng.choice(PROMPTS)}, {"strength": rng.uniform(0.3, 0.9)},
                                             {"seed": rng.randrange(1000)}]))
            settlement = None
            if len(restarts) == restarts_before and client.session == first_session:
                drain(client, DRAIN_S, tally)
                settlement = settle(client)
                if len(restarts) != restarts_before or client.session != first_session:
                    settlement = None  # the engine restarted meanwhile
        except Exception as error:  # noqa: BLE001 - reported in the summary, the soak goes on
            with tally.lock:
                tally.errors.append(f"host {index}: {type(error).__name__}: {error}")
            settlement = None
        finally:
            client.close()
        fold(client, folded, tally)
        with tally.lock:
            if settlement is None:
                tally.interrupted += 1
            else:
                tally.settled += 1
                tally.engine_dropped += settlement["after"]["frames_dropped"]
                tally.device_memory = settlement["after"].get("device_memory_allocated")
                if not settlement["ok"]:
                    tally.lost.append(settlement)
        stop.wait(rng.uniform(0, 3))


# ------------------------------------------------------------------------ the run


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run(minutes: float, hosts: int, fps: float, restart_at: float | None, sample_s: float, model_size: str,
        session_timeout_s: float, seed: int, log_path: Path) -> dict:
    engine = Engine("tcp://127.0.0.1:*", model_size, log_path, session_timeout_s)
    engines = [engine]
    restarts: list[float] = []
    tally = Tally()
    stop = threading.Event()
    time.sleep(2.0)  # the model loads
    baseline = {"rss": engine.rss_bytes(), "fds": engine.open_fds()}
    threads = [threading.Thread(target=host, args=(i, lambda: engine.address, restarts, tally, stop, fps, seed),
                                daemon=True) for i in range(hosts)]
    for thread in threads:
        thread.start()
    samples = []
    started = time.monotonic()
    end = started + minutes * 60
    restart_time = None if restart_at is None else started + restart_at * minutes * 60
    next_sample = started + sample_s
    print(f"{'t (min)':>7} {'engine':>6} {'RSS MB':>7} {'GPU MB':>7} {'fds':>4} {'segs':>4} {'p50 ms':>7} "
          f"{'p90 ms':>7} {'p99 ms':>7} {'sent':>6} {'recv':>6} {'drop':>6} {'sess':>5} {'lost':>4}", flush=True)
    try:
        while time.monotonic() < end:
            now = time.monotonic()
            if restart_time is not None and now >= restart_time:
                restart_time = None
                address = engine.address
                restarts.append(now)
                engine.stop()
                engine = Engine(address, model_size, log_path, session_timeout_s)
                engines.append(engine)
            if engine.launched.returncode is not None:
                raise SystemExit(f"the engine {engine.launched.describe()}; see {log_path}")
            if now >= next_sample:
                next_sample += sample_s
                samples.append(sample(now - started, engine, len(engines), tally))
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        time.sleep(1.0)  # let the engine close the last sessions
        final = {"rss": engine.rss_bytes(), "fds": engine.open_fds(),
                 "segments": segments_of({engine.pid, os.getpid()})}
        exit_code = engine.stop()
    return {"baseline": baseline, "samples": samples, "restarts": len(restarts), "final": final,
            "engine_exit_code": exit_code, "sessions": tally.sessions, "settled": tally.settled,
            "interrupted": tally.interrupted, "lost": tally.lost, "errors": tally.errors,
            "totals": {"sent": tally.sent, "not_sent": tally.not_sent, "received": tally.received,
                       "skipped": tally.skipped, "engine_dropped": tally.engine_dropped}}


def sample(elapsed_s: float, engine: Engine, engine_number: int, tally: Tally) -> dict:
    with tally.lock:
        latencies, tally.latencies_ms = tally.latencies_ms, []
        row = {"t_min": elapsed_s / 60, "engine": engine_number, "rss_bytes": engine.rss_bytes(),
               "device_memory_allocated": tally.device_memory, "fds": engine.open_fds(),
               "segments": segments_of({engine.pid, os.getpid()}),
               "p50_ms": percentile(latencies, 50), "p90_ms": percentile(latencies, 90),
               "p99_ms": percentile(latencies, 99), "outputs": len(latencies), "sent": tally.sent,
               "received": tally.received, "dropped": tally.not_sent + tally.skipped + tally.engine_dropped,
               "sessions": tally.sessions, "lost": len(tally.lost)}
    gpu = "-" if row["device_memory_allocated"] is None else f"{row['device_memory_allocated'] / 2**20:.0f}"

    def ms(value):
        return "-" if value is None else f"{value:.0f}"

    print(f"{row['t_min']:7.1f} {engine_number:6d} {row['rss_bytes'] / 2**20:7.1f} {gpu:>7} {row['fds']:4d} "
          f"{row['segments']:4d} {ms(row['p50_ms']):>7} {ms(row['p90_ms']):>7} {ms(row['p99_ms']):>7} "
          f"{row['sent']:6d} {row['received']:6d} {row['dropped']:6d} {row['sessions']:5d} {row['lost']:4d}",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--fps", type=float, default=10.0, help="each host's frame rate")
    parser.add_argument("--restart-at", type=float, default=0.5,
                        help="when to restart the engine, as a fraction of the run; negative: never")
    parser.add_argument("--sample-s", type=float, default=60.0, help="seconds between table rows")
    parser.add_argument("--model-size", default="32x32")
    parser.add_argument("--session-timeout", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", default="out/soak-engine.log", help="the engine's log")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    result = run(args.minutes, args.hosts, args.fps, None if args.restart_at < 0 else args.restart_at, args.sample_s,
                 args.model_size, args.session_timeout, args.seed, Path(args.log))
    totals = result["totals"]
    print(f"sessions {result['sessions']} (settled {result['settled']}, across the restart {result['interrupted']}); "
          f"engine restarts {result['restarts']}; frames sent {totals['sent']}, received {totals['received']}, "
          f"not sent (no session or queue full) {totals['not_sent']}, outputs skipped {totals['skipped']}, "
          f"dropped by the engine {totals['engine_dropped']}; sessions with frames unaccounted for "
          f"{len(result['lost'])}; segments left {result['final']['segments']}; errors {len(result['errors'])}")
    for error in result["errors"][:10]:
        print("  " + error)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
