"""Syphon in and out (macOS): frames shared as GPU textures between Mac applications.

The macOS counterpart of bridge.spout, for TouchDesigner, Resolume, MadMapper or OBS
(with its Syphon source) on a Mac, through syphon-python (`pip install syphon-python`,
macOS 11 or later; the project's `syphon` extra) and its Metal classes.

    receiver = SyphonReceiver("TouchDesigner")   # a server's name; "" takes the first one
    pixels = receiver.receive()                  # newest new frame, or None
    sender = SyphonSender("StreamDiffusion")
    sender.send(pixels, "rgba8")

How it behaves:
- Servers are found through Syphon's server directory, which learns about servers from
  system notifications delivered to a run loop; each receive() runs that loop once
  without waiting. Use a receiver from the main thread, where those notifications
  arrive.
- A receiver that loses its server (the client turns invalid) looks it up again on the
  next receive() and carries on when it is back.
- Received textures are 8-bit BGRA or RGBA; their bytes are reordered into the format
  asked for. Frames are top-left origin, as everywhere in the bridge.
- A sender publishes its frames flipped, as the reference integration does, because
  Syphon keeps OpenGL's bottom-up row order.

syphon is imported only when a receiver, sender or list_servers needs it, so this
module loads anywhere; where it is missing they raise SyphonUnavailable.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

import numpy as np

from .protocol import FORMATS, ErrorCode, ProtocolError, check_frame_array

# Metal pixel formats (MTLPixelFormat values) a received texture can have.
MTL_RGBA8 = 70
MTL_BGRA8 = 80

# Channel indices that turn a texture's 4 bytes per pixel into each protocol format.
_FROM_TEXTURE = {
    MTL_RGBA8: {"rgba8": [0, 1, 2, 3], "rgb8": [0, 1, 2], "bgra8": [2, 1, 0, 3]},
    MTL_BGRA8: {"rgba8": [2, 1, 0, 3], "rgb8": [2, 1, 0], "bgra8": [0, 1, 2, 3]},
}


class SyphonUnavailable(RuntimeError):
    """Syphon cannot be used on this machine: `reason` says why, `fix` what to do."""

    def __init__(self, reason: str, fix: str):
        self.reason = reason
        self.fix = fix
        super().__init__(f"{reason}. {fix}")


@dataclass(frozen=True)
class SyphonServerInfo:
    """A Syphon server running on this machine."""

    name: str
    app_name: str


def load_syphon() -> Any:
    """Import syphon-python, or raise SyphonUnavailable saying why and what to do."""
    try:
        import syphon
    except ImportError as error:
        system = platform.system()
        if system != "Darwin":
            raise SyphonUnavailable(
                f"Syphon is macOS-only (it shares textures between Mac applications) and this machine runs "
                f"{system or 'an unknown system'}",
                "use the shm or zmq transport here"
                + ("; Spout is the Windows counterpart (bridge.spout)" if system == "Windows" else ""),
            ) from None
        raise SyphonUnavailable(
            f"syphon-python is not installed ({error})",
            "pip install syphon-python (macOS 11 or later), or install this project with its syphon extra",
        ) from None
    return syphon


def list_servers() -> list[SyphonServerInfo]:
    """The Syphon servers running now. Raises SyphonUnavailable."""
    return [SyphonServerInfo(server.name, server.app_name) for server in _directory(load_syphon()).servers]


class SyphonReceiver:
    """Receives a Syphon server's frames as [height, width, channels] uint8 arrays.

    server_name picks the server by its name; empty takes the first server found.
    format is the protocol format of the returned arrays.
    """

    def __init__(self, server_name: str = "", *, format: str = "rgba8"):
        if format not in FORMATS:
            raise ProtocolError(ErrorCode.BAD_VALUE, "format", f"format must be one of {', '.join(FORMATS)}")
        self.server_name = server_name
        self.format = format
        self._syphon = load_syphon()
        from syphon.utils.numpy import copy_mtl_texture_to_image

        self._copy_texture_to_image = copy_mtl_texture_to_image
        self._directory = _directory(self._syphon)
        self._client: Any = None

    @property
    def connected(self) -> bool:
        return self._client is not None

    def receive(self) -> np.ndarray | None:
        """The server's newest frame if it is new since the last call, else None
        (also while the server is not there)."""
        self._directory.update_run_loop()
        if self._client is not None and not self._client.is_valid:
            self._client.stop()
            self._client = None
        if self._client is None:
            self._client = self._connect()
            if self._client is None:
                return None
        if not self._client.has_new_frame:
            return None
        texture = self._client.new_frame_image
        if texture is None:
            return None
        orders = _FROM_TEXTURE.get(texture.pixelFormat())
        if orders is None:
            raise ProtocolError(
                ErrorCode.BAD_VALUE,
                "format",
                f"Syphon server {self.server_name!r} shares Metal pixel format {texture.pixelFormat()}; "
                "only 8-bit RGBA and BGRA textures can be read",
            )
        return self._copy_texture_to_image(texture)[..., orders[self.format]]

    def close(self) -> None:
        if self._client is not None:
            self._client.stop()
            self._client = None

    def __enter__(self) -> SyphonReceiver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _connect(self) -> Any:
        for server in self._directory.servers:
            if not self.server_name or server.name == self.server_name:
                return self._syphon.SyphonMetalClient(server)
        return None


class SyphonSender:
    """Publishes frames as a Syphon server named `name`."""

    def __init__(self, name: str):
        if not name:
            raise ValueError("a Syphon server needs a name")
        self.name = name
        self._syphon = load_syphon()
        from syphon.utils.numpy import copy_image_to_mtl_texture
        from syphon.utils.raw import create_mtl_texture

        self._copy_image_to_texture = copy_image_to_mtl_texture
        self._create_texture = create_mtl_texture
        self._server = self._syphon.SyphonMetalServer(name)
        self._texture: Any = None
        self._texture_size: tuple[int, int] | None = None

    def send(self, pixels: np.ndarray, format: str = "rgba8") -> None:
        """Publish one [height, width, channels] uint8 frame (any size; a new size
        gets a new texture)."""
        height, width = check_frame_array(pixels, format)
        if self._texture_size != (width, height):
            self._texture = self._create_texture(self._server.device, width, height)  # RGBA8
            self._texture_size = (width, height)
        self._copy_image_to_texture(np.ascontiguousarray(_to_rgba(pixels, format)), self._texture)
        self._server.publish_frame_texture(self._texture, is_flipped=True)

    def close(self) -> None:
        self._server.stop()

    def __enter__(self) -> SyphonSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _directory(syphon: Any) -> Any:
    directory = syphon.SyphonServerDirectory()
    directory.run_loop_interval = 0.0  # run the loop once without waiting, on every look-up
    return directory


def _to_rgba(pixels: np.ndarray, format: str) -> np.ndarray:
    if format == "rgba8":
        return pixels
    if format == "bgra8":
        return pixels[..., [2, 1, 0, 3]]
    opaque = np.full((*pixels.shape[:2], 1), 255, np.uint8)
    return np.concatenate([pixels, opaque], axis=2)
