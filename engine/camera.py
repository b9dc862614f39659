"""A session's virtual camera: its finished frames also become a webcam.

The camera is one of the engine's sinks (engine/endpoints.py's VirtualCameraSink, over
bridge/virtualcam.py); this is the session's handle on it. A session's `virtualcam`
parameter (live; `serve --virtualcam` makes it default on) turns it on and off. The IO
thread opens and closes it (engine/server.py, on hello, params and close); whichever
thread sends the session's outputs, the IO thread or an engine-side session's own thread
(Spout, NDI, Syphon), submits each frame as it goes out. That never waits: the camera
paces frames out on a thread of its own, at the frame rate it was opened with (the
session's target_fps at the time).

Where no camera backend exists, turning it on fails softly: the session streams on to
its host, and pyvirtualcam's reason with its fix is returned (the server logs it and
tells the host) and stays in the session's stats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .endpoints import EndpointUnavailable, VirtualCameraSink

if TYPE_CHECKING:
    from .session import OutputFrame


class SessionCamera:
    """The virtual camera of one session, at the session's frame size."""

    def __init__(self, width: int, height: int):
        self._width, self._height = width, height
        self._sink: VirtualCameraSink | None = None
        self._unavailable: EndpointUnavailable | None = None  # why the last attempt to open failed

    def turn(self, on: bool, fps: float) -> EndpointUnavailable | None:
        """Open (at fps) or close the camera; returns why it could not be opened (reason, fix), if it could not."""
        if not on:
            self.close()
            return None
        if self._sink is not None:
            return None
        sink = VirtualCameraSink(self._width, self._height, fps)
        try:
            sink.open()
        except EndpointUnavailable as unavailable:  # the session goes on without it
            self._unavailable = unavailable
            return unavailable
        self._sink, self._unavailable = sink, None
        return None

    def submit(self, output: OutputFrame) -> None:
        """Hand a finished frame to the camera, if it is on (only then is it converted to its
        host's format for it); never waits."""
        sink = self._sink  # one read: the IO thread may close it meanwhile, and then it refuses the frame
        if sink is not None:
            sink.send(output)

    def describe(self) -> dict[str, Any]:
        """For the session's stats: state (off, on, unavailable, failed) and what goes with it."""
        sink = self._sink
        camera = sink.camera if sink is not None else None
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
        sink, self._sink, self._unavailable = self._sink, None, None
        if sink is not None:
            sink.close()
