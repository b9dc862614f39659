"""Finding the Python environment that holds numpy, pyzmq, msgpack and this project.

OBS embeds its own Python (3.11 for Debian's OBS 29) with nothing but the standard
library. The script therefore borrows a virtual environment made with the same Python
version: its site-packages go on sys.path ahead of the system's (so that an older numpy
installed system-wide cannot shadow the environment's), and its .pth files are read,
which is how an editable install (`pip install -e .`) makes bridge/ importable. This
repository's root goes first of all, so the script uses the bridge/ it was written
with. The same environment's interpreter runs a local engine.

Compiled packages (numpy, pyzmq) only load into the Python version they were built for,
so an environment of another version is refused with a message saying so.
"""

from __future__ import annotations

import configparser
import os
import site
import sys
from dataclasses import dataclass
from pathlib import Path

# Where the script looks when its "Python environment" setting is empty.
ENVIRONMENT_VARIABLE = "STREAMDIFFUSION_VENV"
REPO_VENV = ".venv"  # the environment `make setup` creates in the repository


class EnvironmentProblem(Exception):
    """The environment cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class PythonEnvironment:
    root: Path
    site_packages: Path
    python: Path  # its interpreter, for `python -m engine serve`


def default_folder(repo_root: Path) -> str:
    """$STREAMDIFFUSION_VENV, else the repository's .venv when there is one, else ""."""
    from_variable = os.environ.get(ENVIRONMENT_VARIABLE, "")
    if from_variable:
        return from_variable
    repo_venv = repo_root / REPO_VENV
    return str(repo_venv) if repo_venv.is_dir() else ""


def find(folder: str, version: tuple[int, int] = sys.version_info[:2]) -> PythonEnvironment:
    """The environment in `folder` (a venv's root), checked against this Python's version."""
    if not folder:
        raise EnvironmentProblem(
            "no Python environment is set: make one with Python "
            f"{version[0]}.{version[1]} (python{version[0]}.{version[1]} -m venv FOLDER; "
            "FOLDER/bin/pip install -e PATH/TO/THIS/REPO) and pick FOLDER as the script's Python environment"
        )
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise EnvironmentProblem(f"the Python environment {root} does not exist")
    if sys.platform == "win32":
        site_packages, python = root / "Lib" / "site-packages", root / "Scripts" / "python.exe"
        found_version = _version_from_config(root)
    else:
        site_packages = root / "lib" / f"python{version[0]}.{version[1]}" / "site-packages"
        python = root / "bin" / "python"
        found_version = version if site_packages.is_dir() else _version_of_other_site_packages(root)
    if found_version is not None and found_version != version:
        raise EnvironmentProblem(
            f"the Python environment {root} is for Python {found_version[0]}.{found_version[1]}, but OBS runs "
            f"Python {version[0]}.{version[1]}; its numpy and pyzmq cannot load here. Make one with "
            f"Python {version[0]}.{version[1]}"
        )
    if not site_packages.is_dir():
        raise EnvironmentProblem(f"{root} is not a Python environment: it has no {site_packages.relative_to(root)}")
    return PythonEnvironment(root, site_packages, python)


def activate(environment: PythonEnvironment, repo_root: Path) -> None:
    """Make the environment's packages, and this repository's bridge/, importable."""
    # The repository first: its bridge/ is the one this script was written with.
    for path in (environment.site_packages, repo_root):
        put_first_on_path(path)
    site.addsitedir(str(environment.site_packages))  # reads its .pth files (editable installs)


def put_first_on_path(folder: Path) -> None:
    """Put folder first on sys.path (moving it there when it is on it already)."""
    if str(folder) in sys.path:
        sys.path.remove(str(folder))
    sys.path.insert(0, str(folder))


def _version_from_config(root: Path) -> tuple[int, int] | None:
    """The Python version recorded in a venv's pyvenv.cfg ("version" or, from uv, "version_info")."""
    config = root / "pyvenv.cfg"
    if not config.is_file():
        return None
    parser = configparser.ConfigParser()
    parser.read_string("[venv]\n" + config.read_text(errors="replace"))
    text = parser["venv"].get("version") or parser["venv"].get("version_info") or ""
    parts = text.split(".")
    return (int(parts[0]), int(parts[1])) if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit() else None


def _version_of_other_site_packages(root: Path) -> tuple[int, int] | None:
    """(3, 12) for a POSIX venv whose packages are in lib/python3.12/site-packages."""
    for site_packages in root.glob("lib/python3.*/site-packages"):
        major, _, minor = site_packages.parent.name.removeprefix("python").partition(".")
        if major.isdigit() and minor.isdigit():
            return int(major), int(minor)
    return None
