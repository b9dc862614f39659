"""Syphon in and out against a fake syphon-python that follows its documented API.

syphon-python (cansik/syphon-python, DOCUMENTATION.md and its modules):
- SyphonServerDirectory().servers -> [SyphonServerDescription(uuid, name, app_name, icon, raw)],
  running the run loop for `run_loop_interval` seconds first; update_run_loop().
- SyphonMetalClient(description): is_valid, has_new_frame (a frame was published since
  the last new_frame_image), new_frame_image (an MTLTexture: width(), height(),
  pixelFormat()), stop().
- SyphonMetalServer(name): device, publish_frame_texture(texture, region=None, size=None,
  is_flipped=False), stop().
- syphon.utils.raw.create_mtl_texture(device, width, height, pixel_format=RGBA8Unorm);
  syphon.utils.numpy.copy_image_to_mtl_texture(image (h, w, 4), texture) and
  copy_mtl_texture_to_image(texture) -> (h, w, 4) uint8, 8-bit RGBA/BGRA textures only.
"""

import itertools
import sys
import types

import numpy as np
import pytest

from bridge.protocol import ProtocolError
from bridge.syphon import MTL_BGRA8, MTL_RGBA8, SyphonReceiver, SyphonSender, SyphonUnavailable, list_servers

pytestmark = pytest.mark.timeout(30)

MTL_RGBA16_FLOAT = 115


class Texture:
    def __init__(self, pixels: np.ndarray, pixel_format: int):
        self.pixels, self.pixel_format = pixels, pixel_format

    def width(self) -> int:
        return self.pixels.shape[1]

    def height(self) -> int:
        return self.pixels.shape[0]

    def pixelFormat(self) -> int:
        return self.pixel_format


class FakeSyphonMachine:
    """The Syphon servers of one Mac: what other applications share, and what ours publish."""

    def __init__(self):
        self.shared: dict[str, tuple[str, Texture, int]] = {}  # name -> (uuid, texture, frame number)
        self.published: dict[str, list[tuple[np.ndarray, bool]]] = {}  # our servers: (pixels, is_flipped)
        self._uuids = itertools.count()

    def share(self, name: str, pixels: np.ndarray, pixel_format: int = MTL_BGRA8) -> None:
        uuid, _, number = self.shared.get(name, (f"uuid-{next(self._uuids)}", None, 0))
        self.shared[name] = (uuid, Texture(pixels, pixel_format), number + 1)

    def retire(self, name: str) -> None:
        del self.shared[name]

    def modules(self) -> dict[str, types.ModuleType]:
        machine = self
        syphon = types.ModuleType("syphon")

        class SyphonServerDirectory:
            def __init__(self):
                self.run_loop_interval = 1.0

            @property
            def servers(self):
                self.update_run_loop()
                return [
                    types.SimpleNamespace(uuid=uuid, name=name, app_name="TouchDesigner", icon=None, raw=name)
                    for name, (uuid, _, _) in machine.shared.items()
                ]

            def update_run_loop(self):
                assert self.run_loop_interval == 0.0, "a receive would block for run_loop_interval"

        class SyphonMetalClient:
            def __init__(self, description):
                self._name, self._uuid, self._seen = description.raw, description.uuid, 0

            @property
            def is_valid(self):
                return self._name in machine.shared and machine.shared[self._name][0] == self._uuid

            @property
            def has_new_frame(self):
                return self.is_valid and machine.shared[self._name][2] != self._seen

            @property
            def new_frame_image(self):
                _, texture, self._seen = machine.shared[self._name]
                return texture

            def stop(self):
                pass

        class SyphonMetalServer:
            def __init__(self, name):
                self.name, self.device = name, object()
                machine.published[name] = []

            def publish_frame_texture(self, texture, region=None, size=None, is_flipped=False):
                machine.published[self.name].append((texture.pixels.copy(), is_flipped))

            def stop(self):
                del machine.published[self.name]

        def create_mtl_texture(device, width, height, pixel_format=MTL_RGBA8):
            return Texture(np.zeros((height, width, 4), np.uint8), pixel_format)

        def copy_image_to_mtl_texture(image, texture):
            assert image.shape == texture.pixels.shape and image.shape[2] == 4
            texture.pixels[...] = image

        def copy_mtl_texture_to_image(texture):
            if texture.pixelFormat() not in (MTL_RGBA8, MTL_BGRA8):
                raise Exception("Not correct pixel format")
            return texture.pixels.copy()

        syphon.SyphonServerDirectory = SyphonServerDirectory
        syphon.SyphonMetalClient = SyphonMetalClient
        syphon.SyphonMetalServer = SyphonMetalServer
        utils = types.ModuleType("syphon.utils")
        numpy_utils = types.ModuleType("syphon.utils.numpy")
        numpy_utils.copy_image_to_mtl_texture = copy_image_to_mtl_texture
        numpy_utils.copy_mtl_texture_to_image = copy_mtl_texture_to_image
        raw_utils = types.ModuleType("syphon.utils.raw")
        raw_utils.create_mtl_texture = create_mtl_texture
        syphon.utils, utils.numpy, utils.raw = utils, numpy_utils, raw_utils
        return {
            "syphon": syphon, "syphon.utils": utils, "syphon.utils.numpy": numpy_utils, "syphon.utils.raw": raw_utils
        }


@pytest.fixture
def mac(monkeypatch) -> FakeSyphonMachine:
    machine = FakeSyphonMachine()
    for name, module in machine.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
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
