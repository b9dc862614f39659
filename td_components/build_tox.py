"""Build the StreamDiffusion component in TouchDesigner and save it as StreamDiffusion.tox.

Run it once in TouchDesigner's Textport (Dialogs > Textport and DATs, or Alt+T):

    import runpy; runpy.run_path(r'C:/path/to/repo/td_components/build_tox.py', run_name='__main__')

It makes /project1/streamdiffusion (replacing one made before) and saves it as
td_components/StreamDiffusion.tox. The .tox carries everything it runs: each Text DAT holds
its code, and the bridge_package COMP holds the bridge's source and the requirements the
project declares, which the component's Install pulse writes out (with pip for pyzmq and
msgpack) where TouchDesigner's Python finds them. Copy the .tox anywhere, to any machine.

Developer mode keeps the Text DATs linked to the files in this repository instead (File,
with Sync to File on), so edited files are picked up without rebuilding; such a .tox works
only beside this repository:

    import runpy; runpy.run_path(r'C:/path/to/repo/td_components/build_tox.py')['build'](develop=True)

The parameter pages come from the bridge's parameter table (bridge/params.py), so the build
puts this repository on the module path; once built, the component finds the bridge in its
Bridge Path (where Install puts it).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import td

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
COMPONENT_NAME = "streamdiffusion"
TOX_NAME = "StreamDiffusion.tox"
# Modules the extension imports; TouchDesigner's import finds them as DATs of these names.
MODULES = ("streamdiffusion_ext", "streamdiffusion_params", "streamdiffusion_install")
EXTENSION = "op('./streamdiffusion_ext').module.StreamDiffusionExt(me)"
PACKAGE_COMP = "bridge_package"  # the bridge's source and requirements, for Install
BUNDLED_WITH_TOUCHDESIGNER = {"numpy"}  # TouchDesigner's own; never installed beside it


def build(parent_path: str = "/project1", tox_path: str | Path = HERE / TOX_NAME, develop: bool = False):
    """Make the component inside the COMP at parent_path, save it to tox_path, and return it.
    develop: link the Text DATs to this repository's files (Sync to File) instead of holding
    their code, for working on the component."""
    parent = td.op(parent_path)
    if parent is None:
        raise ValueError(f"there is no COMP at {parent_path}")
    old = parent.op(COMPONENT_NAME)
    if old is not None:
        old.destroy()
    comp = parent.create(td.baseCOMP, COMPONENT_NAME)
    code = _linked if develop else _embedded

    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))  # appended, so TouchDesigner's own packages keep precedence
    for name in MODULES:
        code(comp.create(td.textDAT, name), HERE / f"{name}.py")
    params = comp.op("streamdiffusion_params").module

    # The picture's way: in1 -> fit_input -> stream -> out1.
    source = comp.create(td.inTOP, "in1")
    fit = comp.create(td.fitTOP, "fit_input")
    fit.par.fit = "fitoutside"  # a custom Output Resolution of another shape is filled, not stretched
    fit.inputConnectors[0].connect(source)
    stream = comp.create(td.scriptTOP, "stream")
    stream.inputConnectors[0].connect(fit)
    code(stream.par.callbacks.eval(), HERE / "script_top_callbacks.py")
    output = comp.create(td.outTOP, "out1")
    output.inputConnectors[0].connect(stream)

    comp.create(td.textDAT, "engine_log")
    for spec in params.TABLE_SPECS:  # the default tables of the pair parameters (Weighted Prompts, LoRA Styles)
        comp.create(td.tableDAT, params.table_dat_name(spec.param)).appendRow(params.table_header(spec.param))
    _package(comp.create(td.baseCOMP, PACKAGE_COMP), code)

    # The pages before the callbacks that watch them, so that setting defaults calls nothing.
    params.build_pages(comp)
    comp.par.ext0object = EXTENSION
    comp.par.ext0promote = True
    comp.par.reinitextensions.pulse()

    frame_start = comp.create(td.executeDAT, "frame_start")
    code(frame_start, HERE / "execute_callbacks.py")
    frame_start.par.framestart = True
    frame_start.par.exit = True

    changes = comp.create(td.parameterexecuteDAT, "parameter_changes")
    code(changes, HERE / "parameter_callbacks.py")
    changes.par.op.expr = "parent()"
    changes.par.pars = " ".join(params.WATCHED)
    changes.par.custom = True
    changes.par.builtin = False
    changes.par.valuechange = True
    changes.par.onpulse = True

    _lay_out(comp)
    comp.save(str(tox_path), createFolders=True)
    return comp


def package_files() -> dict[str, Path]:
    """What Install writes into Bridge Path: the bridge package's source files, by
    their path relative to that folder (bridge/client.py, ...)."""
    package = REPO_ROOT / "bridge"
    return {path.relative_to(REPO_ROOT).as_posix(): path for path in sorted(package.rglob("*.py"))
            if "__pycache__" not in path.parts}


def requirements() -> list[str]:
    """The bridge's dependencies as pyproject.toml declares them, less TouchDesigner's own."""
    return [req for req in _project()["dependencies"] if _requirement_name(req) not in BUNDLED_WITH_TOUCHDESIGNER]


def bridge_version() -> str:
    return _project()["version"]


def _project() -> dict:
    """pyproject.toml's [project] table (tomllib from Python 3.11; TouchDesigner's is 3.11)."""
    text = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python 3.10: the two entries read here are plain TOML a literal_eval reads
        version = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M).group(1)
        dependencies = re.search(r"^dependencies\s*=\s*(\[.*?\])", text, re.M | re.S).group(1)
        return {"version": version, "dependencies": ast.literal_eval(dependencies)}
    return tomllib.loads(text)["project"]


def dat_name(relative: str) -> str:
    """An operator name for a file (bridge/__init__.py -> bridge___init___py)."""
    return "".join(c if c.isalnum() else "_" for c in relative)


def _package(package, code) -> None:
    """The bridge_package COMP: a Text DAT per file of the bridge, requirements.txt, and a
    table `manifest` (path, dat) that Install reads; `version` is the project's version."""
    manifest = package.create(td.tableDAT, "manifest")
    manifest.appendRow(["path", "dat"])
    for relative, path in package_files().items():
        code(package.create(td.textDAT, dat_name(relative)), path)
        manifest.appendRow([relative, dat_name(relative)])
    package.create(td.textDAT, "requirements").text = "".join(f"{req}\n" for req in requirements())
    package.create(td.textDAT, "version").text = bridge_version()
    _lay_out(package)


def _embedded(dat, path: Path) -> None:
    dat.text = path.read_text(encoding="utf-8")  # the code itself travels in the .tox


def _linked(dat, path: Path) -> None:
    dat.par.file = str(path)
    dat.par.syncfile = True  # the DAT loads the file, and again whenever it changes


def _requirement_name(requirement: str) -> str:
    name = requirement.strip()
    for stop in "<>=!~;[ (":
        name = name.split(stop, 1)[0]
    return name.lower().replace("_", "-")


def _lay_out(comp) -> None:
    """Operators in a grid, so the network reads left to right when opened."""
    for index, node in enumerate(comp.children):
        node.nodeX, node.nodeY = 200 * (index % 4), -150 * (index // 4)


if __name__ == "__main__":
    print(f"built {build().path}; saved {HERE / TOX_NAME}")
