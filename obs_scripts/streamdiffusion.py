"""StreamDiffusion for OBS Studio: live video diffusion on any OBS source.

Add this file in OBS (Tools > Scripts > +). Pick an input source (a camera, a game
capture), type a prompt, and the source "StreamDiffusion output", which the script adds
to the current scene, shows the stylised video. obs_scripts/README.md says how to give
OBS's Python the packages it needs and how to troubleshoot.

How frames travel (no OBS plugin needed, on every OS):

    timer on OBS's graphics thread     the input source is rendered at the output size
                                       and read back from the GPU (one frame behind,
                                       so the read-back never waits on the GPU)
    engine link, its own thread        sends the frame to the engine over shared
                                       memory, receives the stylised frame, and pushes
                                       it into the output source at once

On Windows with the Spout2 plugin for OBS, transport "Spout" keeps frames on the GPU
instead. The engine runs in its own process (`python -m engine serve`); the script can
start and stop a local one.

This file holds OBS's entry points and the properties; the parts are in
streamdiffusion_obs/ beside it.

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
from collections import deque
from pathlib import Path

import obspython as obs

from streamdiffusion_obs import environment
from streamdiffusion_obs.local_engine import STOP_WAIT_S, LocalEngine
from streamdiffusion_obs.settings import (
    DEFAULTS,
    MODELS,
    OUTPUT_SOURCE_NAME,
    SESSION_FIELDS,
    SETTING_NAMES,
    SPOUT_OUTPUT_SOURCE_NAME,
    STREAM_RESTART_PARAMS,
    TRANSPORTS,
    ScriptSettings,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
EVERY_FRAME_MS = 1  # OBS runs a timer at most once a video frame; the pipeline paces captures itself
STATUS_ROWS = ("Engine", "Frames", "Latency", "Dropped", "Scheduler", "Last error", "Notice", "Input", "Output",
               "Capture timer", "Spout", "Local engine", "Set-up")
LOGGERS = ("bridge", "streamdiffusion_obs")  # whose records go to OBS's script log


def script_description() -> str:
    return (
        "<b>StreamDiffusion</b>: live video diffusion on an OBS source.<br>"
        "Pick an input source and a prompt; the source <i>StreamDiffusion output</i> shows the result. "
        "Needs a running engine (<code>python -m engine serve</code>, or <i>Start local engine</i>) and a "
        "Python environment with this project installed: see obs_scripts/README.md."
    )


def script_defaults(settings) -> None:
    for name in SETTING_NAMES:
        value = environment.default_folder(REPO_ROOT) if name == "environment" else getattr(DEFAULTS, name)
        _SETTING_TYPES[type(value)][1](settings, name, value)


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
    models = obs.obs_properties_add_list(engine, "model", _label("model", "Model"), obs.OBS_COMBO_TYPE_LIST,
                                         obs.OBS_COMBO_FORMAT_STRING)
    for model in MODELS:
        obs.obs_property_list_add_string(models, model, model)
    obs.obs_properties_add_group(engine, "local_engine", "Local engine", obs.OBS_GROUP_NORMAL, local_engine)

    stream = obs.obs_properties_create()
    sources = obs.obs_properties_add_list(stream, "input_source", "Input source", obs.OBS_COMBO_TYPE_LIST,
                                          obs.OBS_COMBO_FORMAT_STRING)
    _fill_source_list(sources)
    obs.obs_properties_add_text(stream, "prompt", "Prompt", obs.OBS_TEXT_MULTILINE)
    obs.obs_properties_add_float_slider(stream, "strength", "Strength", 0.01, 1.0, 0.01)
    obs.obs_properties_add_int_slider(stream, "steps", _label("steps", "Steps"), 1, 4, 1)
    obs.obs_properties_add_int(stream, "seed", "Seed", 0, 2**31 - 1, 1)
    obs.obs_properties_add_int_slider(stream, "target_fps", "Target FPS", 1, 60, 1)
    obs.obs_properties_add_int_slider(stream, "latency_ms", "Latency budget (ms)", 100, 2000, 10)
    obs.obs_properties_add_int(stream, "width", _label("width", "Output width"), 64, 4096, 2)
    obs.obs_properties_add_int(stream, "height", _label("height", "Output height"), 64, 4096, 2)
    transports = obs.obs_properties_add_list(stream, "transport", _label("transport", "Transport"),
                                             obs.OBS_COMBO_TYPE_LIST, obs.OBS_COMBO_FORMAT_STRING)
    spout_unavailable = _script.spout_unavailable() if _script is not None else "the script is not loaded"
    for index, (name, label) in enumerate(TRANSPORTS.items()):
        obs.obs_property_list_add_string(transports, label, name)
        if name == "spout" and spout_unavailable:
            obs.obs_property_list_item_disable(transports, index, True)

    props = obs.obs_properties_create()
    obs.obs_properties_add_group(props, "status", "Status", obs.OBS_GROUP_NORMAL, status)
    obs.obs_properties_add_group(props, "stream", "Stream", obs.OBS_GROUP_NORMAL, stream)
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
        self.local_engine = LocalEngine()
        self.local_engine_problem = ""
        self.log_relay = LogRelay()

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
        self.log_relay.flush_to_obs()
        if self.pipeline is not None:
            self.pipeline.tick()

    def unload(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
        self.local_engine.stop(wait_s=STOP_WAIT_S)
        self.log_relay.flush_to_obs()
        self.log_relay.detach()

    def status_rows(self) -> dict[str, str]:
        rows = {label: "" for label in STATUS_ROWS}
        if self.pipeline is not None:
            rows.update(self.pipeline.status_rows())
        else:
            rows["Engine"] = "not connected: the script cannot run (see Set-up)"
        rows["Local engine"] = self.local_engine_problem or self.local_engine.describe()
        problems = [problem for problem in (self.problem, self.environment_problem) if problem]
        rows["Set-up"] = "; ".join(problems) if problems else "ok"
        return rows

    def spout_unavailable(self) -> str | None:
        if self.pipeline is None:
            return "the script cannot run (see Set-up)"
        return self.pipeline.spout_unavailable

    def start_local_engine(self) -> None:
        if self.environment is None:
            self.local_engine_problem = f"cannot start one: {self.environment_problem}"
            return
        try:
            self.local_engine.start(self.environment.python, self.settings.model, self.settings.address, REPO_ROOT)
        except OSError as error:  # no interpreter there, say
            self.local_engine_problem = f"cannot start {self.environment.python}: {error}"
            return
        self.local_engine_problem = ""

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
        self.log_relay.attach()
        self.pipeline = Pipeline(settings, library)


class LogRelay(logging.Handler):
    """Passes the log records of the script's threads to OBS's script log.

    obs.script_log names the script whose callback is running; from the engine link's
    thread it would name none. Records are therefore kept here and written out by the
    timer, which OBS runs as this script's callback.
    """

    def __init__(self):
        super().__init__(logging.INFO)
        self._records: deque[tuple[int, str]] = deque(maxlen=200)

    def emit(self, record: logging.LogRecord) -> None:
        self._records.append((record.levelno, self.format(record)))

    def attach(self) -> None:
        for name in LOGGERS:
            logger = logging.getLogger(name)
            logger.addHandler(self)
            logger.setLevel(logging.INFO)
            logger.propagate = False  # else Python's last-resort handler prints them as errors too

    def detach(self) -> None:
        for name in LOGGERS:
            logger = logging.getLogger(name)
            logger.removeHandler(self)
            logger.propagate = True

    def flush_to_obs(self) -> None:
        while self._records:
            level, message = self._records.popleft()
            if level >= logging.ERROR:
                obs.script_log(obs.LOG_ERROR, message)
            elif level >= logging.WARNING:
                obs.script_log(obs.LOG_WARNING, message)
            else:
                obs.script_log(obs.LOG_INFO, message)


_script: StreamDiffusionScript | None = None


def _tick() -> None:
    script = _script
    if script is not None:  # None once unloaded: a tick already under way when unload began ends here
        script.tick()


# --------------------------------------------------------------------------- properties


def read_settings(settings) -> ScriptSettings:
    values = {name: _SETTING_TYPES[type(getattr(DEFAULTS, name))][0](settings, name) for name in SETTING_NAMES}
    values["address"] = values["address"].strip()
    return ScriptSettings(**values)


# How a setting of each type is read from obs_data, and how its default is set.
_SETTING_TYPES = {
    str: (obs.obs_data_get_string, obs.obs_data_set_default_string),
    int: (obs.obs_data_get_int, obs.obs_data_set_default_int),
    float: (obs.obs_data_get_double, obs.obs_data_set_default_double),
}


def _label(name: str, text: str) -> str:
    """A setting's label, saying what a change to it restarts."""
    if name in SESSION_FIELDS:
        return text + " (restarts the session)"
    if name in STREAM_RESTART_PARAMS:
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
    _script.local_engine.stop()
    _refresh_status(props)
    return True
