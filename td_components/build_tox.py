"""Build the StreamDiffusion component in TouchDesigner and save it as StreamDiffusion.tox.

Run it once in TouchDesigner's Textport (Dialogs > Textport and DATs, or Alt+T):

    import runpy; runpy.run_path(r'C:/path/to/repo/td_components/build_tox.py', run_name='__main__')

It makes /project1/streamdiffusion (replacing one made before) and saves it as
td_components/StreamDiffusion.tox. The component's code stays in the .py files beside
this script: each Text DAT is linked to its file (File, with Sync to File on), so an
edited file is picked up without rebuilding. Keep the repository where it was built, or
build again after moving it.

The parameter pages come from the bridge's parameter table (bridge/params.py, standard
library only), so the build puts this repository on the module path; once built, the
component finds the bridge through its Bridge Path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import td

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
COMPONENT_NAME = "streamdiffusion"
TOX_NAME = "StreamDiffusion.tox"
# Modules the extension imports; TouchDesigner's import finds them as DATs of these names.
MODULES = ("streamdiffusion_ext", "streamdiffusion_params")
EXTENSION = "op('./streamdiffusion_ext').module.StreamDiffusionExt(me)"


def build(parent_path: str = "/project1", tox_path: str | Path = HERE / TOX_NAME):
    """Make the component inside the COMP at parent_path, save it to tox_path, and return it."""
    parent = td.op(parent_path)
    if parent is None:
        raise ValueError(f"there is no COMP at {parent_path}")
    old = parent.op(COMPONENT_NAME)
    if old is not None:
        old.destroy()
    comp = parent.create(td.baseCOMP, COMPONENT_NAME)

    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))  # appended, so TouchDesigner's own packages keep precedence
    for name in MODULES:
        _link_to_file(comp.create(td.textDAT, name), name)
    params = comp.op("streamdiffusion_params").module

    # The picture's way: in1 -> fit_input -> stream -> out1.
    source = comp.create(td.inTOP, "in1")
    fit = comp.create(td.fitTOP, "fit_input")
    fit.par.fit = "fitoutside"  # a custom Output Resolution of another shape is filled, not stretched
    fit.inputConnectors[0].connect(source)
    stream = comp.create(td.scriptTOP, "stream")
    stream.inputConnectors[0].connect(fit)
    _link_to_file(stream.par.callbacks.eval(), "script_top_callbacks")
    output = comp.create(td.outTOP, "out1")
    output.inputConnectors[0].connect(stream)

    comp.create(td.textDAT, "engine_log")
    for spec in params.TABLE_SPECS:  # the default tables of the pair parameters (Weighted Prompts, LoRA Styles)
        comp.create(td.tableDAT, params.table_dat_name(spec.param)).appendRow(params.table_header(spec.param))

    # The pages before the callbacks that watch them, so that setting defaults calls nothing.
    params.build_pages(comp)
    comp.par.ext0object = EXTENSION
    comp.par.ext0promote = True
    comp.par.reinitextensions.pulse()

    frame_start = comp.create(td.executeDAT, "frame_start")
    _link_to_file(frame_start, "execute_callbacks")
    frame_start.par.framestart = True
    frame_start.par.exit = True

    changes = comp.create(td.parameterexecuteDAT, "parameter_changes")
    _link_to_file(changes, "parameter_callbacks")
    changes.par.op.expr = "parent()"
    changes.par.pars = " ".join(params.WATCHED)
    changes.par.custom = True
    changes.par.builtin = False
    changes.par.valuechange = True
    changes.par.onpulse = True

    _lay_out(comp)
    comp.save(str(tox_path), createFolders=True)
    return comp


def _link_to_file(dat, module_name: str) -> None:
    dat.par.file = str(HERE / f"{module_name}.py")
    dat.par.syncfile = True  # the DAT loads the file, and again whenever it changes


def _lay_out(comp) -> None:
    """Operators in a grid, so the network reads left to right when opened."""
    for index, node in enumerate(comp.children):
        node.nodeX, node.nodeY = 200 * (index % 4), -150 * (index // 4)


if __name__ == "__main__":
    print(f"built {build().path}; saved {HERE / TOX_NAME}")
