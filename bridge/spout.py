"""Spout in and out (Windows): frames shared as DirectX 11 textures between applications.

TouchDesigner, OBS (with the Spout2 plugin), Resolume and most VJ tools on Windows
send and receive video over Spout. This module reads a Spout sender's frames into
numpy arrays and publishes numpy arrays as a Spout sender, through the SpoutGL
binding (`pip install SpoutGL`, the project's `spout` extra).

    with SpoutReceiver("TouchDesigner") as receiver:
        while True:
            pixels = receiver.receive()        # newest new frame, or None
            if pixels is None:
                time.sleep(0.002)              # see wait_for_frame for why not only that
                continue
            ...

    with SpoutSender("StreamDiffusion") as sender:
        sender.send(pixels, "rgba8")

How it behaves, and the binding facts behind it:
- Each receiver and sender creates its own hidden OpenGL context (createOpenGL), since
  Spout needs a current GL context and an engine process has no window. The context
  belongs to the creating thread: make, use and close an object on one thread.
- A sender's texture format is read (getSenderFormat, a DXGI code). B8G8R8A8 senders,
  the most common kind, are read in their own byte order (GL_BGRA_EXT) and reordered
  here: asking the driver to swap to RGBA shows red and blue swapped on some drivers.
  Other formats (RGBA8, 16-bit float from TouchDesigner, ...) are read as GL_RGBA and
  converted by OpenGL.
- When a sender appears, changes size or is replaced, receiveImage returns True
  without copying and isUpdated() turns True once: the buffer is reallocated to the
  new size then, before the next receiveImage, which checks the buffer's size.
- Frames that are not new are skipped: receiveImage hands the current texture out
  again when the sender has not drawn since, and frame counting (isFrameNew) says so.
  Right after connecting, the first copies can still be all zeros; those are skipped
  too until the sender's first real frame.
- A sender that disappears makes receiveImage return False; the receiver reports
  itself disconnected and picks the sender up again, at whatever size, when it
  returns. Nothing needs restarting.
- The binding names sendImage's arguments (height, width) but passes them on in that
  position to C++ SendImage(pixels, width, height, ...), so width goes first.
- Frames are top-left origin, rows top to bottom, as everywhere in the bridge (Spout's
  DirectX textures are top-down too, so nothing is flipped: invert=False).

SpoutGL is imported only when a receiver, sender or list_senders needs it, so this
module loads anywhere; where SpoutGL is missing they raise SpoutUnavailable, which
says why and what to do.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .protocol import FORMATS, ErrorCode, ProtocolError, check_frame_array

# DXGI texture formats whose bytes are in B, G, R, A order (B8G8R8A8_UNORM and its sRGB twin).
BGRA_SENDER_FORMATS = frozenset({87, 91})

# The channel order of each protocol format, to reorder pixels between formats.
_CHANNELS = {"rgba8": "RGBA", "rgb8": "RGB", "bgra8": "BGRA"}


class SpoutUnavailable(RuntimeError):
    """Spout cannot be used on this machine: `reason` says why, `fix` what to do."""

    def __init__(self, reason: str, fix: str):
        self.reason = reason
        self.fix = fix
        super().__init__(f"{reason}. {fix}")


@dataclass(frozen=True)
class SpoutSenderInfo:
    """A Spout sender running on this machine."""

    name: str
    width: int
    height: int
    active: bool  # the sender a receiver with no name connects to


def load_spoutgl() -> Any:
    """Import the SpoutGL binding, or raise SpoutUnavailable saying why and what to do."""
    try:
        import SpoutGL
    except ImportError as error:
        system = platform.system()
        if system != "Windows":
            raise SpoutUnavailable(
                f"Spout is Windows-only (it shares DirectX 11 textures) and this machine runs {_system_name(system)}",
                "use the shm or zmq transport here"
                + ("; Syphon is the macOS counterpart (bridge.syphon)" if system == "Darwin" else ""),
            ) from None
        raise SpoutUnavailable(
            f"the SpoutGL binding is not installed ({error})",
            "pip install SpoutGL, or install this project with its spout extra",
        ) from None
    return SpoutGL


def list_senders() -> list[SpoutSenderInfo]:
    """The Spout senders running now, with their sizes. Raises SpoutUnavailable."""
    spoutgl = load_spoutgl()
    # Reading the sender list needs no GL context: it is shared memory.
    with spoutgl.SpoutReceiver() as receiver:
        active = receiver.getActiveSender()
        senders = []
        for name in receiver.getSenderList():
            info = receiver.getSenderInfo(name)
            senders.append(SpoutSenderInfo(name, info.width, info.height, name == active))
    return senders


class SpoutReceiver:
    """Receives a Spout sender's frames as [height, width, channels] uint8 arrays.

    sender_name picks the sender; empty means the active one (the one Spout's tools
    last selected). format is the protocol format of the returned arrays.
    """

    def __init__(self, sender_name: str = "", *, format: str = "rgba8"):
        if format not in FORMATS:
            raise ProtocolError(ErrorCode.BAD_VALUE, "format", f"format must be one of {', '.join(FORMATS)}")
        self.sender_name = sender_name
        self.format = format
        self._spoutgl = load_spoutgl()
        self._receiver = self._spoutgl.SpoutReceiver()
        _create_gl_context(self._receiver, "receiver")
        self._receiver.setReceiverName(sender_name)
        self._buffer: np.ndarray | None = None  # the sender's pixels in its own byte order
        self._buffer_channels = "RGBA"
        self._gl_format = self._spoutgl.enums.GL_RGBA
        self._connected_name = ""  # the sender we are connected to (sender_name, or the active one)
        self._seen_real_frame = False

    @property
    def connected(self) -> bool:
        """Whether a sender was there at the last receive()."""
        return bool(self._connected_name)

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) of the connected sender, None while there is none."""
        if self._buffer is None:
            return None
        height, width = self._buffer.shape[:2]
        return width, height

    def receive(self) -> np.ndarray | None:
        """The sender's newest frame if it is new since the last call, else None.

        None also while no sender is there, and on the call that notices a new sender
        or a size change (that call only reallocates). Never blocks for long; see
        wait_for_frame for waiting.
        """
        spout = self._receiver
        if not spout.receiveImage(self._buffer, self._gl_format, False, 0):
            self._disconnect()
            return None
        if spout.isUpdated():
            self._connect()
            return None
        if spout.isFrameCountEnabled() and not spout.isFrameNew():
            return None
        if not self._seen_real_frame:
            if not self._buffer.any():  # nothing copied yet, not a black frame
                return None
            self._seen_real_frame = True
        return _reorder(self._buffer, self._buffer_channels, _CHANNELS[self.format])

    def wait_for_frame(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for the sender to signal a new frame; True if it did.

        Senders that signal frames (setFrameSync, as SpoutSender does) wake this early.
        For a sender that never signals (it has no sync event) Spout does not wait at
        all: it returns at once (True in current Spout, False in older versions), so a
        polling loop cannot rely on this alone to keep from spinning. While no sender
        is there it sleeps the timeout.
        """
        if not self.connected:
            time.sleep(timeout_s)
            return False
        return bool(self._receiver.waitFrameSync(self._connected_name, round(timeout_s * 1000)))

    def close(self) -> None:
        self._receiver.releaseReceiver()
        self._receiver.closeOpenGL()

    def __enter__(self) -> SpoutReceiver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _connect(self) -> None:
        """A sender appeared or changed: read its size and format, reallocate."""
        spout = self._receiver
        width, height = spout.getSenderWidth(), spout.getSenderHeight()
        if spout.getSenderFormat() in BGRA_SENDER_FORMATS:
            self._gl_format, self._buffer_channels = self._spoutgl.enums.GL_BGRA_EXT, "BGRA"
        else:
            self._gl_format, self._buffer_channels = self._spoutgl.enums.GL_RGBA, "RGBA"
        self._buffer = np.zeros((height, width, 4), np.uint8)
        self._connected_name = self.sender_name or spout.getActiveSender()
        self._seen_real_frame = False

    def _disconnect(self) -> None:
        self._connected_name = ""
        self._buffer = None


class SpoutSender:
    """Publishes frames as a Spout sender named `name`, for any Spout receiver to pick.

    Spout renames a sender whose name is already taken (name_1, name_2, ...), so pick
    a name unique on the machine.
    """

    def __init__(self, name: str):
        if not name:
            raise ValueError("a Spout sender needs a name")
        self.name = name
        self._spoutgl = load_spoutgl()
        self._sender = self._spoutgl.SpoutSender()
        _create_gl_context(self._sender, "sender")
        self._sender.setSenderName(name)
        enums = self._spoutgl.enums
        self._gl_formats = {"rgba8": enums.GL_RGBA, "bgra8": enums.GL_BGRA_EXT}

    def send(self, pixels: np.ndarray, format: str = "rgba8") -> bool:
        """Publish one [height, width, channels] uint8 frame; False if Spout refused it.

        The sender takes each frame's size, so a size change needs nothing special.
        """
        height, width = check_frame_array(pixels, format)
        if format == "rgb8":
            # Spout takes packed rows only and, for 3-byte pixels, widths divisible by 4
            # (OpenGL aligns rows to 4 bytes); 4-byte pixels never have padded rows.
            pixels, format = _reorder(pixels, "RGB", "RGBA"), "rgba8"
        pixels = np.ascontiguousarray(pixels)
        sent = self._sender.sendImage(pixels, width, height, self._gl_formats[format], False, 0)
        self._sender.setFrameSync(self.name)  # wakes receivers waiting in waitFrameSync
        return bool(sent)

    def close(self) -> None:
        self._sender.releaseSender()
        self._sender.closeOpenGL()

    def __enter__(self) -> SpoutSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _create_gl_context(spout_object: Any, role: str) -> None:
    if not spout_object.createOpenGL():
        raise SpoutUnavailable(
            f"the Spout {role} could not create its hidden OpenGL context",
            "update the graphics driver; Spout needs OpenGL and DirectX 11 on the GPU the other application uses",
        )


def _reorder(pixels: np.ndarray, source: str, target: str) -> np.ndarray:
    """A new array with pixels' channels (named by `source`, e.g. "BGRA") in `target` order.

    A channel the source lacks is alpha, filled opaque.
    """
    out = np.empty((*pixels.shape[:2], len(target)), np.uint8)
    for index, channel in enumerate(target):
        out[..., index] = pixels[..., source.index(channel)] if channel in source else 255
    return out


def _system_name(system: str) -> str:
    return {"Darwin": "macOS"}.get(system, system or "an unknown system")
