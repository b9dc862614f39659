"""The OBS script in the real OBS Studio, headless, with a real tiny engine on 127.0.0.1.

OBS runs under Xvfb through the harness in ../shared/tools/obs-headless (CI keeps a
copy of shared/ beside the clone), and loads tests/obs_harness_wrapper.py: the real
script, plus a report of what it captures, what it pushes into its output source, and
what OBS then renders of that source, read back from the GPU. One OBS run goes through
what a streamer sees:

0. OBS starts before the engine: the status says no engine answers;
1. the engine starts (`python -m engine serve --model tiny`): a known pattern, an image
   source of four coloured quarters, goes through it, and the output source shows the
   engine's frames, at the output size, changing as the engine's output changes;
2. the engine is killed mid-stream: the status says so, and OBS keeps rendering;
3. an engine starts again at the same address: the stream resumes by itself;
4. OBS closes: the script unloads with no leaked reference and no traceback.

Needs `obs` and `Xvfb` (apt-get install obs-studio xvfb), and a test Python of the same
version as the one OBS embeds (/usr/bin/python3 on Debian): OBS loads this environment's
numpy and pyzmq. Skips, saying which, where any of that is missing.
"""

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from processes import REPO, ServedEngine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

HARNESS = REPO.parent / "shared" / "tools" / "obs-headless" / "run-obs-script.sh"
WRAPPER = REPO / "tests" / "obs_harness_wrapper.py"
RUN_S = 40  # how long OBS runs after start-up; the three phases need about half of it
PHASE_S = 30  # the longest any one phase may take
SCHEDULED = re.compile(r"(meeting targets|over budget|frame rate lowered|warming up), "
                       r"(stream-batched|steps in turn), chunks of (4|8) frames")
SIZE = 512
FRAME_INTERVAL_MS = 1000 / 30  # OBS and the script both at 30 frames/s
QUARTER_COLOURS = [(230, 30, 30), (30, 200, 40), (40, 60, 220), (240, 220, 40)]  # TL, TR, BL, BR


def _missing() -> str | None:
    if not HARNESS.is_file():
        return f"the OBS harness is not at {HARNESS} (shared/ beside the clone)"
    for program, package in (("obs", "obs-studio"), ("Xvfb", "xvfb")):
        if shutil.which(program) is None:
            return f"{program} is not installed (apt-get install {package})"
    system_python = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(*sys.version_info[:2])"],
                                   capture_output=True, text=True).stdout.split()
    if system_python != [str(v) for v in sys.version_info[:2]]:
        return (f"OBS embeds Python {'.'.join(system_python) or '(none found)'}, the tests run "
                f"{sys.version_info[0]}.{sys.version_info[1]}: OBS could not load this environment's numpy")
    return None


def write_pattern_png(path: Path, width: int = 640, height: int = 360) -> None:
    top_row, bottom_row = (b"\x00" + (bytes(left) + b"\xff") * (width // 2) + (bytes(right) + b"\xff") * (width // 2)
                           for left, right in (QUARTER_COLOURS[:2], QUARTER_COLOURS[2:]))
    rows = top_row * (height // 2) + bottom_row * (height // 2)  # each row: filter byte 0, then RGBA pixels

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_report(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def wait_for(report_path: Path, harness: subprocess.Popen, what: str, condition) -> dict:
    deadline = time.monotonic() + PHASE_S
    while True:
        report = read_report(report_path)
        if report is not None and report.get("status") and condition(report):
            return report
        if harness.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"OBS never showed that {what}; last report: {json.dumps(report)[:3000]}")
        time.sleep(0.2)


def near(a: list, b: list, tolerance: float) -> bool:
    return all(abs(x - y) <= tolerance for pa, pb in zip(a, b, strict=True) for x, y in zip(pa, pb, strict=True))


def matches_a_pushed_frame(read_back: dict, report: dict) -> bool:
    return any(near(read_back["quarters"], pushed["quarters"], 1.0) for pushed in report["pushed"])


@pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
def test_the_script_streams_through_the_engine_in_obs_and_rides_out_an_engine_restart(tmp_path):
    pattern, report_path = tmp_path / "pattern.png", tmp_path / "report.json"
    write_pattern_png(pattern)
    address = f"tcp://127.0.0.1:{free_port()}"
    engine = None
    settings = {
        "address": address, "environment": sys.prefix, "model": "tiny", "input_source": "Test pattern",
        "target_fps": 30, "width": SIZE, "height": SIZE, "transport": "shm",
        "test_input_name": "Test pattern", "test_pattern": str(pattern), "test_report": str(report_path),
    }
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    harness_output = open(tmp_path / "harness.out", "w")
    harness = subprocess.Popen(
        [str(HARNESS), str(WRAPPER), str(RUN_S), str(tmp_path / "settings.json")], stdout=harness_output,
        stderr=subprocess.STDOUT, env=dict(os.environ, OBS_HARNESS_FAIL_ON_LEAKS="1",
                                           OBS_HARNESS_LOG_OUT=str(tmp_path / "obs.log")))
    started = time.monotonic()
    try:
        # 0. no engine yet: the status says so, the script goes on capturing; its properties are whole
        report = wait_for(report_path, harness, "that no engine answers", lambda r: (
            r["status"]["Engine"].startswith("unreachable") and "no engine answers" in r["status"]["Engine"]
            and r["status"]["Error"] == "none" and r["captured"] and r["properties"]))
        print(f"\n{time.monotonic() - started:.1f} s: no engine reported")
        properties = report["properties"]["found"]
        assert set(properties) >= {"address", "environment", "model", "start_engine", "stop_engine", "input_source",
                                   "prompt", "strength", "steps", "seed", "target_fps", "latency_ms", "width",
                                   "height", "transport", "refresh", "status_engine"}, properties
        assert properties["steps"]["label"] == "Steps (restarts the stream)"
        assert properties["width"]["label"] == "Output width (restarts the session)"
        assert properties["input_source"]["items"] == [["", False], ["Test pattern", False]]  # not its own output
        assert properties["transport"]["items"] == [["shm", False], ["zmq", False], ["spout", True]]  # no Spout here
        assert report["properties"]["refresh_returned"] is True

        # 1. the pattern goes through the engine and comes back into the output source
        engine = ServedEngine(tmp_path, address=address)
        report = wait_for(report_path, harness, "engine frames in the output source", lambda r: (
            r["status"]["Engine"].startswith("streaming")
            and len({json.dumps(b["quarters"]) for b in r["read_back"] if matches_a_pushed_frame(b, r)}) >= 2
            and SCHEDULED.match(r["status"]["Scheduler"])))  # the engine's stats, as the script shows them
        captured = report["captured"][-1]
        assert captured["size"] == [SIZE, SIZE]
        assert near(captured["quarters"], QUARTER_COLOURS, 3), captured  # the right way up, RGBA, cropped
        shown = [b for b in report["read_back"] if matches_a_pushed_frame(b, report)]
        assert all(b["size"] == [SIZE, SIZE] and b["source_size"] == [SIZE, SIZE] for b in shown)
        assert not near(shown[-1]["quarters"], QUARTER_COLOURS, 20)  # the engine's frame, not the input
        timer = report["snapshot"]["tick_ms"]
        assert timer["median"] < FRAME_INTERVAL_MS, report["status"]["Capture timer"]
        print(f"{time.monotonic() - started:.1f} s: engine frames shown; capture timer at {SIZE}x{SIZE}: "
              f"{report['status']['Capture timer']}")

        # 2. the engine dies mid-stream: the status says so, OBS keeps rendering
        engine.kill_with_its_tracker()
        report = wait_for(report_path, harness, "the engine went away", lambda r: (
            r["status"]["Engine"].startswith("disconnected") and "stopped answering" in r["status"]["Engine"]))
        frames_then, ticks_then, pushed_then = (report["snapshot"]["obs_frames"], report["ticks"],
                                                report["pushed"][-1]["t"])
        time.sleep(2)
        report = read_report(report_path)
        assert report["snapshot"]["obs_frames"] - frames_then >= 30, "OBS stopped rendering while the engine was away"
        assert report["ticks"] > ticks_then
        assert report["snapshot"]["tick_ms"]["median"] < FRAME_INTERVAL_MS, report["status"]["Capture timer"]
        print(f"{time.monotonic() - started:.1f} s: engine away reported, OBS rendering; capture timer: "
              f"{report['status']['Capture timer']}")

        # 3. an engine at the same address again: the stream resumes by itself
        engine = ServedEngine(tmp_path, address=address)
        report = wait_for(report_path, harness, "the stream resume", lambda r: (
            r["status"]["Engine"].startswith("streaming") and r["pushed"][-1]["t"] > pushed_then
            and any(b["t"] > pushed_then and matches_a_pushed_frame(b, r) for b in r["read_back"])))
        print(f"{time.monotonic() - started:.1f} s: stream resumed ({report['status']['Frames']})")

        # 4. OBS closes cleanly: script unloaded, no leaked reference, no traceback
        harness.wait(RUN_S + 60)
    finally:
        if harness.poll() is None:
            harness.terminate()  # the harness stops the OBS and Xvfb it started
            harness.wait(60)
        if engine is not None:
            engine.kill_with_its_tracker()
        harness_output.close()
    summary = (tmp_path / "harness.out").read_text()
    assert harness.returncode == 0, summary[-3000:]
    assert "RESULT: PASS" in summary and re.search(r"memory_leaks: 0\b", summary), summary[-3000:]
    assert read_report(report_path)["unloaded"] is True
