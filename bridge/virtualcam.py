"""Virtual-camera output: frames become a webcam that Zoom, Discord or OBS can pick.

Through pyvirtualcam (`pip install pyvirtualcam`, the project's `virtualcam` extra),
which drives one backend per platform:

    Windows   obs (OBS Studio 26+'s virtual camera), then unitycapture
    macOS     obs (OBS Studio's virtual camera; on macOS 13+ OBS 30+)
    Linux     v4l2loopback (a kernel module that makes /dev/videoN devices)

    camera = open_virtual_camera(832, 480, fps=16)
    if isinstance(camera, VirtualCameraUnavailable):
        print(camera.reason, camera.fix)   # and stream on without it
    else:
        camera.submit(pixels, "rgba8")     # returns at once
        ...
        camera.close()

How it behaves:
- A missing backend is not an error that stops anything: open_virtual_camera returns
  VirtualCameraUnavailable with pyvirtualcam's own words (`reason`) and what to do
  about it on this platform (`fix`), and the caller goes on without the camera.
- Paced: the engine hands over frames in bursts (a chunk of four at a time), while a
  camera wants them evenly spaced. submit() queues a frame and returns; a thread sends
  queued frames one frame period apart. The queue is short and latest-wins (the
  oldest frame is dropped and counted), so a camera never lags seconds behind.
- Format conversion: frames arrive as any protocol format (rgba8, rgb8, bgra8) and go
  to the backend as RGB, which every backend accepts; alpha is dropped.
- Only one program can feed OBS's virtual camera at a time: if OBS's own virtual
  camera is running, opening it here fails, and the reason says the camera is in use.

pyvirtualcam is imported only when a camera is opened, so this module loads anywhere.
"""

from __future__ import annotations

import platform
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .protocol import FORMATS, ErrorCode, ProtocolError

# pyvirtualcam's backend names on each platform.system(), in the order it tries them.
PLATFORM_BACKENDS = {
    "Windows": ("obs", "unitycapture"),
    "Darwin": ("obs",),
    "Linux": ("v4l2loopback",),
}
V4L2LOOPBACK_MODPROBE = "sudo modprobe v4l2loopback devices=1"
DEFAULT_QUEUED_FRAMES = 4  # one chunk of the engine's output
# close() waits this long for the pacing thread to release the camera (so that it can be
# opened again at once), and no longer: a device that hangs must not hold up the caller.
CLOSE_WAIT_S = 1.0

# Which channels of each protocol format make up R, G, B.
_RGB_CHANNELS = {"rgba8": [0, 1, 2], "rgb8": [0, 1, 2], "bgra8": [2, 1, 0]}

_FIXES = {
    "Windows": "install OBS Studio 26 or later, which brings the OBS Virtual Camera (or install Unity Capture); "
    "if OBS's own virtual camera is running, stop it: only one program can feed it",
    "Darwin": "install OBS Studio (30 or later on macOS 13+), then start and stop its virtual camera once "
    "to install the camera extension",
    "Linux": "install v4l2loopback (Debian/Ubuntu: sudo apt install v4l2loopback-dkms) and load it: "
    + V4L2LOOPBACK_MODPROBE,
}


@dataclass(frozen=True)
class VirtualCameraUnavailable:
    """Why no virtual camera could be opened (pyvirtualcam's words) and what to do."""

    reason: str
    fix: str


def backends_for_this_platform() -> tuple[str, ...]:
    """pyvirtualcam's backend names on this machine's platform (empty where it has none)."""
    return PLATFORM_BACKENDS.get(platform.system(), ())


def _fix_for_this_platform() -> str:
    """What to install or load for a virtual camera to exist on this machine."""
    return _FIXES.get(platform.system(), "pyvirtualcam supports Windows, macOS and Linux only")


def open_virtual_camera(
    width: int,
    height: int,
    fps: float,
    *,
    backend: str | None = None,
    device: str | None = None,
    max_queued_frames: int = DEFAULT_QUEUED_FRAMES,
) -> VirtualCamera | VirtualCameraUnavailable:
    """Open a virtual camera of this size and frame rate, or say why there is none.

    backend None tries this platform's backends in turn (see PLATFORM_BACKENDS); device
    picks one device of a backend (e.g. "/dev/video2"), None the first free one.
    """
    try:
        import pyvirtualcam
    except ImportError as error:
        return VirtualCameraUnavailable(
            f"pyvirtualcam is not installed ({error})",
            "pip install pyvirtualcam, or install this project with its virtualcam extra",
        )
    try:
        camera = pyvirtualcam.Camera(
            width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB, backend=backend, device=device
        )
    except RuntimeError as error:  # pyvirtualcam gathers every backend's failure into one
        return VirtualCameraUnavailable(str(error), _fix_for_this_platform())
    except KeyError:  # pyvirtualcam looks the backend name up in its table
        known = ", ".join(backends_for_this_platform()) or "none"
        return VirtualCameraUnavailable(
            f"pyvirtualcam has no {backend!r} backend on {platform.system() or 'this system'}",
            f"leave the backend unset, or pick one of: {known}",
        )
    return VirtualCamera(camera, max_queued_frames=max_queued_frames)


class VirtualCamera:
    """Sends submitted frames to an open camera, evenly spaced at the camera's frame rate.

    camera is an open pyvirtualcam.Camera taking RGB frames (open_virtual_camera makes
    one). clock and sleep are the time source the pacing thread uses.
    """

    def __init__(
        self,
        camera: Any,
        *,
        max_queued_frames: int = DEFAULT_QUEUED_FRAMES,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if max_queued_frames < 1:
            raise ValueError("max_queued_frames must be at least 1")
        self.width, self.height, self.fps = camera.width, camera.height, camera.fps
        self.backend, self.device = camera.backend, camera.device
        self.frames_sent = 0
        self.frames_dropped = 0  # pushed out of the queue by newer frames
        self.failure: str | None = None  # why sending stopped, when the camera failed
        self._camera = camera
        self._clock, self._sleep = clock, sleep
        self._queue: deque[np.ndarray] = deque()
        self._max_queued = max_queued_frames
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._send_paced, name=f"virtualcam-{self.backend}", daemon=True)
        self._thread.start()

    def submit(self, pixels: np.ndarray, format: str = "rgba8") -> bool:
        """Queue one [height, width, channels] uint8 frame; False once the camera has stopped.

        Converts at once, so the caller may reuse its array as soon as this returns.
        """
        rgb = self._to_rgb(pixels, format)
        with self._changed:
            if self._closed or self.failure is not None:
                return False
            if len(self._queue) == self._max_queued:
                self._queue.popleft()
                self.frames_dropped += 1
            self._queue.append(rgb)
            self._changed.notify()
        return True

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Stop sending (frames still queued are dropped); the pacing thread then releases
        the camera. Waits up to wait_s for that."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(wait_s)

    def __enter__(self) -> VirtualCamera:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _to_rgb(self, pixels: np.ndarray, format: str) -> np.ndarray:
        if format not in FORMATS:
            raise ProtocolError(ErrorCode.BAD_VALUE, "format", f"format must be one of {', '.join(FORMATS)}")
        expected = (self.height, self.width, FORMATS[format])
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.shape != expected:
            got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
            raise ProtocolError(
                ErrorCode.SIZE_MISMATCH, "pixels", f"the virtual camera takes uint8 {expected} for {format}, got {got}"
            )
        return pixels[..., _RGB_CHANNELS[format]]  # fancy indexing: a new, contiguous array

    def _send_paced(self) -> None:
        try:
            self._send_until_closed()
        finally:
            self._camera.close()  # here, not in close(): a send that hangs holds only this thread

    def _send_until_closed(self) -> None:
        period = 1.0 / self.fps
        next_due: float | None = None
        while True:
            with self._changed:
                while not self._queue and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                frame = self._queue.popleft()
            now = self._clock()
            if next_due is not None and now < next_due:
                self._sleep(next_due - now)
                send_time = next_due
            else:
                send_time = now  # on time, or late after a gap: restart the rhythm from now
            try:
                self._camera.send(frame)
            except Exception as error:  # e.g. the device went away; the session goes on without it
                with self._changed:
                    self.failure = f"{type(error).__name__}: {error}"
                return
            self.frames_sent += 1
            next_due = send_time + period
