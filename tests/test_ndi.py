"""NDI with the real NDI runtime (cyndilib's libndi), over loopback in a private NDI network
(tests/ndi_network.py: its own D-Bus and avahi-daemon, NDI allowed 127.0.0.1 only).

A test sender (tests/ndi_peer.py) sends a generated pattern as an NDI source; `serve
--ndi-in --ndi-out` (tiny model) receives it and publishes its output; a test receiver gets
the stylised frames. Each peer is a process of its own, as NDI applications are. A host
opens an `ndi` session through EngineClient as well, and sets its parameters.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ndi_network
from bridge.client import EngineClient, RemoteError
from processes import PATIENCE_S, ServedEngine

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
PEER = TESTS / "ndi_peer.py"


def _why_not() -> str | None:
    try:
        import cyndilib  # noqa: F401
    except ImportError as error:
        return f"cyndilib is not installed ({error}): pip install cyndilib (the ndi extra; make test installs it)"
    return ndi_network.missing()


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    why = _why_not()
    if why is not None:
        pytest.skip(why)
    with ndi_network.NdiNetwork.start(tmp_path_factory.mktemp("ndi")) as started:
        yield started


def peer(network, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(PEER), *args], env={**os.environ, **network.environment()},
                            text=True, **popen)


def sent_stamps(process: subprocess.Popen) -> dict[int, str]:
    """t_capture_ns -> size, from a finished sender's output."""
    out, _ = process.communicate(timeout=PATIENCE_S)
    stamps = {}
    for line in out.splitlines():
        _, _, t_capture_ns, size = line.split()
        stamps[int(t_capture_ns)] = size
    return stamps


def received(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def wait_until(condition, what: str, engine) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}:\n{engine.log()[-4000:]}"
        time.sleep(0.1)


def test_the_devices_command_lists_an_ndi_source_by_the_name_serve_takes(network):
    sender = peer(network, "send", "camera", str(PATIENCE_S), "64x48", stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + PATIENCE_S
        while True:  # NDI announces a new source within a second or two
            listed = subprocess.run([sys.executable, "-m", "engine", "devices"], capture_output=True, text=True,
                                    env={**os.environ, **network.environment()}, timeout=PATIENCE_S).stdout
            rows = [line for line in listed.splitlines() if line.startswith("ndi")]
            if any("(camera)" in row for row in rows) or time.monotonic() > deadline:
                break
        assert any("(output)" in row and " yes " in row for row in rows), listed
        assert any("(camera)" in row and "serve --ndi-in takes this name" in row for row in rows), listed
    finally:
        sender.terminate()
        sender.communicate(timeout=PATIENCE_S)


def test_serve_ndi_in_and_out_follows_a_sender_that_vanishes_returns_and_changes_size(network, tmp_path):
    first = peer(network, "send", "camera", "6", "64x48", stdout=subprocess.PIPE)
    engine = ServedEngine(tmp_path, "--ndi-in", "camera", "--ndi-out", "stylised", "--ndi-size", "48x40",
                          "--prompt", "ink", env=network.environment())
    out = tmp_path / "received.json"
    receiver = peer(network, "receive", "stylised", "120", str(out))
    try:
        assert "NDI: reading source 'camera', publishing 'stylised' at 48x40" in engine.log()
        wait_until(lambda: len(received(out)) >= 8, "the first stylised frames", engine)
        first_stamps = sent_stamps(first)  # the first sender is gone now

        # It vanished; the engine waits. Back, and halfway through at another size.
        time.sleep(1.0)
        second = peer(network, "send", "camera", "8", "64x48", "96x80", stdout=subprocess.PIPE)
        second_stamps = sent_stamps(second)
        later = [stamp for stamp, size in second_stamps.items() if size == "96x80"]
        wait_until(lambda: any(frame["t_capture_ns"] in later for frame in received(out)),
                   "outputs of frames sent at the new size", engine)
        frames = received(out)

        # Stylised frames of the session's size, each echoing a capture time the senders sent, in order.
        assert {(frame["width"], frame["height"]) for frame in frames} == {(48, 40)}
        # NDI delivers metadata beside video, not inside it: a stamp that comes too late to be
        # paired leaves a frame with its NDI submission time (counted, and rare).
        stamped = [frame for frame in frames if frame["stamped"]]
        assert len(stamped) >= 0.9 * len(frames), f"{len(frames) - len(stamped)} of {len(frames)} unstamped"
        stamps = [frame["t_capture_ns"] for frame in stamped]
        sent = set(first_stamps) | set(second_stamps)
        # Each echoes a stamp sent; a frame whose stamp NDI delivered too late to pair carries
        # its NDI submission time instead, near its stamp: a millisecond or so, tens of them
        # when the machine is busy (two copies of the suite at once took 5 ms and more).
        unpaired = [stamp for stamp in stamps if stamp not in sent]
        assert len(unpaired) <= max(1, len(stamps) // 20), unpaired
        assert all(min(abs(stamp - other) for other in sent) < 100_000_000 for stamp in unpaired)
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        assert any(stamp in first_stamps for stamp in stamps) and any(stamp in second_stamps for stamp in stamps)
        latencies_ms = [(frame["received_ns"] - frame["t_capture_ns"]) / 1e6 for frame in frames]
        assert all(0 < latency < 60_000 for latency in latencies_ms)
        assert "session ndi closed" not in engine.log()
    finally:
        receiver.kill()
        receiver.wait()
        code = engine.stop()
    assert code == 0, engine.log()
    assert engine.process.poll() is not None
    # The engine's NDI source went with it.
    listing = peer(network, "list", "2", stdout=subprocess.PIPE)
    names, _ = listing.communicate(timeout=PATIENCE_S)
    assert not any(name.endswith("(stylised)") for name in names.splitlines()), names


def test_a_host_opens_an_ndi_session_through_the_client_and_sets_its_parameters(network, tmp_path):
    sender = peer(network, "send", "host camera", "30", "64x48", stdout=subprocess.DEVNULL)
    engine = ServedEngine(tmp_path, env=network.environment())
    out = tmp_path / "received.json"
    receiver = None
    try:
        with EngineClient(engine.address, transport="ndi", width=48, height=40, timeout_s=PATIENCE_S, prompt="ink",
                          ndi_input="host camera", ndi_output="host stylised") as host:
            session = host.session
            assert host.info["schema"]["ndi_input"]["applies"] == "open"
            assert host.info["params"]["ndi_input"] == "host camera"
            assert host.info["params"]["ndi_output"] == "host stylised"
            receiver = peer(network, "receive", "host stylised", "60", str(out))
            wait_until(lambda: len(received(out)) >= 4, "stylised frames from the host's session", engine)
            assert {(frame["width"], frame["height"]) for frame in received(out)} == {(48, 40)}

            # Its parameters, live; its endpoints, fixed when it opened.
            changed = host.set(prompt="chalk", strength=0.6)
            assert changed["params"]["prompt"] == "chalk" and changed["params"]["strength"] == 0.6
            with pytest.raises(RemoteError) as refused:
                host.set(ndi_output="another")
            assert (refused.value.code, refused.value.field) == ("bad_value", "params.ndi_output")
            before = len(received(out))
            wait_until(lambda: len(received(out)) >= before + 4, "frames after the change", engine)
            stats = host.stats()
            assert stats["transport"] == "ndi" and stats["state"] == "streaming" and stats["frames_out"] > 0
            assert stats["params"]["prompt"] == "chalk"

            # No frames through the bridge: they come and go over NDI.
            assert host.receive(0.05) is None
            with pytest.raises(RuntimeError, match="ndi_input"):
                host.send(np.zeros((40, 48, 4), np.uint8))
        assert f"session {session} closed: the host said bye" in engine.log()
    finally:
        for process in (sender, receiver):
            if process is not None:
                process.kill()
                process.wait()
        assert engine.stop() == 0, engine.log()
