"""A fake syphon-python that follows its documented API, for tests on any OS.

syphon-python (cansik/syphon-python, DOCUMENTATION.md and its modules), as the reference
sheet (host-integration.md §3) and bridge/syphon.py use it:
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

Syphon's servers are seen by every application on the Mac; the fake keeps them as files
in a folder, FakeSyphonMachine(folder), so that an engine process a test starts sees the
servers the test shares, and the test sees what the engine publishes (the newest frame of
each server, with a count). tests/syphon-python/syphon.py is the fake as an importable module
for such a process (on its PYTHONPATH, with $FAKE_SYPHON_DIR naming the folder; a folder
name that is no package name, so that `import syphon` never finds the folder itself).
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
import types
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np

MTL_RGBA8, MTL_BGRA8, MTL_RGBA16_FLOAT = 70, 80, 115
FOLDER_ENV = "FAKE_SYPHON_DIR"


class Texture:
    def __init__(self, pixels: np.ndarray, pixel_format: int):
        self.pixels, self.pixel_format = pixels, pixel_format

    def width(self) -> int:
        return self.pixels.shape[1]

    def height(self) -> int:
        return self.pixels.shape[0]

    def pixelFormat(self) -> int:
        return self.pixel_format


def _write(path: Path, **arrays) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    with open(partial, "wb") as file:
        np.savez(file, **arrays)
    os.replace(partial, path)  # whole, for a reader in another process at any moment


def _read(path: Path) -> dict | None:
    try:
        with np.load(path) as stored:
            return {key: stored[key] for key in stored.files}
    except (FileNotFoundError, EOFError, ValueError):  # gone meanwhile
        return None


class FakeSyphonMachine:
    """The Syphon servers of one Mac: what other applications share, and what ours publish."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        for part in ("shared", "published"):
            (self.folder / part).mkdir(parents=True, exist_ok=True)
        # Every frame this process's servers published, by server: (pixels, is_flipped).
        self.published: dict[str, list[tuple[np.ndarray, bool]]] = {}

    # -- what other applications do
    def share(self, name: str, pixels: np.ndarray, pixel_format: int = MTL_BGRA8) -> None:
        """Another application publishes a frame as its server `name` (RGBA or BGRA bytes)."""
        before = _read(self._shared(name))
        uuid = str(before["uuid"]) if before else f"uuid-{secrets.token_hex(4)}"
        number = int(before["meta"][1]) + 1 if before else 1
        _write(self._shared(name), pixels=pixels, meta=np.array([pixel_format, number]), uuid=np.array(uuid))

    def retire(self, name: str) -> None:
        self._shared(name).unlink(missing_ok=True)

    def latest(self, name: str) -> tuple[np.ndarray, bool, int] | None:
        """The newest frame one of our servers (in any process) published: pixels, is_flipped, count."""
        stored = _read(self.folder / "published" / f"{quote(name, safe='')}.npz")
        return None if stored is None else (stored["pixels"], bool(stored["meta"][1]), int(stored["meta"][0]))

    def _shared(self, name: str) -> Path:
        return self.folder / "shared" / f"{quote(name, safe='')}.npz"

    def _shared_servers(self) -> list[tuple[str, str]]:
        servers = []
        for path in sorted(self.folder.glob("shared/*.npz")):
            stored = _read(path)
            if stored is not None:
                servers.append((unquote(path.stem), str(stored["uuid"])))
        return servers

    # -- the module
    def modules(self) -> dict[str, types.ModuleType]:
        machine = self
        syphon = types.ModuleType("syphon")

        class SyphonServerDirectory:
            def __init__(self):
                self.run_loop_interval = 1.0

            @property
            def servers(self):
                self.update_run_loop()
                return [types.SimpleNamespace(uuid=uuid, name=name, app_name="TouchDesigner", icon=None, raw=name)
                        for name, uuid in machine._shared_servers()]

            def update_run_loop(self):
                assert self.run_loop_interval == 0.0, "a receive would block for run_loop_interval"

        class SyphonMetalClient:
            def __init__(self, description):
                self._name, self._uuid, self._seen = description.raw, description.uuid, 0

            def _stored(self):
                stored = _read(machine._shared(self._name))
                return stored if stored is not None and str(stored["uuid"]) == self._uuid else None

            @property
            def is_valid(self):
                return self._stored() is not None

            @property
            def has_new_frame(self):
                stored = self._stored()
                return stored is not None and int(stored["meta"][1]) != self._seen

            @property
            def new_frame_image(self):
                stored = self._stored()
                if stored is None:
                    return None
                self._seen = int(stored["meta"][1])
                return Texture(stored["pixels"], int(stored["meta"][0]))

            def stop(self):
                pass

        class SyphonMetalServer:
            def __init__(self, name):
                self.name, self.device, self._count = name, object(), 0
                machine.published[name] = []

            def publish_frame_texture(self, texture, region=None, size=None, is_flipped=False):
                self._count += 1
                machine.published[self.name].append((texture.pixels.copy(), is_flipped))
                _write(machine.folder / "published" / f"{quote(self.name, safe='')}.npz", pixels=texture.pixels,
                       meta=np.array([self._count, int(is_flipped)]))

            def stop(self):
                machine.published.pop(self.name, None)
                (machine.folder / "published" / f"{quote(self.name, safe='')}.npz").unlink(missing_ok=True)

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
        return {"syphon": syphon, "syphon.utils": utils, "syphon.utils.numpy": numpy_utils,
                "syphon.utils.raw": raw_utils}

    def install(self, monkeypatch) -> None:
        """Make `import syphon` (and its submodules) give this fake, for one test."""
        for name, module in self.modules().items():
            monkeypatch.setitem(sys.modules, name, module)
