"""Syphon in and out against a fake syphon-python that follows its documented API
(tests/fake_syphon.py lists the calls it follows, and from where)."""

import os
import platform
import sys
import time

import numpy as np
import pytest

from bridge.client import EngineClient, RemoteError
from bridge.protocol import Bye, ParamsUpdate, ProtocolError, StatsRequest
from bridge.syphon import MTL_BGRA8, MTL_RGBA8, SyphonReceiver, SyphonSender, SyphonUnavailable, list_servers
from bridge.zmq_io import HostSocket
from engine import cli
from fake_spoutgl import DXGI_ORDER, FOLDER_ENV as SPOUT_FOLDER_ENV, FakeSpoutMachine, convert
from fake_syphon import FOLDER_ENV, MTL_RGBA16_FLOAT, FakeSyphonMachine
from processes import PATIENCE_S, TESTS, ServedEngine

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def mac(monkeypatch, tmp_path) -> FakeSyphonMachine:
    machine = FakeSyphonMachine(tmp_path)
    machine.install(monkeypatch)
    return machine


def rgba(height: int, width: int, seed: int = 0) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(1, 255, (height, width, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    return pixels


@pytest.mark.parametrize("format, order", [("rgba8", [0, 1, 2, 3]), ("rgb8", [0, 1, 2]), ("bgra8", [2, 1, 0, 3])])
def test_a_bgra_texture_is_converted_to_the_format_asked_for(mac, format, order):
    sent = rgba(4, 6)
    mac.share("TD", sent[..., [2, 1, 0, 3]], MTL_BGRA8)
    with SyphonReceiver("TD", format=format) as receiver:
        assert np.array_equal(receiver.receive(), sent[..., order])


def test_an_rgba_texture_is_read_as_it_is(mac):
    sent = rgba(4, 6)
    mac.share("TD", sent, MTL_RGBA8)
    with SyphonReceiver() as receiver:  # no name: the first server
        assert np.array_equal(receiver.receive(), sent)


def test_a_frame_is_returned_once_and_a_server_that_leaves_is_picked_up_again(mac):
    with SyphonReceiver("TD") as receiver:
        assert receiver.receive() is None and not receiver.connected  # not there yet
        mac.share("TD", rgba(4, 6, seed=1), MTL_RGBA8)
        assert receiver.receive() is not None
        assert receiver.receive() is None  # nothing new
        mac.retire("TD")
        assert receiver.receive() is None and not receiver.connected
        back = rgba(8, 10, seed=2)
        mac.share("TD", back, MTL_RGBA8)
        assert np.array_equal(receiver.receive(), back)


def test_a_texture_that_is_not_8_bit_is_refused_with_a_reason(mac):
    mac.share("TD", rgba(2, 2), MTL_RGBA16_FLOAT)
    with SyphonReceiver("TD") as receiver, pytest.raises(ProtocolError) as caught:
        receiver.receive()
    assert "8-bit" in caught.value.message


@pytest.mark.parametrize("format", ["rgba8", "bgra8", "rgb8"])
def test_the_sender_publishes_rgba_flipped_and_follows_size_changes(mac, format):
    first, second = rgba(4, 6, seed=1), rgba(8, 10, seed=2)
    order = {"rgba8": [0, 1, 2, 3], "bgra8": [2, 1, 0, 3], "rgb8": [0, 1, 2]}[format]
    with SyphonSender("engine") as sender:
        sender.send(np.ascontiguousarray(first[..., order]), format)
        sender.send(np.ascontiguousarray(second[..., order]), format)
        (got_first, flipped), (got_second, _) = mac.published["engine"]
    assert np.array_equal(got_first, first) and np.array_equal(got_second, second)
    assert flipped is True
    assert "engine" not in mac.published  # stopped on close


def test_servers_are_listed(mac):
    mac.share("TD", rgba(2, 2), MTL_RGBA8)
    assert [(s.name, s.app_name) for s in list_servers()] == [("TD", "TouchDesigner")]


def test_without_syphon_off_macos_the_error_says_syphon_is_macos_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "syphon", None)
    monkeypatch.setattr("platform.system", lambda: "Linux")
    with pytest.raises(SyphonUnavailable) as caught:
        SyphonSender("engine")
    assert "macOS-only" in caught.value.reason and "Linux" in caught.value.reason


# ------------------------------------------------------------------- the engine's Syphon sessions


def test_serve_with_syphon_flags_streams_with_no_host_and_publishes_an_extra_spout_output(tmp_path):
    """`serve --syphon-in --syphon-out` (tiny model) in an engine process that imports the fake
    (tests/syphon-python/syphon.py), with `--spout-out` beside it: one session, two sinks."""
    mac, spout = FakeSyphonMachine(tmp_path / "syphon"), FakeSpoutMachine(tmp_path / "spout")
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS / "syphon-python"), str(TESTS / "spoutgl"), str(TESTS)]),
           FOLDER_ENV: str(mac.folder), SPOUT_FOLDER_ENV: str(spout.folder)}
    engine = ServedEngine(tmp_path, "--syphon-in", "camera", "--syphon-out", "stylised", "--syphon-size", "48x40",
                          "--spout-out", "stylised too", "--prompt", "ink", "--session-timeout", "1", env=env)
    frames = cli.test_pattern(16, 40, 48)
    drawn = 0

    def frames_out() -> int:
        latest = mac.latest("stylised")
        return 0 if latest is None else latest[2]

    def draw_until(condition, what: str) -> None:
        nonlocal drawn
        deadline = time.monotonic() + PATIENCE_S
        while not condition():
            assert time.monotonic() < deadline, f"gave up waiting for {what}:\n{engine.log()}"
            mac.share("camera", np.concatenate([frames[drawn % len(frames)], np.full((40, 48, 1), 255, np.uint8)],
                                                axis=2), MTL_RGBA8)
            drawn += 1
            time.sleep(0.03)

    try:
        assert ("Syphon: reading server 'camera', publishing 'stylised' at 48x40, and as Spout sender "
                "'stylised too'") in engine.log()
        draw_until(lambda: frames_out() >= 4, "the first outputs")
        pixels, flipped, _ = mac.latest("stylised")
        assert pixels.shape == (40, 48, 4) and flipped
        time.sleep(1.5)  # longer than --session-timeout: no host, yet nothing closes the session
        streamed = frames_out()
        draw_until(lambda: frames_out() >= streamed + 8, "more outputs")
        # The extra sink got the same frames, in Spout's own format.
        also = spout.senders["stylised too"]
        assert (also.width, also.height) == (48, 40) and also.frame_count >= streamed
        assert convert(also.pixels, DXGI_ORDER[also.dxgi_format], "RGB").std() > 0  # a picture, not nothing

        with HostSocket(engine.address) as host:  # any host may look and change parameters ...
            stats = host.request(StatsRequest(session="syphon"), PATIENCE_S)
            assert (stats["state"], stats["transport"]) == ("streaming", "syphon")
            assert stats["params"]["syphon_input"] == "camera" and stats["params"]["syphon_output"] == "stylised"
            assert host.request(ParamsUpdate(session="syphon", params={"prompt": "chalk"}), PATIENCE_S)[
                "params"]["prompt"] == "chalk"
            with pytest.raises(RemoteError) as refused:  # ... but not close it
                host.request(Bye(session="syphon"), PATIENCE_S)
            assert refused.value.code == "unknown_session"
        assert "session syphon closed" not in engine.log()
    finally:
        assert engine.stop() == 0, engine.log()
    assert mac.latest("stylised") is None and spout.senders.get("stylised too") is None  # gone with the engine


@pytest.mark.skipif(platform.system() == "Darwin", reason="describes a machine without Syphon")
def test_a_hosts_syphon_session_is_refused_where_syphon_is_missing_with_the_reason_and_the_fix(tmp_path):
    engine = ServedEngine(tmp_path)
    try:
        with pytest.raises(RemoteError) as refused:
            EngineClient(engine.address, transport="syphon", width=64, height=64, timeout_s=PATIENCE_S,
                         syphon_input="camera").open()
        assert (refused.value.code, refused.value.field) == ("bad_value", "transport")
        assert "Syphon is macOS-only" in refused.value.message and "shm or zmq" in refused.value.message
    finally:
        assert engine.stop() == 0, engine.log()
    no_syphon = ServedEngine(tmp_path, "--syphon-in", "camera", expect_listening=False)
    assert no_syphon.stop() == 1
    assert "--syphon-in/--syphon-out: Syphon is macOS-only" in no_syphon.log()
