"""The StreamDiffusion component's custom parameters: its pages, and how each reaches the engine.

The session parameters' pages (Prompt, Stream, Targets, Output) and the Spout sender names
on the Transport page are made from the bridge's parameter table (bridge/params.py): each
control's name, label, style, default, bounds, slider, menu and help are its entry's. The
component's own pages (Engine, Transport, Status) are written here. build_tox.py creates
the pages; the extension sends the session parameters to the engine.

This module imports the bridge, so it loads once the bridge is on the module path:
build_tox.py puts the repository there, the extension applies Bridge Path first.
"""

# No `from __future__ import annotations` here: with it, dataclasses look their module up in
# sys.modules, and a module TouchDesigner makes from a DAT need not be there.
from dataclasses import dataclass

from bridge import controls
from bridge import params as table

# TouchDesigner's Non-Commercial licence caps every TOP at this many pixels a side.
FREE_LICENCE_MAX_SIDE = 1280
# By the table's kinds; a list of pairs (Weighted Prompts, LoRA Styles) is a table DAT of rows (text, number),
# by default the component's own, named as the parameter (table_dat_name).
STYLES = {"bool": "Toggle", "int": "Int", "float": "Float", "str": "Str", **{kind: "DAT" for kind in table.PAIR_KINDS}}
ENGINE_VALUES = {"bool": bool, "int": int, "float": float, "str": str}  # a control's value as the engine takes it


@dataclass(frozen=True)
class ParSpec:
    name: str  # TouchDesigner's rule: a capital letter, then lower case and digits
    label: str
    style: str  # Str, Float, Int, Toggle, Pulse, Menu, File, Folder, DAT
    default: object = None
    menu: tuple[tuple[str, str], ...] = ()  # (name, label) entries of a Menu
    slider: tuple[float, float] | None = None  # the slider's range
    minimum: float | None = None  # values outside the bounds are clamped to them
    maximum: float | None = None
    size: int = 1  # an Int of size 2 is two parameters, Name1 and Name2
    help: str = ""
    param: table.Param | None = None  # the session parameter it sets, if any
    read_only: bool = False


def td_name(name: str) -> str:
    """A protocol name as TouchDesigner names custom parameters (target_fps -> Targetfps)."""
    return name.replace("_", "").capitalize()


def table_dat_name(param: table.Param) -> str:
    """The component's own table DAT of a pair parameter: the default of its control."""
    return param.name


def table_header(param: table.Param) -> list[str]:
    """The column names of a pair parameter's table DAT, e.g. text, weight."""
    pairs = table.PAIR_KINDS[param.kind]
    return [pairs.text, pairs.number]


def session_spec(param: table.Param) -> ParSpec:
    """The control of a session parameter: all of it from the parameter's table entry."""
    numeric = param.kind in ("int", "float")
    return ParSpec(
        td_name(param.name), param.label, "Menu" if param.choices else STYLES[param.kind],
        table_dat_name(param) if param.kind in table.PAIR_KINDS else param.default, menu=tuple(controls.menu(param)),
        slider=param.slider_range if numeric else None, minimum=param.minimum if numeric else None,
        maximum=param.maximum if numeric else None, help=controls.help_text(param), param=param)


SESSION_SPECS = tuple(session_spec(param) for param in controls.host_params())
TABLE_SPECS = tuple(spec for spec in SESSION_SPECS if spec.style == "DAT")  # lists of pairs: read each frame
SPOUT_SPECS = tuple(session_spec(param) for param in table.in_group("Spout"))  # given when a Spout session opens

PAGES: dict[str, tuple[ParSpec, ...]] = {
    "Engine": (
        ParSpec("Mode", "Engine", "Menu", "start",
                menu=(("start", "Start an engine here"), ("attach", "Attach to a running engine")),
                help="Start: the component runs `python -m engine serve` as its child process. "
                     "Attach: it connects to an engine already listening at Address, and uses its model."),
        ParSpec("Python", "Python Executable", "File", "",
                help="The python of the environment the engine is installed in, e.g. .venv/bin/python "
                     "or .venv\\Scripts\\python.exe. Applies at the next Start or Restart."),
        ParSpec("Engineargs", "Engine Arguments", "Str", "",
                help="More arguments for `python -m engine serve`, e.g. --device cuda:1 --weights D:/wan "
                     "(forward slashes; quote a path with spaces). Applies at the next Start or Restart."),
        ParSpec("Model", "Model", "Menu", table.DEFAULT_MODEL, menu=tuple((m, m) for m in controls.MODELS),
                help="The model preset an engine started here serves (attached, the component uses the "
                     "engine's: Status > Engine's Model). Applies at the next Start or Restart."),
        ParSpec("Address", "Address", "Str", "tcp://127.0.0.1:5555",
                help="Where the engine listens: tcp://127.0.0.1:PORT (loopback only). Applies at the next "
                     "Start or Restart."),
        ParSpec("Bridgepath", "Bridge Path", "Folder", "",
                help="Where Install puts the bridge, pyzmq and msgpack, and where the component imports them "
                     "from (appended to TouchDesigner's module path). Empty: a folder of your own per Python "
                     "version, e.g. %LOCALAPPDATA%/streamdiffusion/touchdesigner-python3.11."),
        ParSpec("Install", "Install", "Pulse",
                help="Install the bridge (carried in this component) with pyzmq and msgpack from pip into "
                     "Bridge Path, for TouchDesigner's Python; once per machine and TouchDesigner version. "
                     "Progress and errors show in Status > Message and Open Log."),
        ParSpec("Installpython", "Python for Install", "File", "",
                help="The Python that runs pip for Install. Empty: found by itself (TouchDesigner's, else "
                     "a Python of TouchDesigner's version on PATH, else any python3)."),
        ParSpec("Installed", "Installed", "Str", "", read_only=True,
                help="What Bridge Path holds: the bridge's version and its packages'."),
        ParSpec("Start", "Start", "Pulse"),
        ParSpec("Stop", "Stop", "Pulse"),
        ParSpec("Restart", "Restart", "Pulse"),
        ParSpec("Processstate", "Engine Process", "Str", "stopped", read_only=True),
        ParSpec("Openlog", "Open Log", "Pulse", help="The engine's output and the component's messages."),
    ),
    **{group: tuple(spec for spec in SESSION_SPECS if spec.param.group == group) for group in controls.HOST_GROUPS},
    "Transport": (
        ParSpec("Transport", "Transport", "Menu", "shm",
                menu=(("shm", "Shared Memory (every licence, every OS)"),
                      ("spout", "Spout (Windows: your own Syphon Spout TOPs carry the frames)")),
                help="Shared Memory: the component's input and output carry the frames. Spout: the engine "
                     "reads the sender Spout Input Sender names and publishes Spout Output Sender; send and "
                     "show them with Syphon Spout Out and In TOPs (the component's output shows its input)."),
        *SPOUT_SPECS,
        ParSpec("Outputsize", "Output Resolution", "Menu", "input",
                menu=(("input", "Same as Input"), ("custom", "Custom"))),
        ParSpec("Resolution", "Resolution", "Int", 512, size=2, slider=(64, FREE_LICENCE_MAX_SIDE), minimum=16,
                help=f"Width and height of the frames the engine gets and returns with a Custom Output "
                     f"Resolution, and of the Spout sender it publishes. The Non-Commercial licence caps "
                     f"TOPs at {FREE_LICENCE_MAX_SIDE} a side."),
    ),
    "Status": (
        ParSpec("Enginestate", "Engine State", "Str", "stopped", read_only=True),
        ParSpec("Message", "Message", "Str", "", read_only=True),
        ParSpec("Enginemodel", "Engine's Model", "Str", "", read_only=True,
                help="The model the engine serves, once a session is open."),
        ParSpec("Outputfps", "Output FPS", "Float", 0.0, read_only=True),
        ParSpec("Latency", "Glass-to-Glass Latency (ms)", "Float", 0.0, read_only=True),
        ParSpec("Droppedframes", "Dropped Frames", "Int", 0, read_only=True),
        ParSpec("Firstframe", "Time to First Frame (ms)", "Float", 0.0, read_only=True),
        ParSpec("Scheduler", "Scheduler", "Str", "", read_only=True,
                help="How the engine serves this stream: whether it meets Target FPS and Latency Budget, "
                     "stream batching or steps in turn, chunk size, any frame-rate cap, predicted latency."),
    ),
}

SPECS: dict[str, ParSpec] = {spec.name: spec for page in PAGES.values() for spec in page}


def par_names(spec: ParSpec) -> list[str]:
    """The parameters a spec makes: Name, or Name1..NameN for a size above 1."""
    return [spec.name] if spec.size == 1 else [f"{spec.name}{i}" for i in range(1, spec.size + 1)]


# The parameters whose changes the component acts on: all but the read-only ones.
WATCHED = tuple(name for spec in SPECS.values() if not spec.read_only for name in par_names(spec))


def build_pages(comp) -> None:
    """Create the custom pages on a COMP (replacing parameters of the same names)."""
    for page_name, specs in PAGES.items():
        page = comp.appendCustomPage(page_name)
        for spec in specs:
            for par in _append(page, spec):
                _configure(par, spec)


def _append(page, spec: ParSpec):
    append = getattr(page, f"append{spec.style}")
    if spec.style in ("Int", "Float"):
        return append(spec.name, label=spec.label, size=spec.size)
    return append(spec.name, label=spec.label)


def _configure(par, spec: ParSpec) -> None:
    if spec.menu:
        par.menuNames = [name for name, _ in spec.menu]
        par.menuLabels = [label for _, label in spec.menu]
    if spec.slider is not None:
        par.normMin, par.normMax = spec.slider
    if spec.minimum is not None:
        par.min, par.clampMin = spec.minimum, True
    if spec.maximum is not None:
        par.max, par.clampMax = spec.maximum, True
    if spec.default is not None and spec.style != "Pulse":
        par.default = spec.default
        par.val = spec.default
    par.help = spec.help
    par.readOnly = spec.read_only


def engine_value(spec: ParSpec, par):
    """A session parameter's value as the engine takes it (a table DAT's: pair_list)."""
    return ENGINE_VALUES[spec.param.kind](par.eval())


def pair_list(spec: ParSpec, dat) -> list[list]:
    """A table DAT's rows as the engine takes them, [text, number] pairs (bridge/controls.py
    reads the rows); a ValueError names the table and the row."""
    if dat is None:
        return []
    try:
        return controls.pairs(([cell.val for cell in row] for row in dat.rows()), spec.param, header=True)
    except ValueError as error:
        raise ValueError(f"{dat.path}: {error}") from None
