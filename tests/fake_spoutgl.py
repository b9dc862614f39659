"""A fake SpoutGL module that behaves as the real binding does, for tests on any OS.

It follows Python-SpoutGL's API and Spout's C++ behaviour as the reference sheet
(host-integration.md §2) and the Spout SDK document them:
- receiveImage(buffer, gl_format, invert, host_fbo) -> bool. None (or an empty buffer)
  means "no pixels". With no sender it returns False and the receiver is released
  (size back to 0x0). When a sender is new or changed (another shared texture) it
  returns True without copying, and isUpdated() is True once. Otherwise it copies the
  texture into the buffer in gl_format's byte order and returns True; with no pixels
  it returns False.
- The binding checks the buffer against the sender size last seen before calling
  C++, and raises BufferError("Buffer not large enough") when it is too small.
- isFrameNew() says whether the last copy was a new frame; it means something only
  while isFrameCountEnabled().
- sendImage is labelled (buffer, height, width, ...) but its 2nd and 3rd arguments
  reach C++ SendImage(pixels, width, height, ...) in that position.
- getSenderFormat() is a DXGI code: 87 = B8G8R8A8 (Spout's default), 28 = R8G8B8A8.
- Spout calls need an OpenGL context current on the calling thread. createOpenGL()
  makes a hidden one current on this thread, or returns True at once when the thread
  already has one (the object then works in that one); closeOpenGL() destroys the
  context only when this object made it. Releasing a sender that is sending frees its
  GL/DirectX interop objects, which needs the context too.
- Frame sync: a sender's first setFrameSync(name) creates the named auto-reset event,
  and each call signals it; waitFrameSync(name, timeout_ms) returns True once signalled
  (taking the signal) or False after the timeout, and returns True at once when the
  sender never made the event (Spout does not block then). releaseSender closes it.

Spout keeps its senders in shared memory that every process on the machine sees; the
fake keeps them as files in a folder, FakeSpoutMachine(folder), so that an engine
process a test starts sees the senders the test publishes, and the test sees the
engine's. tests/spoutgl/SpoutGL.py is the fake as an importable module for such a process.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
import types
from pathlib import Path
from urllib.parse import quote

import numpy as np

GL_RGBA, GL_BGRA_EXT, GL_RGB, GL_BGR_EXT = 0x1908, 0x80E1, 0x1907, 0x80E0
GL_ORDER = {GL_RGBA: "RGBA", GL_BGRA_EXT: "BGRA", GL_RGB: "RGB", GL_BGR_EXT: "BGR"}
DXGI_B8G8R8A8, DXGI_R8G8B8A8 = 87, 28
DXGI_ORDER = {DXGI_B8G8R8A8: "BGRA", DXGI_R8G8B8A8: "RGBA"}
FOLDER_ENV = "FAKE_SPOUT_DIR"  # the folder of the machine's Spout state, for tests/spoutgl/SpoutGL.py


def convert(pixels: np.ndarray, source: str, target: str) -> np.ndarray:
    """What OpenGL does between channel orders; a missing alpha reads as opaque."""
    planes = {channel: pixels[..., i] for i, channel in enumerate(source)}
    planes.setdefault("A", np.full(pixels.shape[:2], 255, np.uint8))
    return np.stack([planes[channel] for channel in target], axis=-1)


class SharedTexture:
    """One sender's texture, as Spout's shared memory describes it. A resize makes a new
    one, with a new share handle."""

    def __init__(self, width: int, height: int, dxgi_format: int, frame_count: int = 0, started_ns: int = 0):
        self.width, self.height, self.dxgi_format = width, height, dxgi_format
        self.pixels = np.zeros((height, width, 4), np.uint8)  # in the DXGI format's byte order
        self.frame_count = frame_count
        self.handle = secrets.randbits(62)
        self.started_ns = started_ns or time.time_ns()  # when the sender started, for the sender list's order


class SenderTable:
    """The machine's senders by name, one file each: written whole and renamed into
    place, so that a reader in another process sees one frame or the next, never half."""

    def __init__(self, folder: Path):
        self._folder = folder

    def get(self, name: str) -> SharedTexture | None:
        try:
            with np.load(self._path(name)) as stored:
                width, height, dxgi_format, frame_count, handle, started_ns = (int(v) for v in stored["meta"])
                texture = SharedTexture(width, height, dxgi_format, frame_count, started_ns)
                texture.pixels, texture.handle = stored["pixels"], handle
                return texture
        except FileNotFoundError:
            return None

    def __getitem__(self, name: str) -> SharedTexture:
        texture = self.get(name)
        if texture is None:
            raise KeyError(name)
        return texture

    def __setitem__(self, name: str, texture: SharedTexture) -> None:
        meta = np.array([texture.width, texture.height, texture.dxgi_format, texture.frame_count, texture.handle,
                         texture.started_ns], np.int64)
        partial = self._folder / f".{quote(name, safe='')}.{os.getpid()}.{threading.get_ident()}"
        with open(partial, "wb") as file:
            np.savez(file, pixels=texture.pixels, meta=meta, name=np.array(name))
        os.replace(partial, self._path(name))

    def pop(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def names(self) -> list[str]:
        """In the order the senders started."""
        started = {}
        for path in self._folder.glob("*.npz"):
            try:
                with np.load(path) as stored:
                    started[str(stored["name"])] = int(stored["meta"][5])
            except FileNotFoundError:
                continue  # closed meanwhile
        return sorted(started, key=started.get)

    def _path(self, name: str) -> Path:
        return self._folder / f"{quote(name, safe='')}.npz"


class FakeSpoutMachine:
    """The Spout state of one machine (kept in `folder`), shared by every fake sender and
    receiver on it, in this process and others. GL contexts are this process's own."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.senders = SenderTable(self.folder)
        self.frame_counting = True  # Spout's global "frame count" setting
        self.receivers: list[FakeReceiver] = []  # made in this process
        self.spout_senders: list[FakeSender] = []
        self.gl_contexts: dict[int, object] = {}  # thread ident -> the Spout object that made its context
        self.lock = threading.Lock()

    # -- what other applications do
    def publish(self, name: str, rgba: np.ndarray, dxgi_format: int = DXGI_B8G8R8A8) -> None:
        """Another application draws a frame into its sender `name`."""
        height, width = rgba.shape[:2]
        texture = self.senders.get(name)
        if texture is None or (texture.width, texture.height, texture.dxgi_format) != (width, height, dxgi_format):
            # The sender's count and place in the list go on across a resize.
            texture = SharedTexture(width, height, dxgi_format, texture.frame_count if texture else 0,
                                    texture.started_ns if texture else 0)
        texture.pixels = convert(rgba, "RGBA", DXGI_ORDER[dxgi_format])
        texture.frame_count += 1
        self.senders[name] = texture

    def close_sender(self, name: str) -> None:
        self.senders.pop(name)
        for path in (self._event_path(name), self._signal_path(name)):
            path.unlink(missing_ok=True)

    def signal_frame(self, name: str) -> None:
        """A sender's setFrameSync(name): makes the event on the first call, signals it."""
        self._event_path(name).touch()
        self._signal_path(name).touch()

    def frame_signalled(self, name: str) -> bool:
        return self._signal_path(name).exists()

    def active_sender(self) -> str:
        return next(iter(self.senders.names()), "")

    def module(self) -> types.ModuleType:
        spoutgl = types.ModuleType("SpoutGL")
        spoutgl.SpoutReceiver = lambda: FakeReceiver(self)
        spoutgl.SpoutSender = lambda: FakeSender(self)
        spoutgl.enums = types.SimpleNamespace(
            GL_RGBA=GL_RGBA, GL_BGRA_EXT=GL_BGRA_EXT, GL_RGB=GL_RGB, GL_BGR_EXT=GL_BGR_EXT
        )
        return spoutgl

    # -- what the binding does inside
    def wait_frame_sync(self, name: str, timeout_ms: int) -> bool:
        if not self._event_path(name).exists():
            return True  # the sender never signals frames: Spout does not block
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            try:
                self._signal_path(name).unlink()  # an auto-reset event: one wait takes the signal
                return True
            except FileNotFoundError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.001)

    def create_gl_context(self, owner: object) -> None:
        with self.lock:
            self.gl_contexts.setdefault(threading.get_ident(), owner)

    def close_gl_context(self, owner: object) -> None:
        with self.lock:
            if self.gl_contexts.get(threading.get_ident()) is owner:
                del self.gl_contexts[threading.get_ident()]

    def check_gl_context(self) -> None:
        assert threading.get_ident() in self.gl_contexts, "Cannot get GL device context"

    def _event_path(self, name: str) -> Path:
        return self.folder / f"{quote(name, safe='')}.event"

    def _signal_path(self, name: str) -> Path:
        return self.folder / f"{quote(name, safe='')}.signal"


class _SpoutObject:
    """What receivers and senders share: the GL context."""

    def __init__(self, machine: FakeSpoutMachine):
        self._machine = machine

    @property
    def gl_context(self) -> bool:
        """Whether this object can work here: the calling thread has a current context."""
        return threading.get_ident() in self._machine.gl_contexts

    def createOpenGL(self) -> bool:
        self._machine.create_gl_context(self)
        return True

    def closeOpenGL(self) -> bool:
        self._machine.close_gl_context(self)
        return True


class FakeReceiver(_SpoutObject):
    def __init__(self, machine: FakeSpoutMachine):
        super().__init__(machine)
        machine.receivers.append(self)
        self.released = False
        self.receive_formats: list[int] = []
        self.frame_sync_waits: list[tuple[str, int]] = []
        self._name = ""
        self._texture: SharedTexture | None = None
        self._width = self._height = 0
        self._updated = False
        self._frame_new = False
        self._last_frame_count = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.releaseReceiver()

    def setReceiverName(self, name: str) -> None:
        self._name = name

    def receiveImage(self, buffer, gl_format: int, invert: bool, host_fbo: int) -> bool:
        self._machine.check_gl_context()
        assert (invert, host_fbo) == (False, 0)
        self.receive_formats.append(gl_format)
        pixels = None if buffer is None or buffer.size == 0 else buffer
        if pixels is not None:
            if pixels.nbytes < self._width * self._height * len(GL_ORDER[gl_format]):
                raise BufferError("Buffer not large enough")
            if not pixels.flags.c_contiguous:
                raise BufferError("Buffer must be contiguous")
        texture = self._machine.senders.get(self._name or self._machine.active_sender())
        if texture is None:  # ReleaseReceiver
            self._texture, self._width, self._height = None, 0, 0
            self._last_frame_count = 0
            return False
        self._updated = self._texture is None or texture.handle != self._texture.handle
        self._texture = texture
        if self._updated:  # and frame counting restarts for the new texture (EnableFrameCount)
            self._width, self._height = texture.width, texture.height
            self._last_frame_count = 0
            return True
        if pixels is None:
            return False
        self._frame_new = texture.frame_count != self._last_frame_count
        self._last_frame_count = texture.frame_count
        copied = convert(texture.pixels, DXGI_ORDER[texture.dxgi_format], GL_ORDER[gl_format])
        pixels.reshape(-1)[: copied.size] = copied.reshape(-1)
        return True

    def isUpdated(self) -> bool:
        updated, self._updated = self._updated, False
        return updated

    def isConnected(self) -> bool:
        return self._texture is not None

    def isFrameNew(self) -> bool:
        return self._frame_new

    def isFrameCountEnabled(self) -> bool:
        return self._machine.frame_counting

    def getSenderWidth(self) -> int:
        return self._width

    def getSenderHeight(self) -> int:
        return self._height

    def getSenderFormat(self) -> int:
        return self._texture.dxgi_format if self._texture else DXGI_B8G8R8A8

    def getSenderList(self) -> list[str]:
        return self._machine.senders.names()

    def getActiveSender(self) -> str:
        return self._machine.active_sender()

    def getSenderInfo(self, name: str):
        texture = self._machine.senders[name]
        return types.SimpleNamespace(width=texture.width, height=texture.height)

    def waitFrameSync(self, sender_name: str, timeout: int = 0) -> bool:
        self.frame_sync_waits.append((sender_name, timeout))
        return self._machine.wait_frame_sync(sender_name, timeout)

    def releaseReceiver(self) -> None:
        self.released = True


class FakeSender(_SpoutObject):
    def __init__(self, machine: FakeSpoutMachine):
        super().__init__(machine)
        machine.spout_senders.append(self)
        self.name = ""

    def setSenderName(self, name: str) -> None:
        self.name = name

    def sendImage(self, buffer, height: int, width: int, gl_format: int, invert: bool, host_fbo: int) -> bool:
        # Labelled as the binding labels them; C++ SendImage takes this position as width.
        cpp_width, cpp_height = height, width
        self._machine.check_gl_context()
        assert (invert, host_fbo) == (False, 0)
        channels = len(GL_ORDER[gl_format])
        if buffer.nbytes < cpp_width * cpp_height * channels:
            raise BufferError("Buffer not large enough")
        if not buffer.flags.c_contiguous:
            raise BufferError("Buffer must be contiguous")
        sent = buffer.reshape(-1)[: cpp_width * cpp_height * channels].reshape(cpp_height, cpp_width, channels)
        self._machine.publish(self.name, convert(sent, GL_ORDER[gl_format], "RGBA"))
        return True

    def setFrameSync(self, sender_name: str) -> None:
        self._machine.signal_frame(sender_name)

    def releaseSender(self) -> None:
        if self._machine.senders.get(self.name) is not None:
            self._machine.check_gl_context()
        self._machine.close_sender(self.name)
