"""StreamDiffusionExt: the extension of the StreamDiffusion component, a Base COMP that
stylises its input TOP live through the engine.

Inside the component (build_tox.py makes it):

    in1 (In TOP) -> fit_input (Fit TOP: Output Resolution) -> stream (Script TOP) -> out1 (Out TOP)
    frame_start         Execute DAT: OnFrameStart each frame, Shutdown when TouchDesigner quits
    parameter_changes   Parameter Execute DAT: OnParameterChange, OnPulse
    engine_log          Text DAT: the engine's output and the component's messages
    prompts             Table DAT: the default Weighted Prompts (text, weight)
    loras               Table DAT: the default LoRA Styles (name, scale)

The parameter pages are streamdiffusion_params.py's, made from the bridge's parameter table;
that module, like the rest of the bridge, is imported once Bridge Path is on the module path
(until then the component only says how to get the bridge). Install (streamdiffusion_install.py)
puts the bridge the component carries, with pyzmq and msgpack from pip, into Bridge Path (by
default a folder of the user's), on a thread of its own; Status shows its progress.

Everything here runs on TouchDesigner's main thread and returns within a frame. The
bridge's host layer does the rest: bridge.launcher starts, watches and stops the engine
process, and bridge.background keeps the session on a thread of its own (its frames'
size follows the input's, its parameter changes are debounced); the cook only hands
arrays over. What stays here is TouchDesigner's: its pixels and its UI.

What the Script TOP shows:
    stopped                                  the input, unchanged
    running, before the first output         the input, while the engine warms up
    running                                  the newest stylised frame
    reconnecting, restarting, failed         the last stylised frame; Status > Message says why
    Transport Spout                          the input, unchanged: the engine reads and publishes Spout
                                             senders, which the user's Syphon Spout TOPs send and show
"""

from __future__ import annotations

import importlib
import os
import shlex
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

import streamdiffusion_install as install  # TouchDesigner's import finds the component's DAT of that name

NOTICE_S = 5.0  # how long a notice stays in Status > Message
LOG_LINES = 200
ENGINE_SETTINGS = ("Mode", "Python", "Engineargs", "Model", "Address", "Bridgepath")
CLOSE_WAIT_S = 2.0  # when TouchDesigner quits, how long the session gets to say bye


def engine_frame(pixels: np.ndarray) -> np.ndarray:
    """TouchDesigner pixels (float, 0 to 1, rows bottom to top, 1 to 4 channels) as the
    engine takes them: uint8 RGB or RGBA, rows top to bottom."""
    rows_down = pixels[::-1]
    if rows_down.shape[2] < 3:  # a mono TOP: grey
        rows_down = np.repeat(rows_down[..., :1], 3, axis=2)
    return (np.clip(rows_down, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def td_picture(pixels: np.ndarray) -> np.ndarray:
    """An engine output (uint8, rows top to bottom) as copyNumpyArray takes it: rows bottom to top."""
    return np.ascontiguousarray(pixels[::-1])


def python_problem(python: str) -> str | None:
    """Why `python` cannot be the engine's interpreter, or None when it may be."""
    if not python:
        return ("set Python Executable (Engine page) to the python of the environment the engine is "
                "installed in, e.g. .venv/bin/python or .venv\\Scripts\\python.exe")
    if os.path.isabs(python) and not os.path.isfile(python):
        return f"Python Executable {python} does not exist"
    return None


class StreamDiffusionExt:
    def __init__(self, ownerComp):
        self.ownerComp = ownerComp
        self._background = self._launcher = None  # the bridge's modules, once they load
        self._params = None  # the streamdiffusion_params module, once the bridge loads
        self._log_lines = None  # a bridge.background.LogLines, once the bridge loads
        self._process = None  # the bridge.launcher.EngineProcess this component started
        self._stopping_for_restart = None  # the EngineProcess a Restart waits to see gone
        self._client = None  # the bridge.background.BackgroundClient while streaming, or trying to
        self._address = None  # where that client connects
        self._error = None  # why the component stopped, until the next Start or Stop
        self._ended = None  # how the last engine process ended, when it ended by itself
        self._table_rows = {}  # by table spec (Weighted Prompts, LoRA Styles): the rows last sent
        self._table_problems = {}  # by table spec: what is wrong with its table, once said
        self._picture = None  # the stylised picture on screen (rows bottom to top)
        self._last_cook_ns = None
        self._notice = ("", 0.0)  # (text, time.monotonic() it was said)
        self._log = deque(maxlen=LOG_LINES)
        self._installation = None  # a streamdiffusion_install.Installation while Install runs
        self._installed_line = None  # Status > Installed, read again when Bridge Path changes or Install ends

    # -- TouchDesigner's extension callbacks ---------------------------------------------------
    def onInitTD(self):
        self._installed_line = None
        if self._bridge_loaded():
            self._apply_output_size()
        self._show_status()

    def onDestroyTD(self):
        self.Shutdown()

    # -- Engine page ---------------------------------------------------------------------------
    def Start(self):
        """Start the engine (or attach to one) and stream the input through it."""
        if self._process or self._client or self._stopping_for_restart:
            self._say("already running; Restart applies changed Engine settings")
            return
        self._error = self._ended = None
        if not self._bridge_loaded():
            return
        par = self.ownerComp.par
        if par.Mode.eval() == "attach":
            self._open_client(par.Address.eval())
            return
        python = par.Python.eval().strip()
        problem = python_problem(python)
        if problem:
            self._fail(problem)
            return
        try:
            # Split as a POSIX shell would, on Windows too: write paths with forward slashes.
            self._process = self._launcher.EngineProcess.start(
                python=python, model=par.Model.eval(), bind=par.Address.eval(), args=shlex.split(par.Engineargs.eval()),
                log_file=self._launcher.log_path("touchdesigner"))
        except (OSError, ValueError) as error:
            self._fail(f"cannot start the engine with {python}: {error}")

    def Stop(self):
        """Stop streaming (and the engine, if this component started it); the input shows again."""
        self._close_client()
        for process in (self._process, self._stopping_for_restart):
            if process is not None:
                process.stop(wait=False)
        self._process = self._stopping_for_restart = None
        self._error = self._ended = None
        self._picture = None
        self._say("stopped")

    def Restart(self):
        """Stop and start again with the current settings; the last frame stays meanwhile."""
        self._close_client()
        old = self._process
        self._process = None
        self._error = self._ended = None
        if old is not None and old.returncode is None:
            old.stop(wait=False)
            self._stopping_for_restart = old  # started again once it is gone and its address free
            self._say("restarting")
        else:
            self.Start()

    def Shutdown(self):
        """TouchDesigner is closing (or the extension reloading): end everything, waiting a little."""
        if self._client is not None:
            self._client.close(CLOSE_WAIT_S)  # lets it say bye and free its shared memory
            self._client = None
        for process in (self._process, self._stopping_for_restart):
            if process is not None:
                process.stop()  # a shutdown request, a bounded wait, then terminate and kill
        self._process = self._stopping_for_restart = None
        if self._log_lines is not None:
            self._log_lines.detach()
            self._log_lines = None

    def Install(self):
        """Put the bridge this component carries, with pyzmq and msgpack (pip), into Bridge Path."""
        if self._installation is not None:
            self._say("Install is running already")
            return
        if self._process or self._client or self._stopping_for_restart:
            self._say("press Stop before Install: the running bridge holds its files")
            return
        package = self.ownerComp.op("bridge_package")
        if package is None:
            self._fail("this component carries no bridge to install: build it again with build_tox.py")
            return
        files = {row[0].val: package.op(row[1].val).text for row in package.op("manifest").rows()[1:]}
        folder = self._bridge_folder()
        self._error = None
        self._installation = install.Installation(
            folder, files, package.op("requirements").text, package.op("version").text.strip(),
            python=self.ownerComp.par.Installpython.eval().strip(), bin_folder=_td_bin_folder()).start()
        self._say(f"installing the bridge into {folder}")
        self._show_status()  # Installing, at once

    @property
    def EngineParams(self):
        """The session's parameters as the engine last reported them ({} while there is no session)."""
        return dict(self._client.status().engine_params) if self._client is not None else {}

    # -- callbacks of the component's DATs -------------------------------------------------------
    def OnPulse(self, par):
        actions = {"Start": self.Start, "Stop": self.Stop, "Restart": self.Restart, "Install": self.Install,
                   "Openlog": self.ownerComp.op("engine_log").openViewer}
        actions[par.name]()

    def OnParameterChange(self, par):
        params = self._params
        if par.name == "Bridgepath":
            self._installed_line = None  # Status > Installed: read the new folder
        if params is None:  # without the bridge, only a new Bridge Path changes anything
            if par.name == "Bridgepath":
                self._error = None
                if self._bridge_loaded():
                    self._say("the bridge is loaded: press Start")
                    self._apply_output_size()
            return
        spec = params.SPECS.get(par.name) or params.SPECS[par.name[:-1]]  # Resolution1 -> Resolution
        if spec in params.SESSION_SPECS:
            if spec in params.TABLE_SPECS:
                self._table_rows.pop(spec.name, None)  # another table: read it afresh
            elif self._client is not None:  # without one, the next Start reads every value afresh
                self._client.set(**{spec.param.name: params.engine_value(spec, par)})
        elif spec in params.PAGES["Transport"]:  # what a session opens with: a new one opens
            if spec.name == "Transport":
                self._picture = None  # the input shows until the other transport brings pictures (Spout: never)
            self._apply_output_size()
            if self._client is not None:
                self._client.configure(self._session_config(self._address))
        elif spec.name in ENGINE_SETTINGS and (self._process or self._client):
            self._say(f"{spec.label} applies at the next Start or Restart")

    def OnFrameStart(self):
        self._tend_installation()
        self._tend_processes()
        self._take_log_lines()
        self._read_tables()
        self._show_status()
        self.ownerComp.op("stream").cook(force=True)  # so it takes the newest output every frame

    def Cook(self, scriptOp):
        """The Script TOP's cook: hand the input over and show the newest picture."""
        now_ns = time.monotonic_ns()
        source = scriptOp.inputs[0] if scriptOp.inputs else None
        # The delayed download returns the image the previous call asked for, so the GPU
        # never stalls; that image was current at the previous cook.
        pixels = source.numpyArray(delayed=True) if source is not None else None
        # With Spout the engine reads its frames from a Spout sender, not from here.
        if pixels is not None and self._client is not None and self.ownerComp.par.Transport.eval() != "spout":
            # A copy: TouchDesigner may reuse the download's memory, and the client reads it on its thread.
            self._client.offer(pixels.copy(), self._last_cook_ns or now_ns)
        self._last_cook_ns = now_ns
        if self._client is not None:
            picture = self._client.take()
            if picture is not None:
                self._picture = picture
        if self._picture is not None:
            scriptOp.copyNumpyArray(self._picture)
        elif pixels is not None:
            scriptOp.copyNumpyArray(pixels)  # nothing stylised yet: the input shows
        state, message = self._state()
        if message and state != "streaming":
            scriptOp.addWarning(message)

    # -- the engine and the session ----------------------------------------------------------------
    def _bridge_loaded(self):
        """Whether the bridge is loaded, loading it if it is not; when it cannot be, says what to do."""
        problem = self._load_bridge()
        if problem:
            self._fail(problem)
        return problem is None

    def _load_bridge(self):
        """Import the bridge's host layer and the parameter pages; a message saying what to do if that fails."""
        if self._params is not None:
            return None
        folder = str(self._bridge_folder())
        if os.path.isdir(folder) and folder not in sys.path:
            sys.path.append(folder)  # appended, so TouchDesigner's own numpy keeps precedence
        try:
            # Here, not at the top: Bridge Path must be on the path first.
            from bridge import background, launcher
            import streamdiffusion_params as params  # made from the bridge's parameter table
        except ImportError as error:
            return (f"cannot load the bridge ({error}): press Install (Engine page) to put it in {folder} for "
                    f"TouchDesigner's Python {install.td_version()}, or set Bridge Path to a folder that has it "
                    f"(see README.md)")
        self._background, self._launcher, self._params = background, launcher, params
        if self._log_lines is None:
            self._log_lines = background.LogLines()
            self._log_lines.attach()
        return None

    def _bridge_folder(self):
        """Bridge Path, or by default the user's folder for this Python version."""
        chosen = self.ownerComp.par.Bridgepath.eval().strip()
        return Path(chosen) if chosen else install.default_folder()

    def _tend_installation(self):
        """Install's progress into the log; once it ends, the bridge loaded from where it went."""
        installation = self._installation
        if installation is None:
            return
        self._log_to_dat([f"[install] {line}" for line in installation.take_lines()])
        if not installation.done:
            return
        self._installation = None
        self._installed_line = None
        if installation.error:
            self._fail(f"Install failed: {installation.error}. See the log (Open Log)")
            return
        importlib.invalidate_caches()  # the folder's new packages, for the imports that follow
        if self._params is not None:
            self._say(f"installed in {installation.folder}; the bridge loaded before stays in use until "
                      f"TouchDesigner restarts")
        elif self._bridge_loaded():
            self._apply_output_size()
            self._say(f"installed in {installation.folder}: press Start")

    def _open_client(self, address):
        """A session on the engine at address, with whatever model it serves."""
        self._client = self._background.BackgroundClient(
            self._session_config(address), self._engine_values(), convert_input=engine_frame,
            convert_output=td_picture).start()
        self._address = address

    def _session_config(self, address):
        """Shared memory at the size of the frames the cook offers, or Spout at Resolution
        between the senders the Spout parameters name."""
        par, params = self.ownerComp.par, self._params
        if par.Transport.eval() != "spout":
            return self._background.SessionConfig(address, "shm")
        senders = tuple((spec.param.name, params.engine_value(spec, par[spec.name])) for spec in params.SPOUT_SPECS)
        return self._background.SessionConfig(address, "spout", width=par.Resolution1.eval(),
                                              height=par.Resolution2.eval(), transport_params=senders)

    def _engine_values(self):
        """Every session parameter's value, as the engine takes it."""
        pars, params = self.ownerComp.par, self._params
        for spec in params.TABLE_SPECS:
            self._table_rows[spec.name] = self._table_list(spec) or []
        return {spec.param.name: self._table_rows[spec.name] if spec in params.TABLE_SPECS
                else params.engine_value(spec, pars[spec.name]) for spec in params.SESSION_SPECS}

    def _close_client(self):
        if self._client is not None:
            self._client.close(wait_s=0)  # returns at once; its thread says bye on its own
            self._client = None

    def _tend_processes(self):
        for process in (self._process, self._stopping_for_restart):
            if process is not None:
                self._log_to_dat(process.new_log_lines())
        if self._stopping_for_restart is not None and self._stopping_for_restart.returncode is not None:
            self._stopping_for_restart = None
            self.Start()
        process = self._process
        if process is None:
            return
        if process.start_error is not None or process.returncode is not None:  # it crashed, or could not start
            self._ended = process.describe()
            self._process = None
            self._close_client()
            self._fail(f"the engine stopped ({self._ended}). See the log (Open Log), fix it and press Start")
        elif self._client is None and process.address is not None:
            self._open_client(process.address)

    def _take_log_lines(self):
        if self._log_lines is not None:
            self._log_to_dat([line for _, line in self._log_lines.take()])

    # -- parameters ------------------------------------------------------------------------------
    def _read_tables(self):
        """Send a table's rows (Weighted Prompts, LoRA Styles) when they changed (each is read
        every frame: no parameter changes when a cell does)."""
        if self._params is None:
            return
        for spec in self._params.TABLE_SPECS:
            rows = self._table_list(spec)
            if rows is not None and rows != self._table_rows.get(spec.name):
                self._table_rows[spec.name] = rows
                if self._client is not None:
                    self._client.set(**{spec.param.name: rows})

    def _table_list(self, spec):
        """A table's [text, number] rows, or None (said once) when it is wrong."""
        try:
            rows = self._params.pair_list(spec, self.ownerComp.par[spec.name].eval())
        except ValueError as error:
            if str(error) != self._table_problems.get(spec.name):
                self._table_problems[spec.name] = str(error)
                self._say(f"{error}; the {spec.param.name} sent before stay")
            return None
        self._table_problems.pop(spec.name, None)
        return rows

    def _apply_output_size(self):
        par, params = self.ownerComp.par, self._params
        fit = self.ownerComp.op("fit_input")
        if par.Outputsize.eval() != "custom":
            fit.par.outputresolution = "useinput"
            return
        width, height = par.Resolution1.eval(), par.Resolution2.eval()
        fit.par.outputresolution = "custom"
        fit.par.resolutionw, fit.par.resolutionh = width, height
        if max(width, height) > params.FREE_LICENCE_MAX_SIDE:
            self._say(f"{width}x{height}: the Non-Commercial licence caps TOPs at "
                      f"{params.FREE_LICENCE_MAX_SIDE} a side")

    # -- status ------------------------------------------------------------------------------------
    def _state(self):
        """(Engine State, Message) as the Status page shows them."""
        if self._error:
            return "error", self._error
        if self._installation is not None:
            return "installing", f"installing into {self._installation.folder}: {self._installation.last_line}"
        status = self._client.status() if self._client is not None else None
        if status is not None:
            state, message = status.state, status.error or status.message
            if status.state == "waiting for frames":
                message = "connect a TOP to the component's input"
            elif status.notice and state not in ("error", "disconnected"):
                message = status.notice  # e.g. that a change restarts the stream
        elif self._stopping_for_restart is not None:
            state, message = "restarting", "restarting the engine; the last frame stays meanwhile"
        elif self._process is not None:
            state, message = "starting engine", "the engine is starting"
        else:
            state, message = "stopped", "press Start to stream the input through the engine"
        notice, said_at = self._notice
        if time.monotonic() - said_at < NOTICE_S and state not in ("error", "disconnected"):
            message = notice  # the component's own news, e.g. that a setting applies at the next Start
        return state, message

    def _show_status(self):
        par = self.ownerComp.par
        state, message = self._state()
        status = self._client.status() if self._client is not None else None
        shown = {
            "Enginestate": state,
            "Message": message,
            "Outputfps": round(status.output_fps, 1) if status else 0.0,
            "Latency": round(status.latency_ms or 0.0, 1) if status else 0.0,
            "Droppedframes": status.dropped.total if status else 0,
            "Firstframe": round(status.first_frame_ms or 0.0, 1) if status else 0.0,
            "Scheduler": status.scheduler if status else "",
            "Enginemodel": status.model if status else "",
            "Processstate": self._process_state(),
            "Installed": self._installed(),
        }
        for name, value in shown.items():
            if par[name].eval() != value:  # unchanged values are not set again
                par[name].val = value

    def _installed(self):
        if self._installed_line is None:
            self._installed_line = install.describe(self._bridge_folder())
        return self._installed_line

    def _process_state(self):
        process = self._process or self._stopping_for_restart
        if process is not None:
            return process.describe()
        if self._client is not None:
            return f"attached to the engine at {self._address}"
        return self._ended or "stopped"

    def _fail(self, message):
        self._error = message
        self._say(message)

    def _say(self, line):
        self._notice = (line, time.monotonic())
        self._log_to_dat([f"[component] {line}"])

    def _log_to_dat(self, lines):
        if lines:
            self._log.extend(lines)
            self.ownerComp.op("engine_log").text = "\n".join(self._log)


def _td_bin_folder():
    """TouchDesigner's binaries folder (app.binFolder), where Install looks for its Python first."""
    try:
        import td

        return td.app.binFolder
    except (ImportError, AttributeError):
        return None
