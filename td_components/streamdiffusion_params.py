"""The StreamDiffusion component's custom parameters: its pages, and how each reaches the engine.

One table, read by build_tox.py (which creates the pages) and by the extension (which
sends the Prompt and Stream values to the engine as session parameters). Standard
library only: this runs inside TouchDesigner.
"""

# No `from __future__ import annotations` here: with it, dataclasses look their module up in
# sys.modules, and a module TouchDesigner makes from a DAT need not be there.
import json
from dataclasses import dataclass

MODELS = ("wan2.1-1.3b", "wan2.1-14b", "tiny")
# TouchDesigner's Non-Commercial licence caps every TOP at this many pixels a side.
FREE_LICENCE_MAX_SIDE = 1280


@dataclass(frozen=True)
class ParSpec:
    name: str  # TouchDesigner's rule: a capital letter, then lower case and digits
    label: str
    style: str  # Str, Float, Int, Toggle, Pulse, Menu, File, Folder, DAT
    default: object = None
    menu: tuple[tuple[str, str], ...] = ()  # (name, label) entries of a Menu
    slider: tuple[float, float] | None = None  # the slider's range; values outside it are allowed
    minimum: float | None = None  # values below are clamped
    size: int = 1  # an Int of size 2 is two parameters, Name1 and Name2
    help: str = ""
    engine_name: str | None = None  # the engine session parameter it sets, if any
    read_only: bool = False


PAGES: dict[str, tuple[ParSpec, ...]] = {
    "Engine": (
        ParSpec("Mode", "Engine", "Menu", "start",
                menu=(("start", "Start an engine here"), ("attach", "Attach to a running engine")),
                help="Start: the component runs `python -m engine serve` as its child process. "
                     "Attach: it connects to an engine already listening at Address."),
        ParSpec("Python", "Python Executable", "File", "",
                help="The python of the environment the engine is installed in, e.g. .venv/bin/python "
                     "or .venv\\Scripts\\python.exe. Applies at the next Start or Restart."),
        ParSpec("Engineargs", "Engine Arguments", "Str", "",
                help="More arguments for `python -m engine serve`, e.g. --device cuda:1 --weights D:/wan "
                     "(forward slashes; quote a path with spaces). Applies at the next Start or Restart."),
        ParSpec("Model", "Model", "Menu", MODELS[0], menu=tuple((m, m) for m in MODELS),
                help="The model preset the engine serves. Applies at the next Start or Restart."),
        ParSpec("Address", "Address", "Str", "tcp://127.0.0.1:5555",
                help="Where the engine listens: tcp://127.0.0.1:PORT (loopback only). Applies at the next "
                     "Start or Restart."),
        ParSpec("Bridgepath", "Bridge Path", "Folder", "",
                help="A folder holding the project's bridge package and pyzmq and msgpack for Python 3.11 "
                     "(see td_components/README.md); added to TouchDesigner's module path."),
        ParSpec("Start", "Start", "Pulse"),
        ParSpec("Stop", "Stop", "Pulse"),
        ParSpec("Restart", "Restart", "Pulse"),
        ParSpec("Processstate", "Engine Process", "Str", "stopped", read_only=True),
        ParSpec("Openlog", "Open Log", "Pulse", help="The engine's output and the component's messages."),
    ),
    "Prompt": (
        ParSpec("Prompt", "Prompt", "Str", "a watercolour painting", engine_name="prompt"),
        ParSpec("Promptlist", "Weighted Prompts", "DAT", "prompts", engine_name="prompts",
                help="Optional table DAT, one prompt and its weight per row; when it has rows it is "
                     "blended instead of Prompt."),
        ParSpec("Blend", "Blend Method", "Menu", "linear",
                menu=(("linear", "Linear"), ("slerp", "Slerp (two prompts)")), engine_name="blend"),
        ParSpec("Transition", "Transition Length (frames)", "Int", 0, slider=(0, 64), minimum=0,
                engine_name="transition_frames",
                help="Frames over which a new prompt fades in; 0 switches at once."),
    ),
    "Stream": (
        # The engine refuses a strength under 0.1 (its motion controller's slope is 0.1).
        ParSpec("Strength", "Strength", "Float", 0.8, slider=(0.1, 1.0), minimum=0.1, engine_name="strength",
                help="How far the picture moves toward the prompt."),
        ParSpec("Steps", "Steps", "Int", 2, slider=(1, 4), minimum=1, engine_name="steps",
                help="Denoising steps; more is slower and cleaner. Changing it restarts the stream."),
        ParSpec("Seed", "Seed", "Int", 0, slider=(0, 1000), minimum=0, engine_name="seed"),
        ParSpec("Targetfps", "Target FPS", "Float", 16.0, slider=(1, 60), minimum=1, engine_name="target_fps"),
        ParSpec("Latencybudget", "Latency Budget (ms)", "Float", 500.0, slider=(50, 5000), minimum=1,
                engine_name="latency_ms",
                help="From a frame's cook to its stylised output; the engine's scheduler holds the stream to it "
                     "(stream batching goes where its lag does not fit; Status > Scheduler says how it goes)."),
        ParSpec("Fit", "Fit Mode", "Menu", "letterbox",
                menu=(("letterbox", "Letterbox"), ("crop", "Crop"), ("stretch", "Stretch")), engine_name="fit",
                help="How frames are fitted to the model's size and back."),
        ParSpec("Lowlatencystart", "Low-Latency Start", "Toggle", False, engine_name="low_latency_start",
                help="The first output after 1 frame instead of 5. Changing it restarts the stream."),
    ),
    "Transport": (
        ParSpec("Transport", "Transport", "Menu", "shm",
                menu=(("shm", "Shared Memory (every licence, every OS)"), ("spout", "Spout (Windows)"))),
        ParSpec("Outputsize", "Output Resolution", "Menu", "input",
                menu=(("input", "Same as Input"), ("custom", "Custom"))),
        ParSpec("Resolution", "Resolution", "Int", 512, size=2, slider=(64, FREE_LICENCE_MAX_SIDE), minimum=16,
                help=f"Width and height of the frames the engine gets and returns. The Non-Commercial "
                     f"licence caps TOPs at {FREE_LICENCE_MAX_SIDE} a side."),
    ),
    "Status": (
        ParSpec("Enginestate", "Engine State", "Str", "stopped", read_only=True),
        ParSpec("Message", "Message", "Str", "", read_only=True),
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
    if spec.default is not None and spec.style != "Pulse":
        par.default = spec.default
        par.val = spec.default
    par.help = spec.help
    par.readOnly = spec.read_only


def engine_value(spec: ParSpec, par):
    """What a parameter's value is to the engine (see prompt_list for Weighted Prompts)."""
    value = par.eval()
    if spec.style == "Toggle":
        return bool(value)
    if spec.style == "Int":
        return int(value)
    if spec.style == "Float":
        return float(value)
    return str(value)


def prompt_list(table) -> tuple[tuple[str, float], ...]:
    """The (prompt, weight) rows of a table DAT; a first row whose weight is not a number is a header."""
    if table is None:
        return ()
    rows = []
    for index, row in enumerate(table.rows()):
        cells = [cell.val.strip() for cell in row]
        if len(cells) < 2 or not cells[0]:
            continue
        try:
            weight = float(cells[1])
        except ValueError:
            if index == 0:
                continue  # the header
            raise ValueError(f"row {index} of {table.path}: the weight {cells[1]!r} is not a number") from None
        rows.append((cells[0], weight))
    return tuple(rows)


def prompts_json(rows: tuple[tuple[str, float], ...]) -> str:
    """Weighted prompts as they travel to the engine: a JSON list of [prompt, weight] (the
    protocol carries plain values only, so a list goes as a string)."""
    return json.dumps([[text, weight] for text, weight in rows])
