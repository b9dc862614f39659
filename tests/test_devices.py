"""`python -m engine devices`: what this machine offers, with why and the fix."""

import platform
import subprocess
import sys
import types
from pathlib import Path

import pytest

from engine.devices import Device, find_devices, format_table, spout_devices

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(platform.system() != "Linux", reason="describes a Linux machine")


@pytest.fixture(autouse=True)
def no_ndi_runtime_in_this_process(monkeypatch):
    """The NDI runtime keeps the network it first met for the life of the process, so a
    listing here would leave the NDI tests later in this process without their private
    network. The NDI rows are tested in a devices process of their own (test_ndi.py)."""
    monkeypatch.setattr("engine.devices.ndi_devices", lambda *args, **kwargs: [])


def rows(kind: str) -> list[Device]:
    return [device for device in find_devices() if device.kind == kind]


@linux_only
def test_on_linux_spout_and_syphon_are_reported_unavailable_with_the_reason():
    (spout,) = rows("spout")
    assert not spout.usable
    assert "Spout is Windows-only" in spout.why and "Linux" in spout.why
    assert spout.fix
    (syphon,) = rows("syphon")
    assert not syphon.usable
    assert "Syphon is macOS-only" in syphon.why and "Linux" in syphon.why
    assert syphon.fix


@linux_only
def test_on_linux_the_v4l2loopback_backend_is_reported_with_why_and_when_missing_the_fix():
    (camera,) = rows("virtual camera")
    assert camera.name == "v4l2loopback"
    if not camera.usable:
        assert camera.why and camera.fix
        assert "modprobe v4l2loopback" in camera.fix or "pip install pyvirtualcam" in camera.fix


@linux_only
def test_the_command_says_spout_and_syphon_are_unavailable_here_and_why():
    result = subprocess.run([sys.executable, "-m", "engine", "devices"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["kind", "name", "usable", "why"]
    spout = lines.index(next(line for line in lines if line.startswith("spout")))
    assert lines[spout].split()[1:3] == ["-", "no"] and "Spout is Windows-only" in lines[spout]
    assert "fix: use the shm or zmq transport here" in lines[spout + 1]
    syphon = lines.index(next(line for line in lines if line.startswith("syphon")))
    assert lines[syphon].split()[1:3] == ["-", "no"] and "Syphon is macOS-only" in lines[syphon]
    assert "fix:" in lines[syphon + 1]
    assert any(line.startswith("virtual camera") for line in lines)


def test_the_command_needs_no_torch():
    check = ("import runpy, sys; sys.argv = ['engine', 'devices']; runpy.run_module('engine', run_name='__main__'); "
             "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False"


def test_spout_senders_are_listed_one_per_row_where_spoutgl_works(monkeypatch):
    senders = {"TouchDesigner": (1280, 720), "Resolume": (1920, 1080)}

    class Receiver:  # what listing senders uses of SpoutGL.SpoutReceiver
        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            pass

        def getActiveSender(self):
            return "TouchDesigner"

        def getSenderList(self):
            return list(senders)

        def getSenderInfo(self, name):
            width, height = senders[name]
            return types.SimpleNamespace(width=width, height=height)

    monkeypatch.setitem(sys.modules, "SpoutGL", types.SimpleNamespace(SpoutReceiver=Receiver))
    assert [(d.name, d.usable, d.why) for d in spout_devices()] == [
        ("(output)", True, "SpoutGL works: the engine can publish a Spout sender"),
        ("TouchDesigner", True, "sender, 1280x720, active"),
        ("Resolume", True, "sender, 1920x1080"),
    ]
    senders.clear()
    assert [(d.name, d.usable) for d in spout_devices()] == [("(output)", True), ("(input)", False)]


def test_the_table_puts_each_fix_under_its_reason():
    table = format_table([
        Device("spout", "-", False, "Spout is Windows-only", "use shm"),
        Device("virtual camera", "obs", True, "device OBS Virtual Camera"),
    ])
    assert table.splitlines() == [
        "kind            name  usable  why",
        "spout           -     no      Spout is Windows-only",
        "                              fix: use shm",
        "virtual camera  obs   yes     device OBS Virtual Camera",
    ]
