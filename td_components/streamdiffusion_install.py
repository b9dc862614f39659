"""Install: the bridge and the packages it needs, where TouchDesigner's Python finds them.

TouchDesigner's Python ships numpy but not pyzmq or msgpack, and the bridge is this
project's own package. The component carries the bridge's source inside itself (the
bridge_package COMP, made by build_tox.py, with the requirements the project declares), so
Install needs nothing from the repository:

1. pip (`python -m pip install --target FOLDER --upgrade -r requirements.txt`) puts pyzmq
   and msgpack into Bridge Path, built for TouchDesigner's Python version;
2. the bridge's files are written there as the package `bridge`;
3. a small record, streamdiffusion-install.json, says what was installed and for which
   Python, so a later Install may replace it (and never a `bridge` it did not write).

The folder is the user's (by default one per Python version under the user's local data
folder), never TouchDesigner's installation, and the component appends it to sys.path, so
TouchDesigner's own packages (its numpy) keep precedence.

pip needs a Python to run in: Python for Install when set, else the first of TouchDesigner's
own (if its binaries folder has one), a Python of TouchDesigner's version on PATH (`py -3.11`
on Windows, python3.11 elsewhere), then any python3 on PATH. A Python of another version
still works: pip is then asked for wheels of TouchDesigner's version (--python-version,
--only-binary=:all:). pip's own configuration applies (an index, a proxy, PIP_FIND_LINKS).

Everything slow runs on a thread of its own; the component polls it each frame and shows
its progress. Standard library only.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

RECORD = "streamdiffusion-install.json"
PACKAGE = "bridge"
PROBE = "import sys, pip; print('%d.%d' % sys.version_info[:2])"
PROBE_TIMEOUT_S = 60.0
PIP_TIMEOUT_S = 900.0


def td_version():
    """TouchDesigner's Python version, 'MAJOR.MINOR'."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def default_folder(version=None):
    """The default Bridge Path, per user: one per Python version, since pyzmq is compiled for one."""
    version = version or td_version()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "streamdiffusion" / f"touchdesigner-python{version}"


def installed(folder):
    """What an Install left in folder (its record), or None."""
    try:
        return json.loads((Path(folder) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def describe(folder):
    """A line for Status: what the folder holds."""
    record = installed(folder)
    if record is None:
        return f"not installed in {folder}"
    packages = ", ".join(f"{name} {version}" for name, version in sorted(record.get("packages", {}).items()))
    return f"bridge {record.get('bridge', '?')} ({packages}) for Python {record.get('python', '?')} in {folder}"


def python_candidates(chosen="", bin_folder=None):
    """Commands that may run pip, in the order they are tried."""
    if chosen:
        return [[chosen]]
    found = []
    executable = Path(sys.executable) if sys.executable else None
    if executable is not None and executable.name.lower().startswith("python"):
        found.append([str(executable)])  # a plain Python (not TouchDesigner's own executable)
    for folder in (bin_folder, executable.parent if executable else None):
        if folder:
            for name in ("python.exe", f"python{td_version()}", "python3", "python"):
                path = Path(folder) / name
                if path.is_file():
                    found.append([str(path)])
    if sys.platform == "win32" and shutil.which("py"):
        found.append(["py", f"-{td_version()}"])
    for name in (f"python{td_version()}", "python3", "python"):
        path = shutil.which(name)
        if path:
            found.append([path])
    unique = []
    for command in found:
        if command not in unique:
            unique.append(command)
    return unique


def pip_command(python, python_version, folder, requirements, target_version=None):
    """The pip command that installs requirements (a file) into folder for target_version
    (TouchDesigner's), run by python (a command list) of python_version."""
    target_version = target_version or td_version()
    command = [*python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
               "--upgrade", "--target", str(folder), "-r", str(requirements)]
    if python_version != target_version:  # wheels built for TouchDesigner's Python, not pip's
        command += ["--python-version", target_version, "--implementation", "cp", "--only-binary=:all:"]
    return command


class Installation:
    """One Install, on a thread of its own. `files` maps a path relative to the folder
    (bridge/client.py, ...) to its text; `requirements` is a requirements.txt's text."""

    def __init__(self, folder, files, requirements, bridge_version, python="", bin_folder=None):
        self.folder = Path(folder)
        self._files = dict(files)
        self._requirements = requirements
        self._bridge_version = bridge_version
        self._python = python
        self._bin_folder = bin_folder
        self._lines = deque()
        self.last_line = "starting"
        self.done = False
        self.error = None  # why it failed, once done
        self.command = None  # the pip command run
        self._thread = threading.Thread(target=self._run, name="streamdiffusion-install", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def take_lines(self):
        """The lines said since the last call (pip's output and the installation's own)."""
        lines = []
        while self._lines:
            lines.append(self._lines.popleft())
        return lines

    def wait(self, timeout=None):
        self._thread.join(timeout)
        return self.done

    def _say(self, line):
        line = line.rstrip()
        if line:
            self.last_line = line
            self._lines.append(line)

    def _run(self):
        try:
            self._install()
        except Exception as error:  # reported to the component, which shows it
            self.error = str(error) or type(error).__name__
        finally:
            self.done = True

    def _install(self):
        folder = self.folder
        if (folder / PACKAGE).exists() and installed(folder) is None:
            raise RuntimeError(f"{folder / PACKAGE} exists and was not installed by this component: "
                               f"choose another Bridge Path (or empty it)")
        folder.mkdir(parents=True, exist_ok=True)
        python, version = self._find_python()
        with tempfile.TemporaryDirectory(prefix="sdbridge-install-") as scratch:
            requirements = Path(scratch) / "requirements.txt"
            requirements.write_text(self._requirements, encoding="utf-8")
            self.command = pip_command(python, version, folder, requirements)
            self._say("running " + " ".join(self.command))
            self._run_pip(self.command)
        self._write_package()
        packages = self._versions()
        record = {"bridge": self._bridge_version, "python": td_version(), "packages": packages,
                  "requirements": [line for line in self._requirements.splitlines() if line.strip()],
                  "installed_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        (folder / RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")
        self._say(f"installed {describe(folder)}")

    def _find_python(self):
        """The first candidate that runs pip: (command, its 'MAJOR.MINOR')."""
        tried = []
        for command in python_candidates(self._python, self._bin_folder):
            self._say(f"trying {' '.join(command)}")
            try:
                result = subprocess.run([*command, "-c", PROBE], capture_output=True, text=True,
                                        timeout=PROBE_TIMEOUT_S, **_no_window())
            except (OSError, subprocess.TimeoutExpired) as error:
                tried.append(f"{' '.join(command)}: {error}")
                continue
            if result.returncode == 0 and result.stdout.strip():
                return command, result.stdout.strip().splitlines()[-1]
            reason = (result.stderr.strip().splitlines() or ["no pip"])[-1]
            tried.append(f"{' '.join(command)}: {reason}")
        if self._python:
            raise RuntimeError(f"Python for Install cannot run pip ({'; '.join(tried)})")
        raise RuntimeError("no Python with pip found to install with (tried: "
                           f"{'; '.join(tried) or 'none on PATH'}): install Python {td_version()} "
                           "from python.org, or set Python for Install")

    def _run_pip(self, command):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", stdin=subprocess.DEVNULL, **_no_window())
        deadline = time.monotonic() + PIP_TIMEOUT_S
        tail = deque(maxlen=5)
        for line in process.stdout:
            self._say(line)
            if line.strip():
                tail.append(line.strip())
            if time.monotonic() > deadline:
                process.kill()
                break
        code = process.wait()
        if code != 0:
            last = next((line for line in reversed(tail) if "error" in line.lower()), tail[-1] if tail else "")
            raise RuntimeError(f"pip failed (exit code {code}): {last}")

    def _write_package(self):
        """The bridge's files, written beside their old copy, then swapped in."""
        folder = self.folder
        fresh, old = folder / f"{PACKAGE}.new", folder / f"{PACKAGE}.old"
        for path in (fresh, old):
            shutil.rmtree(path, ignore_errors=True)
        for relative, text in sorted(self._files.items()):
            target = fresh / Path(relative).relative_to(PACKAGE)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        if (folder / PACKAGE).exists():
            (folder / PACKAGE).rename(old)
        fresh.rename(folder / PACKAGE)
        shutil.rmtree(old, ignore_errors=True)
        self._say(f"wrote the bridge ({len(self._files)} files) to {folder / PACKAGE}")

    def _versions(self):
        """The versions pip installed, from the .dist-info folders it left."""
        versions = {}
        for info in self.folder.glob("*.dist-info"):
            name, _, version = info.name[: -len(".dist-info")].partition("-")
            versions[name.lower()] = version
        return versions


def _no_window():
    """On Windows, no console window flashes up for the child."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NO_WINDOW}
    return {}
