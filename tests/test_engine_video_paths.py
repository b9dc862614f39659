"""The engine's own video paths: Spout sessions (a host's, and the engine's own with no host)
and each session's virtual camera.

Spout cannot exist on Linux, so the engine meets the fake SpoutGL of tests/fake_spoutgl.py:
in this process through sys.modules, and in an engine process through PYTHONPATH
(tests/spoutgl/SpoutGL.py), the senders being files in a folder both processes see,
as Spout's shared memory is for real. The virtual camera is pyvirtualcam itself, which
on a Linux machine without v4l2loopback (CI) has no backend, or a fake backend
(test_virtualcam.py's) where frames must arrive.

Nothing here asserts timings: every wait is a generous deadline.
"""

import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fake_spoutgl import DXGI_B8G8R8A8, FOLDER_ENV, GL_BGRA_EXT, FakeReceiver, FakeSpoutMachine, convert
from processes import PATIENCE_S, ServedEngine as Engine
from test_virtualcam import fake_pyvirtualcam
from bridge import params as table
from bridge.client import EngineClient, RemoteError
from bridge.protocol import Bye, ParamsUpdate, StatsRequest
from bridge.virtualcam import V4L2LOOPBACK_MODPROBE
from bridge.zmq_io import HostSocket
from engine import cli
from engine.models.weights import build_models
from engine.pipeline import StreamSettings
from engine.server import EngineServer
from engine.session import Claim, Session, paced_outputs, session_routes
from engine.spout_io import SpoutSessionIO

pytestmark = pytest.mark.timeout(240)

SIZE = 64  # the sessions' frames; the engines' model works at 32x32
TESTS = Path(__file__).resolve().parent
no_camera_backend = pytest.mark.skipif(
    platform.system() != "Linux" or Path("/sys/module/v4l2loopback").exists(),
    reason="describes a Linux machine without v4l2loopback (as CI)")


def spout_environment(spout: FakeSpoutMachine) -> dict:
    """What an engine process needs to import the fake SpoutGL over `spout`'s senders."""
    return {"PYTHONPATH": os.pathsep.join([str(TESTS / "spoutgl"), str(TESTS)]), FOLDER_ENV: str(spout.folder)}


def rgba(rgb: np.ndarray) -> np.ndarray:
    return np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=-1)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def publish_without_drops(spout: FakeSpoutMachine, sender: str, frames: np.ndarray, host: EngineClient) -> None:
    """Draw each frame into the sender once the engine has taken the one before and the
    chunk being collected has room, so that no frame is skipped or dropped as stale."""
    for index, frame in enumerate(frames):
        def room():
            stats = host.stats()
            return stats["frames_in"] == index and index - stats["frames_processed"] < stats["next_chunk_frames"]

        wait_until(room, f"the engine to take frame {index - 1}")
        spout.publish(sender, rgba(frame), DXGI_B8G8R8A8)
    wait_until(lambda: host.stats()["frames_in"] == len(frames), "the engine to take the last frame")


def last_finished_seq(frames_sent: int, first_chunk: int, lag: int) -> int:
    """As in test_server.py: the newest input whose output can be out once frames_sent went in."""
    return first_chunk + 4 * ((frames_sent - first_chunk) // 4) - 1 - lag


def pyvirtualcams_reason() -> str:
    """What pyvirtualcam itself says when asked for a camera on this machine."""
    pyvirtualcam = pytest.importorskip("pyvirtualcam")
    with pytest.raises(RuntimeError) as direct:
        pyvirtualcam.Camera(SIZE, SIZE, 30)
    return str(direct.value)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A plain engine: no fake SpoutGL reaches it, as on any machine without Spout."""
    engine = Engine(tmp_path_factory.mktemp("engine"))
    yield engine
    assert engine.stop() == 0, engine.log()


# ------------------------------------------------------------------------------- Spout


def test_a_spout_sessions_thread_reads_a_bgra_sender_into_the_inbox_and_publishes_the_outputs(monkeypatch, tmp_path):
    """The thread alone, with the worker's part played here: colours can be compared exactly."""
    spout = FakeSpoutMachine(tmp_path)
    monkeypatch.setitem(sys.modules, "SpoutGL", spout.module())
    settings = StreamSettings(height=32, width=32)
    routes = {**session_routes("spout", table.defaults()), "spout_input": "TD out", "spout_output": "engine out"}
    session = Session("s1", None, "spout", SIZE, SIZE, settings, {}, routes, "ready")
    chunk_complete = threading.Event()
    spout_io = SpoutSessionIO(session, chunk_complete.set)
    spout_io.start()
    try:
        frames = cli.test_pattern(settings.first_chunk_frames, SIZE, SIZE)
        for index, frame in enumerate(frames):
            spout.publish("TD out", rgba(frame), DXGI_B8G8R8A8)
            wait_until(lambda: session.stats()["frames_in"] == index + 1, f"frame {index} to be taken in")
        assert chunk_complete.is_set()
        chunk = session.claim(Claim(take_chunk=True, frames_after=4))
        assert np.array_equal(np.stack([frame.rgb for frame in chunk]), frames)  # read as BGRA, reordered
        assert [frame.seq for frame in chunk] == list(range(len(frames)))
        assert spout.receivers[0].receive_formats[-1] == GL_BGRA_EXT  # in the sender's own byte order

        session.record(outputs=paced_outputs(chunk, frames, time.monotonic_ns()), step_seconds=0.1)
        wait_until(lambda: session.stats()["frames_out"] == len(frames), "the outputs to be published")
        published = spout.senders["engine out"]
        assert (published.width, published.height, published.dxgi_format) == (SIZE, SIZE, DXGI_B8G8R8A8)
        assert published.frame_count == len(frames)
        assert np.array_equal(convert(published.pixels, "BGRA", "RGBA"), rgba(frames[-1]))

        for index, frame in enumerate(cli.test_pattern(4, 48, 80)):  # another size: fitted to the session's
            spout.publish("TD out", rgba(frame))
            wait_until(lambda: session.stats()["frames_in"] == len(frames) + index + 1, "a resized frame")
        assert [frame.rgb.shape for frame in session.claim(Claim(take_chunk=True, frames_after=4))] == [(SIZE, SIZE, 3)] * 4
    finally:
        session.close()
        spout_io.stop()
    assert session.failure is None
    # Made, used and closed on its own thread, the sender before the receiver whose context it shared.
    assert spout.gl_contexts == {} and spout.senders.get("engine out") is None


def test_closing_a_spout_session_whose_driver_hangs_holds_up_the_io_thread_a_bounded_time(monkeypatch, tmp_path,
                                                                                            caplog):
    """The IO thread closes sessions, every host's frames wait meanwhile: a stuck Spout call
    costs them at most JOIN_TIMEOUT_S, and the session's thread closes Spout once it returns."""
    import engine.endpoints

    spout = FakeSpoutMachine(tmp_path)
    monkeypatch.setitem(sys.modules, "SpoutGL", spout.module())
    receiving, answer = threading.Event(), threading.Event()
    receive_image = FakeReceiver.receiveImage

    def hanging_receive_image(receiver, *args):
        receiving.set()
        answer.wait()
        return receive_image(receiver, *args)

    monkeypatch.setattr(FakeReceiver, "receiveImage", hanging_receive_image)
    monkeypatch.setattr(engine.endpoints, "JOIN_TIMEOUT_S", 0.05)
    routes = {**session_routes("spout", table.defaults()), "spout_input": "TD out", "spout_output": "engine out"}
    session = Session("s1", None, "spout", SIZE, SIZE, StreamSettings(height=32, width=32), {}, routes, "ready")
    spout_io = SpoutSessionIO(session, lambda: None)
    spout_io.start()
    spout.publish("TD out", rgba(cli.test_pattern(1, SIZE, SIZE)[0]))
    assert receiving.wait(PATIENCE_S)
    session.close()
    started = time.monotonic()
    spout_io.stop()
    assert time.monotonic() - started < PATIENCE_S  # returned without the driver, not when it answered
    assert "Spout has not answered" in caplog.text
    answer.set()
    wait_until(lambda: spout.gl_contexts == {}, "the session's thread to close Spout")


def test_a_hosts_spout_session_streams_a_sender_through_the_model_into_another(tmp_path):
    spout = FakeSpoutMachine(tmp_path / "spout")
    engine = Engine(tmp_path, env=spout_environment(spout))
    try:
        with EngineClient(engine.address, transport="spout", width=SIZE, height=SIZE, timeout_s=PATIENCE_S,
                          prompt="ink", spout_input="camera", spout_output="stylised") as host:
            session = host.session
            assert host.info["schema"]["spout_input"]["applies"] == "open"
            assert host.info["params"] | {"spout_input": "camera", "spout_output": "stylised"} == host.info["params"]
            frames = cli.test_pattern(host.info["first_chunk_frames"] + 12, 48, 80)  # fitted to 64x64
            publish_without_drops(spout, "camera", frames, host)
            last = last_finished_seq(len(frames), host.info["first_chunk_frames"], host.info["lag_frames"])
            wait_until(lambda: (lambda s: s["frames_out"] + s["outputs_dropped"] == last + 1)(host.stats()),
                       f"outputs up to frame {last}")
            stats = host.stats()
            published = spout.senders["stylised"]
            assert (published.width, published.height, published.dxgi_format) == (SIZE, SIZE, DXGI_B8G8R8A8)
            assert published.frame_count == stats["frames_out"] > 0
            assert stats["state"] == "streaming" and stats["frames_dropped"] == 0
            assert stats["frames_processed"] == last + 1 + host.info["lag_frames"]

            # No frames through the bridge; the senders stay those the session opened with.
            assert host.receive(0.05) is None
            with pytest.raises(RuntimeError, match="spout_input"):
                host.send(np.zeros((SIZE, SIZE, 4), np.uint8))
            with pytest.raises(RemoteError) as refused:
                host.set(spout_output="another")
            assert (refused.value.code, refused.value.field) == ("bad_value", "params.spout_output")
            assert "open a new session" in refused.value.message
        wait_until(lambda: spout.senders.get("stylised") is None, "the output sender to be released")
        assert f"session {session} closed: the host said bye" in engine.log()
    finally:
        assert engine.stop() == 0, engine.log()


def test_serve_with_spout_flags_streams_with_no_host_past_the_session_timeout(tmp_path):
    spout = FakeSpoutMachine(tmp_path / "spout")
    engine = Engine(tmp_path, "--spout-in", "camera", "--spout-out", "stylised", "--spout-size", "48x40",
                    "--prompt", "ink", "--session-timeout", "1", "--virtualcam", env=spout_environment(spout))
    frames = cli.test_pattern(16, 40, 48)
    drawn = 0

    def draw_until(condition, what: str) -> None:
        nonlocal drawn
        deadline = time.monotonic() + PATIENCE_S
        while not condition():
            assert time.monotonic() < deadline, f"gave up waiting for {what}:\n{engine.log()}"
            spout.publish("camera", rgba(frames[drawn % len(frames)]))
            drawn += 1
            time.sleep(0.03)

    def frames_out() -> int:
        published = spout.senders.get("stylised")
        return 0 if published is None else published.frame_count

    try:
        assert "Spout: reading sender 'camera', publishing 'stylised'" in engine.log()
        draw_until(lambda: frames_out() >= 4, "the first outputs")
        published = spout.senders["stylised"]
        assert (published.width, published.height) == (48, 40)

        time.sleep(1.5)  # longer than --session-timeout: no host, yet nothing closes the session
        streamed = frames_out()
        draw_until(lambda: frames_out() >= streamed + 8, "more outputs")

        with HostSocket(engine.address) as host:  # any host may look and change parameters ...
            stats = host.request(StatsRequest(session="spout"), PATIENCE_S)
            assert (stats["state"], stats["transport"]) == ("streaming", "spout")
            assert stats["params"]["prompt"] == "ink" and stats["params"]["spout_input"] == "camera"
            assert host.request(ParamsUpdate(session="spout", params={"prompt": "chalk"}), PATIENCE_S)[
                "params"]["prompt"] == "chalk"
            with pytest.raises(RemoteError) as refused:  # ... but not close it
                host.request(Bye(session="spout"), PATIENCE_S)
            assert refused.value.code == "unknown_session"
        if Path("/sys/module/v4l2loopback").exists():
            assert stats["virtualcam"]["state"] == "on"
        else:  # --virtualcam where there is no camera: the log says why, and it streams on
            assert stats["virtualcam"]["state"] == "unavailable"
            assert f"session spout: no virtual camera ({stats['virtualcam']['reason']})" in engine.log()
        assert "session spout closed" not in engine.log()
    finally:
        assert engine.stop() == 0, engine.log()
    assert spout.senders.get("stylised") is None  # released as the engine stopped


def test_spout_where_spoutgl_is_missing_is_refused_with_the_reason_and_the_fix(engine, tmp_path):
    with pytest.raises(RemoteError) as refused:
        EngineClient(engine.address, transport="spout", width=SIZE, height=SIZE, timeout_s=PATIENCE_S,
                     spout_input="camera").open()
    assert (refused.value.code, refused.value.field) == ("bad_value", "transport")
    assert "Spout is Windows-only" in refused.value.message and "shm or zmq" in refused.value.message

    with EngineClient(engine.address, transport="shm", width=SIZE, height=SIZE, timeout_s=PATIENCE_S) as host:
        with pytest.raises(RemoteError) as refused:
            host.set(spout_input="camera")
        assert (refused.value.code, refused.value.field) == ("bad_value", "params.spout_input")
        assert "transport spout" in refused.value.message

    no_spout = Engine(tmp_path, "--spout-in", "camera", expect_listening=False)
    assert no_spout.stop() == 1
    assert "--spout-in/--spout-out: Spout is Windows-only" in no_spout.log()


# ----------------------------------------------------------------------- virtual camera


def test_with_serve_virtualcam_every_sessions_outputs_also_reach_a_camera_until_turned_off(monkeypatch):
    """In-process, with a camera backend that pyvirtualcam's fake (test_virtualcam.py) provides."""
    opened = []
    monkeypatch.setitem(sys.modules, "pyvirtualcam", fake_pyvirtualcam(opened))
    server = EngineServer(lambda: build_models("tiny"), model="tiny", address="tcp://127.0.0.1:*",
                          model_size=(32, 32), session_defaults={"virtualcam": True})
    server.start()
    try:
        with EngineClient(server.address, transport="zmq", width=SIZE, height=SIZE, timeout_s=PATIENCE_S,
                          target_fps=25) as host:
            assert host.info["params"]["virtualcam"] is True  # the engine's default
            assert host.info["virtualcam"]["state"] == "on" and host.info["virtualcam"]["fps"] == 25
            frames = cli.test_pattern(8, SIZE, SIZE)
            deadline = time.monotonic() + PATIENCE_S
            while (camera := host.stats()["virtualcam"])["frames_sent"] < 4:  # RGB frames of the session's size
                assert camera["state"] == "on" and time.monotonic() < deadline, camera
                for frame in frames:
                    host.send(frame)
                    host.receive(0.02)
            assert len(opened) == 1 and camera["backend"] == "fake"
            assert host.set(virtualcam=False)["virtualcam"] == {"state": "off"}
            assert host.error is None
    finally:
        server.close()
    assert not server.failed




@no_camera_backend
def test_a_session_asking_for_a_virtual_camera_hears_pyvirtualcams_reason_and_the_fix_and_streams_on(engine):
    reason = pyvirtualcams_reason()
    with EngineClient(engine.address, transport="shm", width=SIZE, height=SIZE, timeout_s=PATIENCE_S,
                      virtualcam=True) as host:
        session = host.session
        camera = host.info["virtualcam"]
        assert camera["state"] == "unavailable" and camera["reason"] == reason
        assert V4L2LOOPBACK_MODPROBE in camera["fix"]

        frame = np.zeros((SIZE, SIZE, 4), np.uint8)
        outputs = 0
        deadline = time.monotonic() + PATIENCE_S
        while outputs < 4 or host.error is None:  # the notice comes in as the client tends the connection
            assert time.monotonic() < deadline, f"got {outputs} outputs, error {host.error}, {host.stats()}"
            host.send(frame)
            outputs += host.receive(0.02) is not None
        assert (host.error.code, host.error.field) == ("output_unavailable", "params.virtualcam")
        assert reason in host.error.message and V4L2LOOPBACK_MODPROBE in host.error.message
        assert host.state == "streaming"
        assert host.stats()["virtualcam"] == camera

        # Live: off, and on again, which tries again.
        assert host.set(virtualcam=False)["virtualcam"] == {"state": "off"}
        assert host.set(virtualcam=True)["virtualcam"] == camera
        assert host.stats()["params"]["virtualcam"] is True
    assert f"session {session}: no virtual camera ({reason})" in engine.log()
    assert V4L2LOOPBACK_MODPROBE in engine.log()
