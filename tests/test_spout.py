"""Spout in and out against a fake SpoutGL module that behaves as the real binding does
(tests/fake_spoutgl.py says how, and from which sources)."""

import sys
import threading

import numpy as np
import pytest

from bridge.protocol import ProtocolError
from bridge.spout import SpoutReceiver, SpoutSender, SpoutUnavailable, list_senders, load_spoutgl
from fake_spoutgl import DXGI_B8G8R8A8, DXGI_R8G8B8A8, GL_BGRA_EXT, GL_RGBA, FakeSpoutMachine, convert

pytestmark = pytest.mark.timeout(30)


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An RGBA image whose channels all differ, so any swap shows."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(1, 255, (height, width, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    return pixels


@pytest.fixture
def spout(monkeypatch, tmp_path) -> FakeSpoutMachine:
    machine = FakeSpoutMachine(tmp_path)
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
        assert receiver.wait_for_frame(0.25) is True  # a sender that never signals: Spout does not block
        spout.signal_frame("TD")
        assert receiver.wait_for_frame(0.25) is True
        assert receiver.wait_for_frame(0.25) is False  # the signal was taken: this one times out
        assert spout.receivers[0].frame_sync_waits == [("TD", 250)] * 3


def test_a_receiver_owns_a_hidden_gl_context_for_its_lifetime(spout):
    receiver = SpoutReceiver("TD")
    fake = spout.receivers[0]
    assert fake.gl_context
    receiver.close()
    assert fake.released and not fake.gl_context


def test_objects_made_on_one_thread_share_its_context_and_only_there(spout):
    failures = []

    def receive_here(receiver):
        try:
            receiver.receive()
        except AssertionError as error:
            failures.append(str(error))

    with SpoutReceiver("TD") as receiver, SpoutSender("engine") as sender:
        assert spout.gl_contexts == {threading.get_ident(): spout.receivers[0]}  # the sender works in it
        other = threading.Thread(target=receive_here, args=(receiver,))
        other.start()
        other.join()
        assert failures == ["Cannot get GL device context"]
        assert sender.send(image(2, 2))
    assert spout.gl_contexts == {}  # the sender was closed first, then the receiver with the context


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
        assert spout.frame_signalled("engine")


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
