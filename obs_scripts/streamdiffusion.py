"""StreamDiffusion for OBS Studio: live video diffusion on any OBS source.

Add this file in OBS (Tools > Scripts > +). Pick an input source (a camera, a game
capture), type a prompt, and the source "StreamDiffusion output", which the script adds
to the current scene, shows the stylised video. obs_scripts/README.md says how to give
OBS's Python the packages it needs and how to troubleshoot.

How frames travel (no OBS plugin needed, on every OS):

    timer on OBS's graphics thread     the input source is rendered at the output size
                                       and read back from the GPU (one frame behind,
                                       so the read-back never waits on the GPU)
    the bridge's background client,    sends the frame to the engine over shared
    on its own thread                  memory, receives the stylised frame, and pushes
                                       it into the output source at once

On Windows with the Spout2 plugin for OBS, transport "Spout" keeps frames on the GPU
instead. The engine runs in its own process (`python -m engine serve`); the script can
start and stop a local one (bridge/launcher.py).

This file holds OBS's entry points and the properties; the parts are in
streamdiffusion_obs/ beside it. The session parameters' properties (prompt, strength,
target FPS, ...) are made from the bridge's parameter table (bridge/params.py): their
names, kinds, bounds, defaults, menus and help are its entries'.

One rule of OBS 29's Python scripting shapes the entry points: OBS records which script
is running in a single variable shared by all threads, and a timer callback that ends
while a UI callback runs (they take turns on Python's lock) sets it back to "none".
timer_add, timer_remove and obs_properties_add_button read it and crash OBS when it is
"none". So the script adds its one timer first thing in script_load and never removes
it (OBS removes a script's timers itself before script_unload), and script_properties
adds its buttons before anything else.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import obspython as obs

from streamdiffusion_obs import environment

REPO_ROOT = Path(__file__).resolve().parent.parent
# The parameter table (bridge/params.py) needs nothing but the standard library: importable from the
# repository before the Python environment with the bridge's other packages is found.
environment.put_first_on_path(REPO_ROOT)

from bridge import controls  # noqa: E402
from bridge import params as table  # noqa: E402
from streamdiffusion_obs.settings import (  # noqa: E402
    DEFAULTS,
    HOST_SETTINGS,
    OUTPUT_SOURCE_NAME,
    SESSION_FIELDS,
    SESSION_PARAMS,
    SPOUT_OUTPUT_SOURCE_NAME,
    TRANSPORTS,
    ScriptSettings,
)

EVERY_FRAME_MS = 1  # OBS runs a timer at most once a video frame; the pipeline paces captures itself
STATUS_ROWS = ("Engine", "Model", "Frames", "Latency", "Dropped", "Scheduler", "Error", "Notice", "Input", "Output",
               "Capture timer", "Spout", "Local engine", "Set-up")


def script_description() -> str:
    return (
        "<b>StreamDiffusion</b>: live video diffusion on an OBS source.<br>"
        "Pick an input source and a prompt; the source <i>StreamDiffusion output</i> shows the result. "
        "Needs a running engine (<code>python -m engine serve</code>, or <i>Start local engine</i>) and a "
        "Python environment with this project installed: see obs_scripts/README.md."
    )


def script_defaults(settings) -> None:
    for name in HOST_SETTINGS:
        value = environment.default_folder(REPO_ROOT) if name == "environment" else getattr(DEFAULTS, name)
        _ACCESS[_HOST_SETTING_KINDS[type(value)]][1](settings, name, value)
    for param in SESSION_PARAMS:
        default = _pairs_text(param.default) if param.kind in table.PAIR_KINDS else param.default
        _ACCESS[param.kind][1](settings, param.name, default)


def script_load(settings) -> None:
    global _script
    obs.timer_add(_tick, EVERY_FRAME_MS)  # first: see the module doc
    _script = StreamDiffusionScript()  # script_update, which OBS calls next, configures it


def script_update(settings) -> None:
    _script.update(read_settings(settings))


def script_unload() -> None:
    global _script  # no timer_remove: OBS has removed the timer already (see the module doc)
    script, _script = _script, None
    script.unload()


def script_properties():
    # The buttons first (see the module doc); groups put them where they belong on screen.
    status = obs.obs_properties_create()
    obs.obs_properties_add_button(status, "refresh", "Refresh status and sources", _on_refresh)
    local_engine = obs.obs_properties_create()
    obs.obs_properties_add_button(local_engine, "start_engine", "Start local engine", _on_start_engine)
    obs.obs_properties_add_button(local_engine, "stop_engine", "Stop local engine", _on_stop_engine)

    for label, text in _status_rows().items():
        row = obs.obs_properties_add_text(status, _status_key(label), label, obs.OBS_TEXT_INFO)
        obs.obs_property_set_long_description(row, text)

    engine = obs.obs_properties_create()
    obs.obs_properties_add_text(engine, "address", _label("address", "Engine address"), obs.OBS_TEXT_DEFAULT)
    obs.obs_properties_add_path(engine, "environment", "Python environment (a venv with this project)",
                                obs.OBS_PATH_DIRECTORY, "", None)
    models = obs.obs_properties_add_list(engine, "model", "Model (of a local engine)", obs.OBS_COMBO_TYPE_LIST,
                                         obs.OBS_COMBO_FORMAT_STRING)
    obs.obs_property_set_long_description(models, "The model Start local engine serves. The script uses whichever "
                                                  "model the engine it reaches serves (Status > Model).")
    for model in controls.MODELS:
        obs.obs_property_list_add_string(models, model, model)
    obs.obs_properties_add_group(engine, "local_engine", "Local engine", obs.OBS_GROUP_NORMAL, local_engine)

    video = obs.obs_properties_create()
    sources = obs.obs_properties_add_list(video, "input_source", "Input source", obs.OBS_COMBO_TYPE_LIST,
                                          obs.OBS_COMBO_FORMAT_STRING)
    _fill_source_list(sources)
    obs.obs_properties_add_int(video, "width", _label("width", "Output width"), 64, 4096, 2)
    obs.obs_properties_add_int(video, "height", _label("height", "Output height"), 64, 4096, 2)
    transports = obs.obs_properties_add_list(video, "transport", _label("transport", "Transport"),
                                             obs.OBS_COMBO_TYPE_LIST, obs.OBS_COMBO_FORMAT_STRING)
    spout_unavailable = _script.spout_unavailable() if _script is not None else "the script is not loaded"
    for index, (name, label) in enumerate(TRANSPORTS.items()):
        obs.obs_property_list_add_string(transports, label, name)
        if name == "spout" and spout_unavailable:
            obs.obs_property_list_item_disable(transports, index, True)

    props = obs.obs_properties_create()
    obs.obs_properties_add_group(props, "status", "Status", obs.OBS_GROUP_NORMAL, status)
    obs.obs_properties_add_group(props, "video", "Video", obs.OBS_GROUP_NORMAL, video)
    for group in controls.HOST_GROUPS:
        params = obs.obs_properties_create()
        for param in table.in_group(group):
            _add_session_param(params, param)
        obs.obs_properties_add_group(props, f"{group.lower()}_group", group, obs.OBS_GROUP_NORMAL, params)
    obs.obs_properties_add_group(props, "engine", "Engine", obs.OBS_GROUP_NORMAL, engine)
    return props


# ----------------------------------------------------------------------------- the script


class StreamDiffusionScript:
    """What runs between script_load and script_unload."""

    def __init__(self):
        self.settings: ScriptSettings | None = None
        self.environment: environment.PythonEnvironment | None = None
        self.environment_problem = ""
        self.pipeline = None  # a streamdiffusion_obs.pipeline.Pipeline once its packages import
        self.problem = ""  # why there is no pipeline
        self.local_engine = None  # the bridge.launcher.EngineProcess the buttons started
        self.local_engine_problem = ""
        self.log_lines = None  # a bridge.background.LogLines, once the bridge imports

    def update(self, settings: ScriptSettings) -> None:
        before, self.settings = self.settings, settings
        if before is None or settings.environment != before.environment:
            self._find_environment(settings.environment)
        if self.pipeline is None:
            self._start_pipeline(settings)
        else:
            self.pipeline.reconfigure(settings)

    def tick(self) -> None:
        """The timer, on OBS's graphics thread, once a video frame."""
        self._log_to_obs()
        if self.pipeline is not None:
            self.pipeline.tick()

    def unload(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
        if self.local_engine is not None:
            self.local_engine.stop()  # a shutdown request, a bounded wait, then terminate and kill
        self._log_to_obs()
        if self.log_lines is not None:
            self.log_lines.detach()

    def status_rows(self) -> dict[str, str]:
        rows = {label: "" for label in STATUS_ROWS}
        if self.pipeline is not None:
            rows.update(self.pipeline.status_rows())
        else:
            rows["Engine"] = "not connected: the script cannot run (see Set-up)"
        rows["Local engine"] = self.local_engine_problem or self._describe_local_engine()
        problems = [problem for problem in (self.problem, self.environment_problem, self.settings.problem) if problem]
        rows["Set-up"] = "; ".join(problems) if problems else "ok"
        return rows

    def spout_unavailable(self) -> str | None:
        if self.pipeline is None:
            return "the script cannot run (see Set-up)"
        return self.pipeline.spout_unavailable

    def start_local_engine(self) -> None:
        """`python -m engine serve` with the environment's interpreter (the engine needs torch,
        which OBS's Python has not), unless one started here still runs. Returns at once."""
        if self.environment is None:
            self.local_engine_problem = f"cannot start one: {self.environment_problem}"
            return
        if self.local_engine is not None and self.local_engine.returncode is None:
            return
        from bridge.launcher import EngineProcess, log_path  # importable once the environment is active

        try:
            self.local_engine = EngineProcess.start(python=str(self.environment.python), model=self.settings.model,
                                                    bind=self.settings.address, cwd=REPO_ROOT,
                                                    log_file=log_path("obs"))
        except ValueError as error:  # the address is not one ZeroMQ takes: the message says how to write it
            self.local_engine_problem = str(error)
            return
        except OSError as error:  # no interpreter there, say
            self.local_engine_problem = f"cannot start {self.environment.python}: {error}"
            return
        self.local_engine_problem = ""

    def stop_local_engine(self) -> None:
        """Ask the engine to stop; returns at once (the launcher waits, then kills, on its thread)."""
        if self.local_engine is not None:
            self.local_engine.stop(wait=False)

    def _describe_local_engine(self) -> str:
        if self.local_engine is None:
            return "not started by this script"
        return f"{self.local_engine.describe()}; its log: {self.local_engine.log_path}"

    def _find_environment(self, folder: str) -> None:
        try:
            self.environment = environment.find(folder)
        except environment.EnvironmentProblem as problem:
            self.environment, self.environment_problem = None, str(problem)
            return
        self.environment_problem = ""
        environment.activate(self.environment, REPO_ROOT)

    def _start_pipeline(self, settings: ScriptSettings) -> None:
        """Import the frame path (numpy, pyzmq, bridge/: from the Python environment) and start it."""
        try:
            from bridge.background import LogLines
            from streamdiffusion_obs import libobs
            from streamdiffusion_obs.pipeline import Pipeline
        except ImportError as error:
            self.problem = (f"cannot import {error.name or error}: set the Python environment to a venv made with "
                            "OBS's Python version that has this project installed (obs_scripts/README.md)")
            return
        try:
            library = libobs.load()
        except OSError as error:
            self.problem = f"cannot load libobs through ctypes: {error}"
            return
        self.problem = ""
        self.log_lines = LogLines()
        self.log_lines.attach()
        self.pipeline = Pipeline(settings, library)

    def _log_to_obs(self) -> None:
        """The bridge's log records, from any thread, into OBS's script log. obs.script_log names
        the script whose callback is running (from another thread, none), so the timer writes them."""
        if self.log_lines is None:
            return
        for level, line in self.log_lines.take():
            obs.script_log(_obs_log_level(level), line)


_script: StreamDiffusionScript | None = None


def _obs_log_level(level: int) -> int:
    """OBS opens its Script Log window on every warning: expected states (no engine yet, the engine
    lost) are INFO in the bridge, so only real faults bring it up."""
    if level >= logging.ERROR:
        return obs.LOG_ERROR
    return obs.LOG_WARNING if level >= logging.WARNING else obs.LOG_INFO


def _tick() -> None:
    script = _script
    if script is not None:  # None once unloaded: a tick already under way when unload began ends here
        script.tick()


# --------------------------------------------------------------------------- properties


def read_settings(settings) -> ScriptSettings:
    values = {name: _ACCESS[_HOST_SETTING_KINDS[type(getattr(DEFAULTS, name))]][0](settings, name)
              for name in HOST_SETTINGS}
    values["address"] = values["address"].strip()
    params, problems = {}, []
    for param in SESSION_PARAMS:
        value = _ACCESS[param.kind][0](settings, param.name)
        if param.kind in table.PAIR_KINDS:
            try:
                value = controls.pairs((line.rsplit(",", 1) for line in value.splitlines()), param)
            except ValueError as error:
                problems.append(f"{param.label}: {error}; the {param.name} sent before stay")
                continue
        params[param.name] = value
    return ScriptSettings(**values, params=params, problem="; ".join(problems))


# How a setting of each kind (the table's kinds) is read from obs_data, and how its default is set.
_ACCESS = {
    "bool": (obs.obs_data_get_bool, obs.obs_data_set_default_bool),
    "int": (obs.obs_data_get_int, obs.obs_data_set_default_int),
    "float": (obs.obs_data_get_double, obs.obs_data_set_default_double),
    "str": (obs.obs_data_get_string, obs.obs_data_set_default_string),
    # lists of pairs: text, one pair a line (pairs_format)
    **{kind: (obs.obs_data_get_string, obs.obs_data_set_default_string) for kind in table.PAIR_KINDS},
}
_HOST_SETTING_KINDS = {str: "str", int: "int"}  # the script's own settings' kinds, by their defaults' types
# A number's property: a slider over the table's bounds, or a spin box where the table's
# `slider` says they are too wide for one. By (kind, slider).
_NUMBER_PROPERTIES = {
    ("int", True): obs.obs_properties_add_int_slider,
    ("int", False): obs.obs_properties_add_int,
    ("float", True): obs.obs_properties_add_float_slider,
    ("float", False): obs.obs_properties_add_float,
}


def _add_session_param(props, param: table.Param) -> None:
    """A session parameter's property: all of it from the parameter's table entry."""
    label = _label(param.name, param.label)
    if param.choices:
        prop = obs.obs_properties_add_list(props, param.name, label, obs.OBS_COMBO_TYPE_LIST,
                                           obs.OBS_COMBO_FORMAT_STRING)
        for value, text in controls.menu(param):
            obs.obs_property_list_add_string(prop, text, value)
    elif param.kind == "bool":
        prop = obs.obs_properties_add_bool(props, param.name, label)
    elif param.kind in ("int", "float"):
        add = _NUMBER_PROPERTIES[param.kind, param.slider is None]
        prop = add(props, param.name, label, param.minimum, param.maximum, _step(param))
    else:  # a prompt, or a list of pairs (weighted prompts, LoRA adapters)
        prop = obs.obs_properties_add_text(props, param.name, label, obs.OBS_TEXT_MULTILINE)
    help_text = controls.help_text(param)
    obs.obs_property_set_long_description(prop, help_text + pairs_format(param) if param.kind in table.PAIR_KINDS
                                          else help_text)


def _step(param: table.Param) -> float:
    """A number's step: 1 for an integer, else the power of ten nearest a hundredth of its slider's range."""
    if param.kind == "int":
        return 1
    low, high = param.slider_range
    return 10.0 ** round(math.log10((high - low) / 100))


def pairs_format(param: table.Param) -> str:
    """How the text of a list of pairs (Weighted Prompts, LoRA Styles) is read, said after its help."""
    pairs = table.PAIR_KINDS[param.kind]
    return f" Here one a line: {pairs.text}, {pairs.number} (1 when left out)."


def _pairs_text(pairs) -> str:
    """A list of pairs as its text shows it (pairs_format)."""
    return "\n".join(f"{text}, {number:g}" for text, number in pairs)


def _label(name: str, text: str) -> str:
    """A setting's label, saying what a change to it restarts."""
    if name in SESSION_FIELDS:
        return text + " (restarts the session)"
    if name in table.PARAMS and table.PARAMS[name].applies == table.RELOAD:
        return text + " (restarts the stream)"
    return text


def _status_key(label: str) -> str:
    return "status_" + label.lower().replace(" ", "_").replace("-", "")


def _status_rows() -> dict[str, str]:
    if _script is None:
        return {label: "the script is not loaded" for label in STATUS_ROWS}
    return _script.status_rows()


def _fill_source_list(prop) -> None:
    """Every source with video, but not the script's own output (it would feed itself)."""
    obs.obs_property_list_add_string(prop, "(none)", "")
    sources = obs.obs_enum_sources()
    for source in sources or []:
        name = obs.obs_source_get_name(source)
        has_video = obs.obs_source_get_output_flags(source) & obs.OBS_SOURCE_VIDEO
        if has_video and name not in (OUTPUT_SOURCE_NAME, SPOUT_OUTPUT_SOURCE_NAME):
            obs.obs_property_list_add_string(prop, name, name)
    obs.source_list_release(sources)


def _refresh_status(props) -> None:
    for label, text in _status_rows().items():
        obs.obs_property_set_long_description(obs.obs_properties_get(props, _status_key(label)), text)


def _on_refresh(props, prop) -> bool:
    _refresh_status(props)
    sources = obs.obs_properties_get(props, "input_source")
    obs.obs_property_list_clear(sources)
    _fill_source_list(sources)
    return True  # OBS redraws the properties


def _on_start_engine(props, prop) -> bool:
    _script.start_local_engine()
    _refresh_status(props)
    return True


def _on_stop_engine(props, prop) -> bool:
    _script.stop_local_engine()
    _refresh_status(props)
    return True
