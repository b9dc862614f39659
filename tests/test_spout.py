"""Spout in and out against a fake SpoutGL module that behaves as the real binding does.

The fake follows Python-SpoutGL's API and Spout's C++ behaviour as the reference sheet
(host-integration.md §2) and the Spout SDK document them:
- receiveImage(buffer, gl_format, invert, host_fbo) -> bool. None (or an empty buffer)
  means "no pixels". With no sender it returns False and the receiver is released
  (size back to 0x0). When a sender is new or changed it returns True without copying,
  and isUpdated() is True once. Otherwise it copies the texture into the buffer in
  gl_format's byte order and returns True; with no pixels it returns False.
- The binding checks the buffer against the sender size last seen before calling
  C++, and raises BufferError("Buffer not large enough") when it is too small.
- isFrameNew() says whether the last copy was a new frame; it means something only
  while isFrameCountEnabled().
- sendImage is labelled (buffer, height, width, ...) but its 2nd and 3rd arguments
  reach C++ SendImage(pixels, width, height, ...) in that position.
- getSenderFormat() is a DXGI code: 87 = B8G8R8A8 (Spout's default), 28 = R8G8B8A8.
- Spout calls need a GL context: createOpenGL() makes a hidden one.
"""

import sys
import types

import numpy as np
import pytest

from bridge.protocol import ProtocolError
from bridge.spout import SpoutReceiver, SpoutSender, SpoutUnavailable, list_senders, load_spoutgl

pytestmark = pytest.mark.timeout(30)

GL_RGBA, GL_BGRA_EXT, GL_RGB, GL_BGR_EXT = 0x1908, 0x80E1, 0x1907, 0x80E0
GL_ORDER = {GL_RGBA: "RGBA", GL_BGRA_EXT: "BGRA", GL_RGB: "RGB", GL_BGR_EXT: "BGR"}
DXGI_B8G8R8A8, DXGI_R8G8B8A8 = 87, 28
DXGI_ORDER = {DXGI_B8G8R8A8: "BGRA", DXGI_R8G8B8A8: "RGBA"}


def convert(pixels: np.ndarray, source: str, target: str) -> np.ndarray:
    """What OpenGL does between channel orders; a missing alpha reads as opaque."""
    planes = {channel: pixels[..., i] for i, channel in enumerate(source)}
    planes.setdefault("A", np.full(pixels.shape[:2], 255, np.uint8))
    return np.stack([planes[channel] for channel in target], axis=-1)


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An RGBA image whose channels all differ, so any swap shows."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(1, 255, (height, width, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    return pixels


class SharedTexture:
    """One sender's texture, as Spout's shared memory describes it. A resize makes a new one."""

    def __init__(self, width: int, height: int, dxgi_format: int):
        self.width, self.height, self.dxgi_format = width, height, dxgi_format
        self.pixels = np.zeros((height, width, 4), np.uint8)  # in the DXGI format's byte order
        self.frame_count = 0


class FakeSpoutMachine:
    """The Spout state of one machine, shared by every fake sender and receiver on it."""

    def __init__(self):
        self.senders: dict[str, SharedTexture] = {}  # in the order they started
        self.frame_counting = True  # Spout's global "frame count" setting
        self.frame_sync_signals: set[str] = set()
        self.receivers: list[FakeReceiver] = []
        self.spout_senders: list[FakeSender] = []

    def publish(self, name: str, rgba: np.ndarray, dxgi_format: int = DXGI_B8G8R8A8) -> None:
        """Another application draws a frame into its sender `name`."""
        height, width = rgba.shape[:2]
        texture = self.senders.get(name)
        if texture is None or (texture.width, texture.height, texture.dxgi_format) != (width, height, dxgi_format):
            frame_count = texture.frame_count if texture else 0  # the sender's count goes on across a resize
            texture = self.senders[name] = SharedTexture(width, height, dxgi_format)
            texture.frame_count = frame_count
        texture.pixels = convert(rgba, "RGBA", DXGI_ORDER[dxgi_format])
        texture.frame_count += 1

    def close_sender(self, name: str) -> None:
        self.senders.pop(name, None)

    def active_sender(self) -> str:
        return next(iter(self.senders), "")

    def module(self) -> types.ModuleType:
        spoutgl = types.ModuleType("SpoutGL")
        spoutgl.SpoutReceiver = lambda: FakeReceiver(self)
        spoutgl.SpoutSender = lambda: FakeSender(self)
        spoutgl.enums = types.SimpleNamespace(
            GL_RGBA=GL_RGBA, GL_BGRA_EXT=GL_BGRA_EXT, GL_RGB=GL_RGB, GL_BGR_EXT=GL_BGR_EXT
        )
        return spoutgl


class FakeReceiver:
    def __init__(self, machine: FakeSpoutMachine):
        self._machine = machine
        machine.receivers.append(self)
        self.gl_context = False
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

    def createOpenGL(self) -> bool:
        self.gl_context = True
        return True

    def closeOpenGL(self) -> bool:
        self.gl_context = False
        return True

    def setReceiverName(self, name: str) -> None:
        self._name = name

    def receiveImage(self, buffer, gl_format: int, invert: bool, host_fbo: int) -> bool:
        assert self.gl_context, "Cannot get GL device context"
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
        self._updated = texture is not self._texture
        if self._updated:  # and frame counting restarts for the new texture (EnableFrameCount)
            self._texture, self._width, self._height = texture, texture.width, texture.height
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
        return list(self._machine.senders)

    def getActiveSender(self) -> str:
        return self._machine.active_sender()

    def getSenderInfo(self, name: str):
        texture = self._machine.senders[name]
        return types.SimpleNamespace(width=texture.width, height=texture.height)

    def waitFrameSync(self, sender_name: str, timeout: int = 0) -> bool:
        self.frame_sync_waits.append((sender_name, timeout))
        return sender_name in self._machine.frame_sync_signals

    def releaseReceiver(self) -> None:
        self.released = True


class FakeSender:
    def __init__(self, machine: FakeSpoutMachine):
        self._machine = machine
        machine.spout_senders.append(self)
        self.gl_context = False
        self.name = ""

    def createOpenGL(self) -> bool:
        self.gl_context = True
        return True

    def closeOpenGL(self) -> bool:
        self.gl_context = False
        return True

    def setSenderName(self, name: str) -> None:
        self.name = name

    def sendImage(self, buffer, height: int, width: int, gl_format: int, invert: bool, host_fbo: int) -> bool:
        # Labelled as the binding labels them; C++ SendImage takes this position as width.
        cpp_width, cpp_height = height, width
        assert self.gl_context, "Cannot get GL device context"
        channels = len(GL_ORDER[gl_format])
        if buffer.nbytes < cpp_width * cpp_height * channels:
            raise BufferError("Buffer not large enough")
        if not buffer.flags.c_contiguous:
            raise BufferError("Buffer must be contiguous")
        sent = buffer.reshape(-1)[: cpp_width * cpp_height * channels].reshape(cpp_height, cpp_width, channels)
        self._machine.publish(self.name, convert(sent, GL_ORDER[gl_format], "RGBA"))
        return True

    def setFrameSync(self, sender_name: str) -> None:
        self._machine.frame_sync_signals.add(sender_name)

    def releaseSender(self) -> None:
        self._machine.close_sender(self.name)


@pytest.fixture
def spout(monkeypatch) -> FakeSpoutMachine:
    machine = FakeSpoutMachine()
    monkeypatch.setitem(sys.modules, "SpoutGL", machine.module())
    return machine


def connect(receiver: SpoutReceiver) -> None:
    """The first receive finds the sender and only allocates, as with the real binding."""
    assert receiver.receive() is None
    assert receiver.connected


# ----------------------------------------------------------------------------- receiving


@pytest.mark.parametrize("format, order", [("rgba8", "RGBA"), ("rgb8", "RGB"), ("bgra8", "BGRA")])
def test_a_bgra_sender_is_read_in_its_own_order_and_converted(spout, format, order):
    sent = image(4, 6)
    spout.publish("TD", sent, DXGI_B8G8R8A8)
    with SpoutReceiver("TD", format=format) as receiver:
        connect(receiver)
        got = receiver.receive()
        assert got.dtype == np.uint8 and got.shape == (4, 6, len(order))
        assert np.array_equal(got, convert(sent, "RGBA", order))
        # Read as the texture stores it; swapping is left to us, not to the driver.
        assert spout.receivers[0].receive_formats[-1] == GL_BGRA_EXT


def test_an_rgba_sender_is_read_as_rgba(spout):
    sent = image(3, 5)
    spout.publish("TD", sent, DXGI_R8G8B8A8)
    with SpoutReceiver("TD") as receiver:
        connect(receiver)
        assert np.array_equal(receiver.receive(), sent)
        assert spout.receivers[0].receive_formats[-1] == GL_RGBA


def test_a_size_change_reallocates_and_the_new_size_is_read(spout):
    with SpoutReceiver("TD") as receiver:
        spout.publish("TD", image(4, 6, seed=1))
        connect(receiver)
        assert receiver.size == (6, 4)
        assert receiver.receive().shape == (4, 6, 4)

        bigger = image(8, 10, seed=2)
        spout.publish("TD", bigger)
        assert receiver.receive() is None  # this call only learns the new size
        assert receiver.size == (10, 8)
        assert np.array_equal(receiver.receive(), bigger)  # the binding would raise on a small buffer

        smaller = image(2, 2, seed=3)
        spout.publish("TD", smaller)
        assert receiver.receive() is None
        assert np.array_equal(receiver.receive(), smaller)


def test_a_frame_that_is_not_new_is_not_returned_again(spout):
    with SpoutReceiver("TD") as receiver:
        spout.publish("TD", image(4, 4, seed=1))
        connect(receiver)
        assert receiver.receive() is not None
        assert receiver.receive() is None  # the sender has not drawn since
        assert receiver.receive() is None
        second = image(4, 4, seed=2)
        spout.publish("TD", second)
        assert np.array_equal(receiver.receive(), second)
        assert receiver.receive() is None


def test_without_frame_counting_every_copy_counts_as_new(spout):
    spout.frame_counting = False  # a Spout setting; then isFrameNew() means nothing
    with SpoutReceiver("TD") as receiver:
        spout.publish("TD", image(4, 4))
        connect(receiver)
        assert receiver.receive() is not None
        assert receiver.receive() is not None


def test_a_vanished_sender_is_waited_for_and_picked_up_again(spout):
    with SpoutReceiver("TD") as receiver:
        spout.publish("TD", image(4, 6, seed=1))
        connect(receiver)
        assert receiver.receive() is not None

        spout.close_sender("TD")
        for _ in range(3):  # the engine keeps polling while the sender is gone
            assert receiver.receive() is None
            assert not receiver.connected and receiver.size is None

        back = image(6, 8, seed=2)  # back, and at another size
        spout.publish("TD", back)
        connect(receiver)
        assert receiver.size == (8, 6)
        assert np.array_equal(receiver.receive(), back)


def test_the_first_copies_after_connecting_are_skipped_while_still_all_zero(spout):
    with SpoutReceiver("TD") as receiver:
        spout.publish("TD", np.zeros((4, 4, 4), np.uint8))  # nothing drawn yet
        connect(receiver)
        assert receiver.receive() is None
        first = image(4, 4)
        spout.publish("TD", first)
        assert np.array_equal(receiver.receive(), first)
        black = np.zeros((4, 4, 4), np.uint8)  # after a real frame, black is a frame like any other
        spout.publish("TD", black)
        assert np.array_equal(receiver.receive(), black)


def test_no_sender_name_means_the_active_sender(spout):
    spout.publish("first", image(2, 2, seed=1))
    spout.publish("second", image(2, 2, seed=2))
    with SpoutReceiver() as receiver:
        connect(receiver)
        assert np.array_equal(receiver.receive(), image(2, 2, seed=1))


def test_waiting_uses_the_senders_frame_sync(spout):
    with SpoutReceiver() as receiver:
        spout.publish("TD", image(2, 2))
        connect(receiver)
        assert receiver.wait_for_frame(0.25) is False
        spout.frame_sync_signals.add("TD")
        assert receiver.wait_for_frame(0.25) is True
        assert spout.receivers[0].frame_sync_waits == [("TD", 250), ("TD", 250)]


def test_a_receiver_owns_a_hidden_gl_context_for_its_lifetime(spout):
    receiver = SpoutReceiver("TD")
    fake = spout.receivers[0]
    assert fake.gl_context
    receiver.close()
    assert fake.released and not fake.gl_context


def test_an_unknown_format_is_refused(spout):
    with pytest.raises(ProtocolError) as caught:
        SpoutReceiver("TD", format="yuv420")
    assert caught.value.field == "format"


# ------------------------------------------------------------------------------- sending


def test_the_sender_is_called_with_width_before_height(spout):
    sent = image(4, 6)  # not square, so a swap shows
    with SpoutSender("engine") as sender:
        assert sender.send(sent, "rgba8")
        texture = spout.senders["engine"]
        assert (texture.width, texture.height) == (6, 4)
        assert np.array_equal(convert(texture.pixels, "BGRA", "RGBA"), sent)


@pytest.mark.parametrize("format", ["rgba8", "bgra8", "rgb8"])
def test_every_protocol_format_is_sent_with_its_colours_intact(spout, format):
    rgba = image(3, 5)
    order = {"rgba8": "RGBA", "bgra8": "BGRA", "rgb8": "RGB"}[format]
    with SpoutSender("engine") as sender:
        sender.send(convert(rgba, "RGBA", order), format)
        assert np.array_equal(convert(spout.senders["engine"].pixels, "BGRA", "RGBA"), rgba)


def test_what_a_sender_sends_a_receiver_gets_and_frame_sync_is_signalled(spout):
    frames = [image(4, 6, seed=seed) for seed in range(3)]
    with SpoutSender("engine") as sender, SpoutReceiver("engine") as receiver:
        sender.send(frames[0])
        connect(receiver)
        for frame in frames:
            sender.send(frame)
            assert np.array_equal(receiver.receive(), frame)
        assert "engine" in spout.frame_sync_signals


def test_closing_a_sender_removes_it(spout):
    sender = SpoutSender("engine")
    sender.send(image(2, 2))
    assert [info.name for info in list_senders()] == ["engine"]
    sender.close()
    assert list_senders() == []
    assert not spout.spout_senders[0].gl_context


def test_a_frame_of_the_wrong_shape_is_refused(spout):
    with SpoutSender("engine") as sender:
        for wrong in (np.zeros((4, 6, 3), np.uint8), np.zeros((4, 6, 4), np.float32), np.zeros((4, 6), np.uint8)):
            with pytest.raises(ProtocolError) as caught:
                sender.send(wrong, "rgba8")
            assert caught.value.field == "pixels"


# ------------------------------------------------------------------------ listing, absence


def test_senders_are_listed_with_size_and_which_is_active(spout):
    spout.publish("TD", image(4, 6))
    spout.publish("Resolume", image(720, 1280))
    assert [(s.name, s.width, s.height, s.active) for s in list_senders()] == [
        ("TD", 6, 4, True),
        ("Resolume", 1280, 720, False),
    ]


def test_without_spoutgl_off_windows_the_error_says_spout_is_windows_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "SpoutGL", None)  # import SpoutGL now fails
    monkeypatch.setattr("platform.system", lambda: "Linux")
    with pytest.raises(SpoutUnavailable) as caught:
        SpoutReceiver("TD")
    assert "Windows-only" in caught.value.reason and "Linux" in caught.value.reason
    assert "shm or zmq" in caught.value.fix


def test_without_spoutgl_on_windows_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "SpoutGL", None)
    monkeypatch.setattr("platform.system", lambda: "Windows")
    with pytest.raises(SpoutUnavailable) as caught:
        load_spoutgl()
    assert "not installed" in caught.value.reason
    assert "pip install SpoutGL" in caught.value.fix
