"""The SLO policy against the published fixed policy, on the same simulated workloads.

    python bench/slo.py [--seconds 60]

Fixed: one 4-frame chunk per step, stream batching always on, sessions in turn, every
frame queued until its turn (as published). SLO: engine/slo.py, its cost model
starting from the engine's warm-up (a few steady steps in each mode). Both run on the same
simulated memory-bound device (engine/slo_sim.py) and simulated clock: 1, 2, 4 and 8
sessions at 16 FPS with a 500 ms budget; steady input, bursty input (1 s at 32 FPS,
1 s at 8 FPS), and steady input on a device that runs at half speed from mid-run.
Throughput counts every frame delivered; a miss is a frame delivered after its budget.
"""

from __future__ import annotations

import argparse

from engine.slo_sim import Device, Stream, bursty_captures, percentile, simulate, steady_captures

SESSIONS = (1, 2, 4, 8)


def workloads(seconds: float):
    """(name, streams for n sessions, device)"""
    steady = lambda n: [Stream(steady_captures(16, seconds, start_s=0.013 * i)) for i in range(n)]  # noqa: E731
    bursty = lambda n: [Stream(bursty_captures(8, 32, 1.0, seconds)) for _ in range(n)]  # noqa: E731
    yield "steady", steady, Device()
    yield "bursty", bursty, Device()
    yield "slowed x2 mid-run", steady, Device(slow_after_s=seconds / 2)


def summary(results, seconds: float) -> tuple[float, float | None, float, float]:
    """Throughput (frames/s), p99 latency (ms), deadline-miss rate (%), frames/s on time."""
    latencies = [latency for result in results for latency in result.latencies_s]
    delivered = len(latencies)
    misses = sum(result.deadline_misses for result in results)
    p99 = percentile(latencies, 99)
    return (delivered / seconds, None if p99 is None else p99 * 1000, 100 * misses / max(delivered, 1),
            (delivered - misses) / seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="simulated seconds per run")
    seconds = parser.parse_args().seconds

    print(f"{'workload':<18} {'n':>2} | {'fixed fps':>9} {'p99 ms':>8} {'miss %':>6} {'on time':>7} | "
          f"{'slo fps':>8} {'p99 ms':>8} {'miss %':>6} {'on time':>7} | verdict")
    failures = 0
    for name, make_streams, device in workloads(seconds):
        for n in SESSIONS:
            fixed = summary(simulate(make_streams(n), device, seconds, "fixed"), seconds)
            ours = summary(simulate(make_streams(n), device, seconds, "slo"), seconds)
            fewer_misses = ours[2] <= fixed[2]
            as_fast = ours[0] >= fixed[0] * 0.999
            verdict = "ok" if fewer_misses and as_fast else (
                "MORE MISSES" if not fewer_misses else "LOWER THROUGHPUT")
            failures += verdict != "ok"
            print(f"{name:<18} {n:>2} | {fixed[0]:>9.1f} {_ms(fixed[1])} {fixed[2]:>6.1f} {fixed[3]:>7.1f} | "
                  f"{ours[0]:>8.1f} {_ms(ours[1])} {ours[2]:>6.1f} {ours[3]:>7.1f} | {verdict}")
    print(f"\n{failures} workload(s) where the SLO policy does not have no more misses at equal or higher throughput")


def _ms(value: float | None) -> str:
    return f"{'-':>8}" if value is None else f"{value:>8.0f}"


if __name__ == "__main__":
    main()
