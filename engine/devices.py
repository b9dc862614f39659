"""`python -m engine devices`: the video paths and styles this machine offers, and why each does or does not work.

Lists Spout senders (Windows), Syphon servers (macOS), NDI sources, virtual-camera backends and the
LoRA adapters in the LoRA folder (`--lora-dir`, as `serve` takes it), one row each, with
whether the engine can use it and, when it cannot, the reason and the fix. Needs neither
torch nor a GPU, so it runs on any machine a user is setting up.

    kind            name          usable  why
    spout           -             no      Spout is Windows-only (...) and this machine runs Linux
                                          fix: use the shm or zmq transport here
    virtual camera  v4l2loopback  no      'v4l2loopback' backend: No v4l2 loopback device found (...)
                                          fix: install v4l2loopback (...) and load it: sudo modprobe ...
    lora            ink           yes     wan layout, rank 16, 300 layers adapted; for wan2.1-1.3b
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bridge.ndi import NdiUnavailable, list_sources as list_ndi_sources
from bridge.spout import SpoutUnavailable, list_senders
from bridge.syphon import SyphonUnavailable, list_servers
from bridge.virtualcam import VirtualCameraUnavailable, backends_for_this_platform, open_virtual_camera

from .config import PRESETS
from .models.lora_files import (DEFAULT_LORA_DIR, LORA_SUFFIX, LoraFileError, linear_shapes, plan_lora,
                                safetensors_shapes)

# The size a virtual-camera backend is tried at; any size a backend accepts would do.
PROBE_WIDTH, PROBE_HEIGHT, PROBE_FPS = 640, 480, 30


@dataclass(frozen=True)
class Device:
    """One video path: a Spout sender, a Syphon server or a virtual-camera backend."""

    kind: str  # "spout", "syphon", "ndi", "virtual camera" or "lora"
    name: str  # the sender, server, backend or adapter (its name in a session's loras); "-" when there is none
    usable: bool
    why: str
    fix: str = ""  # what to do, when it is not usable


def find_devices(lora_dir: str | Path = DEFAULT_LORA_DIR) -> list[Device]:
    """Every Spout sender, Syphon server and virtual-camera backend on this machine, and the
    LoRA adapters in lora_dir."""
    return [*spout_devices(), *syphon_devices(), *ndi_devices(), *virtual_camera_devices(), *lora_devices(lora_dir)]


def spout_devices() -> list[Device]:
    try:
        senders = list_senders()
    except SpoutUnavailable as error:
        return [Device("spout", "-", False, error.reason, error.fix)]
    devices = [Device("spout", "(output)", True, "SpoutGL works: the engine can publish a Spout sender")]
    for sender in senders:
        size = f"sender, {sender.width}x{sender.height}"
        devices.append(Device("spout", sender.name, True, size + (", active" if sender.active else "")))
    if not senders:
        devices.append(Device("spout", "(input)", False, "no application is sending over Spout right now"))
    return devices


def syphon_devices() -> list[Device]:
    try:
        servers = list_servers()
    except SyphonUnavailable as error:
        return [Device("syphon", "-", False, error.reason, error.fix)]
    devices = [Device("syphon", "(output)", True, "syphon-python works: the engine can publish a Syphon server")]
    for server in servers:
        devices.append(Device("syphon", server.name or "(unnamed)", True, f"server of {server.app_name}"))
    if not servers:
        devices.append(Device("syphon", "(input)", False, "no application is sharing over Syphon right now"))
    return devices


def ndi_devices(timeout_s: float = 1.0) -> list[Device]:
    """NDI sources found within timeout_s (NDI's discovery answers within a second on a network)."""
    try:
        sources = list_ndi_sources(timeout_s)
    except NdiUnavailable as error:
        return [Device("ndi", "-", False, error.reason, error.fix)]
    devices = [Device("ndi", "(output)", True, "cyndilib and its NDI runtime work: the engine can publish an NDI "
                                               "source")]
    for name in sources:
        devices.append(Device("ndi", name, True, "source (serve --ndi-in takes this name)"))
    if not sources:
        devices.append(Device("ndi", "(input)", False, "no NDI source was found within a second",
                              "start one; on Linux NDI finds sources through avahi-daemon (apt install "
                              "avahi-daemon), which must be running"))
    return devices


def virtual_camera_devices() -> list[Device]:
    """Each of this platform's backends, tried by opening (and closing) a camera."""
    backends = backends_for_this_platform()
    if not backends:
        return [Device("virtual camera", "-", False, "pyvirtualcam has no backend on this system")]
    devices = []
    for backend in backends:
        camera = open_virtual_camera(PROBE_WIDTH, PROBE_HEIGHT, PROBE_FPS, backend=backend)
        if isinstance(camera, VirtualCameraUnavailable):
            devices.append(Device("virtual camera", backend, False, camera.reason, camera.fix))
        else:
            devices.append(Device("virtual camera", backend, True, f"device {camera.device}"))
            camera.close()
    return devices


def lora_devices(folder: str | Path) -> list[Device]:
    """The .safetensors adapters of a LoRA folder, each described from its header: layout, rank,
    layers adapted and the model presets it fits; a file that cannot be used says why."""
    folder = Path(folder).expanduser()
    fix = f"put LoRA adapters for the Wan2.1 DiT ({LORA_SUFFIX}) in {folder}, or choose another folder with --lora-dir"
    if not folder.is_dir():
        return [Device("lora", "-", False, f"no LoRA folder {folder}", fix)]
    files = sorted(folder.glob("*" + LORA_SUFFIX))
    if not files:
        return [Device("lora", "-", False, f"no {LORA_SUFFIX} files in {folder}", fix)]
    return [lora_device(path) for path in files]


def lora_device(path: Path) -> Device:
    try:
        shapes = safetensors_shapes(path)
        plan = plan_lora(path, shapes)
    except LoraFileError as error:
        return Device("lora", path.stem, False, "; ".join(error.problems), "replace the file, or remove it")
    described = f"{plan.layout} layout, {plan.rank_text()}, {len(plan.layers)} layers adapted"
    fits = [name for name, config in PRESETS.items() if _fits(path, shapes, linear_shapes(config))]
    if not fits:
        return Device("lora", path.stem, False, f"{described}; fits no model preset",
                      "use an adapter made for Wan2.1 T2V (1.3B or 14B)")
    return Device("lora", path.stem, True, f"{described}; for {', '.join(fits)}")


def _fits(path: Path, shapes: dict, model: dict) -> bool:
    try:
        plan_lora(path, shapes, model)
    except LoraFileError:
        return False
    return True


def format_table(devices: list[Device]) -> str:
    """One line per device; a device's fix goes on the line below it, under "why"."""
    header = ("kind", "name", "usable")
    cells = [(device.kind, device.name, "yes" if device.usable else "no") for device in devices]
    widths = [max(len(row[column]) for row in (header, *cells)) for column in range(len(header))]

    def line(row: tuple[str, ...], last: str) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + last

    lines = [line(header, "why")]
    for device, row in zip(devices, cells):
        lines.append(line(row, device.why))
        if device.fix:
            lines.append(line(("", "", ""), f"fix: {device.fix}"))
    return "\n".join(lines)
