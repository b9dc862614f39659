"""The SLO policy against the published fixed policy, on the same simulated workloads.

    python bench/slo.py [--seconds 60] [--device memory,compute] [--fit FILE.json]

Fixed: one 4-frame chunk per step, stream batching always on, sessions in turn, every
frame queued until its turn (as published). SLO: engine/slo.py, its cost model
starting from the engine's warm-up (a few steady steps in each mode). Both run on the same
simulated device (engine/slo_sim.py) and simulated clock: 1, 2, 4 and 8 sessions at 16 FPS
with a 500 ms budget; steady input, bursty input (1 s at 32 FPS, 1 s at 8 FPS), and steady
input on a device that runs at half speed from mid-run. Device models (--device):

    memory   30 ms a forward (reading the weights) + 10 ms a latent row: shared forwards pay
    compute   0 ms a forward + 30 ms a latent row: a shared forward costs its sessions' forwards
    fitted   the cost per forward and per row fitted to a GPU's measured step times, from the
             JSON that `python bench/sessions.py --json FILE` writes (--fit FILE)

Throughput counts every frame delivered; a miss is a frame delivered after its budget. A row
meets the target when the SLO policy's miss rate is no higher than the fixed policy's and its
throughput at least as high (within 0.1%).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from engine.slo_sim import Device, Stream, bursty_captures, percentile, simulate, steady_captures

SESSIONS = (1, 2, 4, 8)
DEVICES = {"memory": (0.030, 0.010), "compute": (0.0, 0.030)}  # seconds per forward, per latent row


def fitted_device(path: str) -> tuple[float, float, str]:
    """(seconds per forward, per latent row, a description) fitted to bench/sessions.py's JSON:
    n stream-batched sessions of `steps` denoising steps, in turn (n forwards of `steps` rows
    each) and together (one forward of n x `steps` rows)."""
    with open(path) as file:
        measured = json.load(file)
    steps = measured["steps"]
    terms, seconds = [], []
    for row in measured["rows"]:
        n = row["sessions"]
        terms += [[n, n * steps], [1, n * steps]]
        seconds += [row["in_turn_s"], row["together_s"]]
    (per_forward, per_row), *_ = np.linalg.lstsq(np.array(terms, float), np.array(seconds), rcond=None)
    per_forward, per_row = max(float(per_forward), 0.0), max(float(per_row), 1e-6)
    return per_forward, per_row, f"{measured.get('preset')} at {measured.get('size')} on {measured.get('device')}"


def workloads(seconds: float, pass_s: float, row_s: float):
    """(name, streams for n sessions, device)"""
    steady = lambda n: [Stream(steady_captures(16, seconds, start_s=0.013 * i)) for i in range(n)]  # noqa: E731
    bursty = lambda n: [Stream(bursty_captures(8, 32, 1.0, seconds)) for _ in range(n)]  # noqa: E731
    yield "steady", steady, Device(pass_s, row_s)
    yield "bursty", bursty, Device(pass_s, row_s)
    yield "slowed x2 mid-run", steady, Device(pass_s, row_s, slow_after_s=seconds / 2)


def summary(results, seconds: float) -> tuple[float, float | None, float, float]:
    """Throughput (frames/s), p99 latency (ms), deadline-miss rate (%), frames/s on time."""
    latencies = [latency for result in results for latency in result.latencies_s]
    delivered = len(latencies)
    misses = sum(result.deadline_misses for result in results)
    p99 = percentile(latencies, 99)
    return (delivered / seconds, None if p99 is None else p99 * 1000, 100 * misses / max(delivered, 1),
            (delivered - misses) / seconds)


def table(seconds: float, pass_s: float, row_s: float) -> list[str]:
    """Print one device model's table; return the rows that miss the target."""
    print(f"{'workload':<18} {'n':>2} | {'fixed fps':>9} {'p99 ms':>8} {'miss %':>6} {'on time':>7} | "
          f"{'slo fps':>8} {'p99 ms':>8} {'miss %':>6} {'on time':>7} | verdict")
    missed = []
    for name, make_streams, device in workloads(seconds, pass_s, row_s):
        for n in SESSIONS:
            fixed = summary(simulate(make_streams(n), device, seconds, "fixed"), seconds)
            ours = summary(simulate(make_streams(n), device, seconds, "slo"), seconds)
            fewer_misses = ours[2] <= fixed[2]
            as_fast = ours[0] >= fixed[0] * 0.999
            verdict = "ok" if fewer_misses and as_fast else (
                "MORE MISSES" if not fewer_misses else "LOWER THROUGHPUT")
            if verdict != "ok":
                missed.append(f"{name} x{n}: {verdict.lower()}")
            print(f"{name:<18} {n:>2} | {fixed[0]:>9.1f} {_ms(fixed[1])} {fixed[2]:>6.1f} {fixed[3]:>7.1f} | "
                  f"{ours[0]:>8.1f} {_ms(ours[1])} {ours[2]:>6.1f} {ours[3]:>7.1f} | {verdict}")
    return missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="simulated seconds per run")
    parser.add_argument("--device", default="memory,compute",
                        help="device models, comma-separated: memory, compute, fitted (needs --fit)")
    parser.add_argument("--fit", metavar="FILE", help="bench/sessions.py --json output: adds the fitted device")
    args = parser.parse_args()
    names = [name.strip() for name in args.device.split(",") if name.strip()]
    if args.fit and "fitted" not in names:
        names.append("fitted")
    devices = {}
    for name in names:
        if name == "fitted":
            if not args.fit:
                parser.error("--device fitted needs --fit FILE (from bench/sessions.py --json FILE)")
            per_forward, per_row, source = fitted_device(args.fit)
            devices[f"fitted to {source}"] = (per_forward, per_row)
        elif name in DEVICES:
            devices[name + "-bound"] = DEVICES[name]
        else:
            parser.error(f"unknown device model {name!r}: memory, compute or fitted")

    missed = {}
    for label, (pass_s, row_s) in devices.items():
        print(f"\n{label} device: {pass_s * 1000:.1f} ms a forward + {row_s * 1000:.1f} ms a latent row, "
              f"{args.seconds:g} simulated s a run")
        missed[label] = table(args.seconds, pass_s, row_s)
    print()
    for label, rows in missed.items():
        if rows:
            print(f"{label}: {len(rows)} row(s) miss the target (no more misses at equal or higher throughput): "
                  + "; ".join(rows))
        else:
            print(f"{label}: every row meets the target (no more misses at equal or higher throughput)")


def _ms(value: float | None) -> str:
    return f"{'-':>8}" if value is None else f"{value:>8.0f}"


if __name__ == "__main__":
    main()
