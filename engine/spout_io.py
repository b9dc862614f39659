"""A Spout session's frames: read from one Spout sender, published as another (bridge/spout.py).

A session with transport "spout" takes no frames from a host. The engine reads the
sender named by the session's spout_input ("" for Spout's active sender) and
publishes the finished frames as the sender named by spout_output, at the session's
size (hello's width and height, or `serve --spout-size`). Frames of another size are
fitted to that size as the session's `fit` parameter says (on the CPU, with the
pipeline's own fitting), so a 1920x1080 camera feeds a 512x512 session as a host's
frames would. Each frame's seq counts the frames taken in; its t_capture_ns is when
it was read, so latencies in stats run from there to its publishing.

Which thread: every Spout session has one of its own, which makes, uses and closes
its receiver and sender, and nothing else touches them. Spout works in the OpenGL
context current on the calling thread; createOpenGL makes a hidden one only when the
thread has none, and otherwise silently uses the current one, which closeOpenGL then
leaves to the object that made it. So:
- a thread per session keeps each session's context its own: closing one session
  cannot take the context from under another's objects, as it could were all
  sessions' objects on the IO thread;
- the receiver is made first (its context serves the sender too) and closed last;
  the senders named when the session opened stay for its whole life, since
  replacing the receiver would close the context the sender works in;
- reading textures back from the GPU and fitting frames happens here, never on the
  IO thread (which would hold up the ZeroMQ and shared-memory hosts) nor on the
  worker, which only meets this thread in the session's inbox and outbox.

The thread polls, as the IO thread polls shared-memory rings: Spout's waitFrameSync
returns at once for a sender that never signals frames, so it cannot pace a loop.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np
import torch

from bridge.spout import SpoutReceiver, SpoutSender

from .pipeline import fit_to
from .session import InputFrame, Session

log = logging.getLogger(__name__)

POLL_S = 0.002  # between looks at the sender while it has no new frame
# How long stop() waits for the thread to close its Spout objects: milliseconds normally;
# a driver that hangs holds up the IO thread (every other session) no longer than this.
JOIN_TIMEOUT_S = 1.0
# The format frames go back out in: Spout's own texture format (DXGI B8G8R8A8), so the
# driver has nothing to reorder.
OUTPUT_FORMAT = "bgra8"


class SpoutSessionIO:
    """Moves a Spout session's frames on a thread of its own: start(), then stop() when the
    session closes. A failure fails the session (the IO thread then closes it)."""

    def __init__(self, session: Session, frames_ready: Callable[[], None]):
        """frames_ready: called when the session's next chunk is complete (the worker's wake)."""
        self._session = session
        self._frames_ready = frames_ready
        self._stopping = threading.Event()
        self._next_seq = 0
        self._thread = threading.Thread(target=self._run, name=f"spout-{session.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait (bounded) for the thread to close the receiver and sender."""
        self._stopping.set()
        self._thread.join(JOIN_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("session %s: Spout has not answered for %.0f s; its sender closes when it does",
                        self._session.id, JOIN_TIMEOUT_S)

    def _run(self) -> None:
        session = self._session
        routes = session.routes
        try:
            # The sender after the receiver, so that it is closed first (see the module doc).
            with SpoutReceiver(routes["spout_input"], format="rgb8") as receiver, \
                    SpoutSender(routes["spout_output"]) as sender:
                log.info("session %s: reading Spout sender %r, publishing %r", session.id,
                         routes["spout_input"] or "(the active sender)", routes["spout_output"])
                self._move_frames(receiver, sender)
        except Exception as error:  # noqa: BLE001 - ends only this session, which says why
            log.exception("session %s: Spout failed", session.id)
            session.fail(f"Spout failed ({type(error).__name__}: {error}); open a new session")

    def _move_frames(self, receiver: SpoutReceiver, sender: SpoutSender) -> None:
        session = self._session
        while not self._stopping.is_set() and session.is_active():
            rgb = receiver.receive()
            if rgb is not None:
                self._take(rgb)
            while (output := session.due_output(time.monotonic_ns())) is not None:
                sender.send(output.pixels, output.format)
                session.camera.submit(output)
                session.output_sent(output)
            if rgb is None:
                self._stopping.wait(POLL_S)

    def _take(self, rgb: np.ndarray) -> None:
        session = self._session
        fitted = fit_frame(rgb, session.width, session.height, session.settings.fit)
        frame = InputFrame(fitted, OUTPUT_FORMAT, self._next_seq, time.monotonic_ns())
        self._next_seq += 1
        if session.put(frame):
            self._frames_ready()


def fit_frame(rgb: np.ndarray, width: int, height: int, fit: str) -> np.ndarray:
    """An [h, w, 3] uint8 frame fitted to height x width as `fit` says (crop, letterbox,
    stretch); the frame itself when it has that size already."""
    if rgb.shape[:2] == (height, width):
        return rgb
    with torch.no_grad():
        pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
        fitted = fit_to(pixels, height, width, fit)[0]
        return (fitted.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).contiguous().numpy()
