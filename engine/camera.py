"""A session's virtual camera: its finished frames also become a webcam (bridge/virtualcam.py).

A session's `virtualcam` parameter (live; `serve --virtualcam` makes it default on)
turns the camera on and off. The IO thread opens and closes it (engine/server.py, on
hello, params and close); whichever thread sends the session's outputs, the IO thread
or a Spout session's own thread, submits each frame as it goes out. submit never
waits: VirtualCamera paces frames out on a thread of its own, at the frame rate the
camera was opened with (the session's target_fps at the time).

Where no camera backend exists, turning it on fails softly: the session streams on to
its host, and pyvirtualcam's reason with its fix is returned (the server logs it and
tells the host) and stays in the session's stats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bridge.virtualcam import VirtualCamera, VirtualCameraUnavailable, open_virtual_camera

if TYPE_CHECKING:
    from .session import OutputFrame


class SessionCamera:
    """The virtual camera of one session, at the session's frame size."""

    def __init__(self, width: int, height: int):
        self._width, self._height = width, height
        self._camera: VirtualCamera | None = None
        self._unavailable: VirtualCameraUnavailable | None = None  # why the last attempt to open failed

    def turn(self, on: bool, fps: float) -> VirtualCameraUnavailable | None:
        """Open (at fps) or close the camera; returns why it could not be opened, if it could not."""
        if not on:
            self.close()
            return None
        if self._camera is not None:
            return None
        try:
            opened = open_virtual_camera(self._width, self._height, fps)
        except (ValueError, TypeError) as error:  # a backend's own argument checks; the session goes on
            opened = VirtualCameraUnavailable(f"{type(error).__name__}: {error}",
                                              "the camera backend refused this size or frame rate: open the "
                                              "session at another size or target_fps")
        if isinstance(opened, VirtualCameraUnavailable):
            self._unavailable = opened
            return opened
        self._camera, self._unavailable = opened, None
        return None

    def submit(self, output: OutputFrame) -> None:
        """Hand a finished frame to the camera, if it is on (only then is it converted to its
        host's format for it); never waits."""
        camera = self._camera  # one read: the IO thread may close it meanwhile, and then submit refuses
        if camera is not None:
            camera.submit(output.pixels, output.format)

    def describe(self) -> dict[str, Any]:
        """For the session's stats: state (off, on, unavailable, failed) and what goes with it."""
        camera = self._camera
        if camera is not None and camera.failure is not None:
            return {"state": "failed", "reason": camera.failure,
                    "fix": "set virtualcam to false and back to true to open the camera again"}
        if camera is not None:
            return {"state": "on", "backend": camera.backend, "device": camera.device, "fps": camera.fps,
                    "frames_sent": camera.frames_sent, "frames_dropped": camera.frames_dropped}
        if self._unavailable is not None:
            return {"state": "unavailable", "reason": self._unavailable.reason, "fix": self._unavailable.fix}
        return {"state": "off"}

    def close(self) -> None:
        camera, self._camera, self._unavailable = self._camera, None, None
        if camera is not None:
            camera.close()
