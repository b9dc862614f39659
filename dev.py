#!/usr/bin/env python3
"""The project's commands, the same on Windows, macOS and Linux (standard library only).

    python3 dev.py demo      (Windows: py dev.py demo)
    python3 dev.py test      (Windows: py dev.py test)

  setup              create .venv and install torch and the project; nothing to do when current
  test [ARGS]        every test; ARGS go to pytest
  test-quick [ARGS]  the tests not marked slow
  demo [ARGS]        python -m engine demo (ARGS go to it, e.g. --download)
  bench              the DiT cache benchmark
  clean              remove .venv and build leftovers

Every command but clean sets the machine up first: a .venv beside this file, the torch
build that fits the machine (CUDA where an NVIDIA driver answers, the platform's default
elsewhere; it says which and why), then this project with the extras the tests need.
It installs again only when pyproject.toml has changed. The Makefile's targets call it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import ntpath
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MIN_PYTHON = (3, 10)
ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = ".installed"  # in .venv: what the last install was made from
TORCH_VERSION = "2.13.0"
# PyPI's Windows torch is CPU-only; the CUDA build comes from PyTorch's own index. CUDA 12.8
# needs an NVIDIA driver 570 or newer; the index must carry TORCH_VERSION.
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu128"
EXTRAS = "engine,wan,video,virtualcam,ndi,dev"  # what the tests and the demo need

# What each command runs with .venv's Python, from the repository root (None: no set-up).
COMMANDS = {
    "setup": [],
    "test": ["-m", "pytest"],
    "test-quick": ["-m", "pytest", "-m", "not slow"],
    "demo": ["-m", "engine", "demo"],
    "bench": [str(Path("bench", "dit.py"))],
    "clean": None,
}
TAKE_ARGUMENTS = ("test", "test-quick", "demo")


def say(message: str) -> None:
    print(f"dev.py: {message}", flush=True)


def check_python(version: tuple) -> None:
    if tuple(version[:2]) < MIN_PYTHON:
        raise SystemExit(f"error: this is Python {version[0]}.{version[1]} ({sys.executable}); the project needs "
                         f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer. Install it from python.org (Windows: "
                         f"`py -3.12 dev.py ...` picks an installed one) and run dev.py with it.")


# -- the virtual environment -------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    """The venv's own Python: Scripts\\python.exe on Windows, bin/python elsewhere."""
    if sys.platform == "win32":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def check_venv_module() -> None:
    """Creating a venv needs the venv and ensurepip modules, which Debian and Ubuntu ship apart."""
    missing = [name for name in ("venv", "ensurepip") if importlib.util.find_spec(name) is None]
    if not missing:
        return
    if sys.platform.startswith("linux"):
        fix = (f"on Debian or Ubuntu: sudo apt install python3-venv "
               f"(or python{sys.version_info[0]}.{sys.version_info[1]}-venv)")
    else:
        fix = "install Python from python.org, which includes it"
    raise SystemExit(f"error: this Python ({sys.executable}) lacks the {' and '.join(missing)} module needed to "
                     f"create {VENV.name}; {fix}")


def ensure_venv(venv: Path) -> Path:
    """The venv's Python, creating the venv first where it has none."""
    python = venv_python(venv)
    if python.exists():
        return python
    check_venv_module()
    version = ".".join(str(part) for part in sys.version_info[:3])
    # --clear: a venv left half-made by an earlier failure is made again whole.
    run_step(f"creating {venv.name} with Python {version} ({sys.executable})",
             [sys.executable, "-m", "venv", "--clear", str(venv)])
    run_step(f"upgrading pip in {venv.name}", [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    return python


def install_fingerprint(pyproject: Path) -> str:
    """What an install is made from: pyproject.toml and the extras chosen here."""
    return hashlib.sha256(pyproject.read_bytes() + EXTRAS.encode()).hexdigest()


def stamp_is_current(venv: Path, fingerprint: str) -> bool:
    stamp = venv / STAMP
    return stamp.is_file() and stamp.read_text().strip() == fingerprint


def write_stamp(venv: Path, fingerprint: str) -> None:
    (venv / STAMP).write_text(fingerprint + "\n")


# -- which torch -------------------------------------------------------------------------

@dataclass(frozen=True)
class TorchChoice:
    build: str  # what the user gets, in a word or two
    reason: str  # why, for the user
    pip_args: list[str]  # after `python -m pip install`


def nvidia_smi_candidates() -> list[str]:
    """Where nvidia-smi may be: on PATH, and on Windows where NVIDIA's drivers put it (System32
    since the DCH drivers, NVSMI before them), often off PATH."""
    on_path = shutil.which("nvidia-smi")
    candidates = [on_path] if on_path else []
    if sys.platform == "win32":
        system_root = os.environ.get("SystemRoot", r"C:\Windows")
        program_files = os.environ.get("ProgramFiles", r"C:\Program Files")
        candidates += [ntpath.join(system_root, "System32", "nvidia-smi.exe"),
                       ntpath.join(program_files, "NVIDIA Corporation", "NVSMI", "nvidia-smi.exe")]
    return candidates


def find_nvidia_gpu() -> str | None:
    """The first GPU `nvidia-smi -L` lists, where an NVIDIA driver is installed and answers; else None."""
    if sys.platform == "darwin":  # macOS has no CUDA
        return None
    for command in nvidia_smi_candidates():
        if not os.path.isfile(command):
            continue
        try:
            listing = subprocess.run([command, "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if listing.returncode == 0 and listing.stdout.strip():
            return listing.stdout.strip().splitlines()[0]
    return None


def choose_torch(gpu: str | None) -> TorchChoice:
    """The torch build for this platform and GPU (from find_nvidia_gpu)."""
    plain = [f"torch=={TORCH_VERSION}"]
    if sys.platform == "darwin":
        if platform.machine() != "arm64":
            raise SystemExit(f"error: PyTorch has published no builds for Intel Macs since 2.2, so torch "
                             f"{TORCH_VERSION} cannot be installed here. Use an Apple-silicon Mac (with a Python "
                             f"built for arm64: an x86_64 Python under Rosetta looks like an Intel Mac), Linux "
                             f"or Windows.")
        return TorchChoice("macOS (MPS)", "macOS on Apple silicon: PyPI's build, which can use the GPU through MPS "
                           "(the engine itself runs on the CPU there for now)", plain)
    if sys.platform == "win32":
        if gpu:
            return TorchChoice("CUDA", f"NVIDIA driver found ({gpu}); PyPI's Windows torch is CPU-only, so the "
                               f"CUDA build comes from PyTorch's index {TORCH_CUDA_INDEX}",
                               [*plain, "--index-url", TORCH_CUDA_INDEX])
        return TorchChoice("CPU", "no NVIDIA driver answered (nvidia-smi -L): PyPI's Windows build, which is "
                           "CPU-only", plain)
    if gpu:
        return TorchChoice("CUDA", f"NVIDIA driver found ({gpu}); on Linux the package index's default torch is "
                           "the CUDA build", plain)
    return TorchChoice("CPU", "no NVIDIA driver answered (nvidia-smi -L): the package index's default build, "
                       "which will run on the CPU", plain)


def installed_torch(python: Path) -> str | None:
    """The torch version installed in the venv of ``python``, or None (without importing torch: quick)."""
    probe = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('torch'))"],
                           capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


def torch_failure_hint(choice: TorchChoice) -> str:
    where = f" at {TORCH_CUDA_INDEX}" if TORCH_CUDA_INDEX in choice.pip_args else ""
    return (f"check the network, and that torch {TORCH_VERSION} is published{where} for Python "
            f"{sys.version_info[0]}.{sys.version_info[1]} on this platform (https://pytorch.org/get-started/locally/ "
            f"gives the command for each build); a torch installed into {VENV.name} by hand "
            f"(`{venv_python(Path(VENV.name))} -m pip install torch ...`) is kept by the next set-up")


def ensure_torch(python: Path) -> None:
    """torch in the venv: the build choose_torch picks, unless one is there already."""
    version = installed_torch(python)
    if version:
        say(f"torch {version} is already in {VENV.name}; kept (to choose afresh: `dev.py clean`, then set up again)")
        return
    choice = choose_torch(find_nvidia_gpu())
    say(f"torch {TORCH_VERSION}, the {choice.build} build: {choice.reason}")
    run_step(f"installing torch {TORCH_VERSION} ({choice.build}; a large download the first time)",
             [str(python), "-m", "pip", "install", *choice.pip_args], hint=torch_failure_hint(choice))
    report = subprocess.run([str(python), "-c", "import torch; print(torch.__version__, torch.cuda.is_available())"],
                            capture_output=True, text=True)
    if report.returncode != 0:
        raise SystemExit(f"error: torch was installed but does not import:\n{report.stderr.strip()}")
    version, cuda = report.stdout.split()[-2:]
    if cuda == "True":
        say(f"torch {version} is installed and sees a CUDA GPU")
    elif choice.build == "CUDA":
        say(f"torch {version} is installed but sees no CUDA GPU: the NVIDIA driver may be too old for this build; "
            f"update it (the engine runs on the CPU meanwhile)")
    else:
        say(f"torch {version} is installed (no CUDA GPU: the engine runs on the CPU)")


# -- steps and commands --------------------------------------------------------------------

def run_step(what: str, command: list[str], hint: str = "") -> None:
    """Run one long set-up step, saying what it is and how long it took; stop with a clear error if it fails."""
    say(f"{what} ...")
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"error: {what} failed (exit code {result.returncode})" + (f"; {hint}" if hint else ""))
    say(f"{what}: done in {time.monotonic() - started:.0f} s")


def setup() -> Path:
    """.venv ready for every command; returns its Python."""
    python = ensure_venv(VENV)
    fingerprint = install_fingerprint(ROOT / "pyproject.toml")
    if stamp_is_current(VENV, fingerprint):
        say(f"{VENV.name} is set up (torch {installed_torch(python)}; pyproject.toml unchanged since it was)")
        return python
    ensure_torch(python)
    run_step(f"installing the project with its extras [{EXTRAS}]",
             [str(python), "-m", "pip", "install", "--quiet", "-e", f".[{EXTRAS}]"],
             hint="pip's message above names the package; check the network")
    write_stamp(VENV, fingerprint)
    return python


def clean() -> None:
    leftovers = [VENV, ROOT / ".pytest_cache", ROOT / "build", *ROOT.glob("*.egg-info")]
    for path in leftovers:
        if path.exists():
            say(f"removing {path.relative_to(ROOT)}")
            shutil.rmtree(path)


def usage() -> str:
    return f"usage: python dev.py {{{'|'.join(COMMANDS)}}} [ARGS]  (`python dev.py help` says more)"


def main(argv: list[str]) -> int:
    command, arguments = (argv[0], argv[1:]) if argv else ("", [])
    if command in ("help", "-h", "--help"):
        print(__doc__)
        return 0
    if command not in COMMANDS:
        print(usage(), file=sys.stderr)
        return 2
    if arguments and command not in TAKE_ARGUMENTS:
        print(f"error: {command} takes no arguments; {usage()}", file=sys.stderr)
        return 2
    check_python(sys.version_info)
    if command == "clean":
        clean()
        return 0
    python = setup()
    if command == "setup":
        return 0
    try:
        return subprocess.run([str(python), *COMMANDS[command], *arguments], cwd=ROOT).returncode
    except KeyboardInterrupt:  # Ctrl-C reached the command too, which stops on it
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
