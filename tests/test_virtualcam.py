"""Virtual-camera output: pyvirtualcam's real answer where no backend exists, and pacing
and format conversion against a fake camera with pyvirtualcam.Camera's interface.

pyvirtualcam.Camera(width, height, fps, *, fmt=PixelFormat.RGB, device=None,
backend=None) raises RuntimeError naming each backend's failure ("'name' backend:
..."), KeyError for a backend name it does not know; send() wants uint8 frames of
exactly (height, width, 3) for RGB and raises TypeError / ValueError otherwise;
properties width, height, fps, backend, device.
"""

import enum
import platform
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from processes import PATIENCE_S
from bridge.protocol import ProtocolError
from bridge.virtualcam import (
    V4L2LOOPBACK_MODPROBE,
    VirtualCamera,
    VirtualCameraUnavailable,
    open_virtual_camera,
)

pytestmark = pytest.mark.timeout(3 * PATIENCE_S)  # room for a test's waits to time out and say what never came


class FakeClock:
    """Time that moves only when the pacing thread sleeps (or a test moves it)."""

    def __init__(self, start: float = 100.0):
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeCamera:
    """An open camera with pyvirtualcam.Camera's interface, recording what it was sent and when."""

    def __init__(self, width=6, height=4, fps=25.0, *, clock=None, backend="fake", device="/dev/video9"):
        self.width, self.height, self.fps = width, height, fps
        self.backend, self.device = backend, device
        self.clock = clock or FakeClock()
        self.sent: list[tuple[float, np.ndarray]] = []
        self.closed = False
        self.gate = threading.Event()  # cleared: send() blocks, as a slow device would
        self.gate.set()
        self.sending = threading.Event()
        self.fail_with: Exception | None = None
        self._changed = threading.Condition()

    def send(self, frame: np.ndarray) -> None:
        if frame.dtype != np.uint8:
            raise TypeError(f"unexpected frame dtype: {frame.dtype} != uint8")
        if frame.shape != (self.height, self.width, 3):
            raise ValueError(f"unexpected frame shape: {frame.shape} != {(self.height, self.width, 3)}")
        self.sending.set()
        self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        with self._changed:
            self.sent.append((self.clock(), frame.copy()))
            self._changed.notify_all()

    def close(self) -> None:
        self.closed = True

    def wait_for(self, count: int) -> list[tuple[float, np.ndarray]]:
        with self._changed:
            sent_in_time = self._changed.wait_for(lambda: len(self.sent) >= count, PATIENCE_S)
            assert sent_in_time, f"{len(self.sent)} of {count} sent"
            return list(self.sent)


def wait_until(condition) -> None:
    """Poll for something another thread does; bounded in time, never a timing assertion."""
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < deadline, f"what the test waited for did not happen within {PATIENCE_S:g} s"
        time.sleep(0.01)


def paced(camera: FakeCamera, **kwargs) -> VirtualCamera:
    return VirtualCamera(camera, clock=camera.clock, sleep=camera.clock.sleep, **kwargs)


def frame(value: int, height: int = 4, width: int = 6, channels: int = 4) -> np.ndarray:
    return np.full((height, width, channels), value, np.uint8)


# ---------------------------------------------------------------- no backend: reason and fix


def v4l2loopback_loaded() -> bool:
    return Path("/sys/module/v4l2loopback").exists()


@pytest.mark.skipif(platform.system() != "Linux" or v4l2loopback_loaded(), reason="needs Linux without v4l2loopback")
def test_without_v4l2loopback_the_caller_gets_pyvirtualcams_reason_and_the_modprobe_fix():
    pyvirtualcam = pytest.importorskip("pyvirtualcam")
    with pytest.raises(RuntimeError) as direct:
        pyvirtualcam.Camera(64, 48, 30)  # what pyvirtualcam itself says on this machine

    result = open_virtual_camera(64, 48, 30)

    assert isinstance(result, VirtualCameraUnavailable)  # a value, not an exception: the caller goes on
    assert result.reason == str(direct.value)
    assert "No v4l2 loopback device found" in result.reason
    assert V4L2LOOPBACK_MODPROBE in result.fix
    assert V4L2LOOPBACK_MODPROBE == "sudo modprobe v4l2loopback devices=1"


def test_without_pyvirtualcam_the_caller_is_told_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)  # import pyvirtualcam now fails
    result = open_virtual_camera(64, 48, 30)
    assert isinstance(result, VirtualCameraUnavailable)
    assert "pyvirtualcam is not installed" in result.reason
    assert "pip install pyvirtualcam" in result.fix


def fake_pyvirtualcam(opened: list) -> types.ModuleType:
    """A pyvirtualcam module whose only backend is "fake"; module.cameras are those it opened."""
    module = types.ModuleType("pyvirtualcam")
    module.cameras = []

    class PixelFormat(enum.Enum):
        RGB = "raw "
        BGR = "24BG"
        RGBA = "ABGR"

    def camera(width, height, fps, *, fmt=PixelFormat.RGB, device=None, backend=None, print_fps=False):
        {"fake": None}[backend or "fake"]  # an unknown backend name is a KeyError, as in pyvirtualcam
        opened.append({"fmt": fmt, "backend": backend, "device": device})
        module.cameras.append(FakeCamera(width, height, fps, device=device or "/dev/video9"))
        return module.cameras[-1]

    module.PixelFormat, module.Camera = PixelFormat, camera
    return module


def test_a_camera_is_opened_for_rgb_frames_and_closed_with_its_output(monkeypatch):
    opened = []
    monkeypatch.setitem(sys.modules, "pyvirtualcam", fake_pyvirtualcam(opened))
    camera = open_virtual_camera(6, 4, 30, device="/dev/video3")
    assert isinstance(camera, VirtualCamera)
    assert opened == [{"fmt": sys.modules["pyvirtualcam"].PixelFormat.RGB, "backend": None, "device": "/dev/video3"}]
    assert (camera.width, camera.height, camera.fps, camera.device) == (6, 4, 30, "/dev/video3")
    inner = camera._camera
    camera.close()
    assert inner.closed


def test_an_unknown_backend_name_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyvirtualcam", fake_pyvirtualcam([]))
    result = open_virtual_camera(6, 4, 30, backend="nonesuch")
    assert isinstance(result, VirtualCameraUnavailable)
    assert "'nonesuch'" in result.reason


# ------------------------------------------------------------------------------- pacing


def test_a_burst_of_frames_goes_out_one_frame_period_apart():
    camera = FakeCamera(fps=25.0)
    with paced(camera) as output:
        for value in range(4):  # one chunk of the engine's output, all at once
            assert output.submit(frame(value))
        sent = camera.wait_for(4)
    times = [time for time, _ in sent]
    assert times == pytest.approx([100.0, 100.04, 100.08, 100.12])
    assert [int(pixels[0, 0, 0]) for _, pixels in sent] == [0, 1, 2, 3]
    assert output.frames_sent == 4 and output.frames_dropped == 0


def test_after_a_gap_the_next_frame_goes_out_at_once():
    camera = FakeCamera(fps=10.0)
    with paced(camera) as output:
        output.submit(frame(1))
        camera.wait_for(1)
        camera.clock.now += 5.0  # the engine stalled for five seconds
        output.submit(frame(2))
        output.submit(frame(3))
        sent = camera.wait_for(3)
    assert [time for time, _ in sent] == pytest.approx([100.0, 105.0, 105.1])


def test_a_slow_camera_gets_the_latest_frames_and_the_rest_are_counted_as_dropped():
    camera = FakeCamera()
    camera.gate.clear()
    with paced(camera, max_queued_frames=2) as output:
        output.submit(frame(0))
        assert camera.sending.wait(PATIENCE_S)  # frame 0 is in the device; the queue is empty
        for value in range(1, 6):
            output.submit(frame(value))
        camera.gate.set()
        sent = camera.wait_for(3)
    assert [int(pixels[0, 0, 0]) for _, pixels in sent] == [0, 4, 5]
    assert output.frames_dropped == 3


def test_a_failing_camera_stops_taking_frames_and_says_why():
    camera = FakeCamera()
    camera.fail_with = OSError("device removed")
    with paced(camera) as output:
        output.submit(frame(1))
        wait_until(lambda: output.failure is not None)
        assert output.failure == "OSError: device removed"
        assert output.submit(frame(2)) is False


def test_closing_a_camera_whose_device_hangs_returns_and_the_camera_is_released_when_it_answers():
    """The engine's IO thread closes cameras: a stuck driver must hold up no other session."""
    camera = FakeCamera()
    camera.gate.clear()  # send() blocks
    output = paced(camera)
    output.submit(frame(1))
    assert camera.sending.wait(PATIENCE_S)
    started = time.monotonic()
    output.close(wait_s=0.05)
    assert time.monotonic() - started < PATIENCE_S  # bounded, not until the device answers
    assert not camera.closed  # still in send()
    camera.gate.set()
    wait_until(lambda: camera.closed)  # released by the pacing thread once send returns
    assert output.submit(frame(2)) is False


# -------------------------------------------------------------------- format conversion


@pytest.mark.parametrize("format, to_rgb", [("rgba8", [0, 1, 2]), ("rgb8", [0, 1, 2]), ("bgra8", [2, 1, 0])])
def test_every_protocol_format_reaches_the_camera_as_rgb(format, to_rgb):
    channels = 3 if format == "rgb8" else 4
    pixels = np.random.default_rng(0).integers(0, 256, (4, 6, channels), dtype=np.uint8)
    camera = FakeCamera()
    with paced(camera) as output:
        output.submit(pixels, format)
        pixels[:] = 0  # the caller reuses its array at once
        (_, got), = camera.wait_for(1)
    expected = np.random.default_rng(0).integers(0, 256, (4, 6, channels), dtype=np.uint8)[..., to_rgb]
    assert got.shape == (4, 6, 3) and np.array_equal(got, expected)


def test_a_frame_that_does_not_fit_the_camera_is_refused_at_submit():
    with paced(FakeCamera(width=6, height=4)) as output:
        for wrong, format in [
            (frame(1, height=8), "rgba8"),
            (frame(1, channels=3), "rgba8"),
            (frame(1).astype(np.float32), "rgba8"),
        ]:
            with pytest.raises(ProtocolError) as caught:
                output.submit(wrong, format)
            assert caught.value.field == "pixels"
        with pytest.raises(ProtocolError) as caught:
            output.submit(frame(1), "yuv420")
        assert caught.value.field == "format"
