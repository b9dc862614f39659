"""StreamDiffusionExt: the extension of the StreamDiffusion component, a Base COMP that
stylises its input TOP live through the engine.

Inside the component (build_tox.py makes it):

    in1 (In TOP) -> fit_input (Fit TOP: Output Resolution) -> stream (Script TOP) -> out1 (Out TOP)
    frame_start         Execute DAT: OnFrameStart each frame, Shutdown when TouchDesigner quits
    parameter_changes   Parameter Execute DAT: OnParameterChange, OnPulse
    engine_log          Text DAT: the engine's output and the component's messages
    prompts             Table DAT: the default Weighted Prompts (prompt, weight)

Everything here runs on TouchDesigner's main thread and returns within a frame. The
engine process starts and stops without being waited for (EngineProcess), and the
session lives on a thread of its own (EngineLink); the cook only hands arrays over.

What the Script TOP shows:
    stopped                                  the input, unchanged
    running, before the first output         the input, while the engine warms up
    running                                  the newest stylised frame
    reconnecting, restarting, failed         the last stylised frame; Status > Message says why
"""

from __future__ import annotations

import sys
import time
from collections import deque

import streamdiffusion_params as params
from engine_process import EngineProcess, python_problem

DEBOUNCE_S = 0.1  # parameter changes are sent once they have been still this long
NOTICE_S = 5.0  # how long a notice stays in Status > Message
LOG_LINES = 200
ENGINE_SETTINGS = ("Mode", "Python", "Engineargs", "Model", "Address", "Bridgepath", "Transport")


class StreamDiffusionExt:
    def __init__(self, ownerComp):
        self.ownerComp = ownerComp
        self._engine_link = None  # the engine_link module, once the bridge loads
        self._process = None  # the EngineProcess this component started
        self._stopping_for_restart = None  # the EngineProcess a Restart waits to see gone
        self._link = None  # the EngineLink while streaming, or trying to
        self._error = None  # why the component stopped, until the next Start or Stop
        self._ended = None  # how the last engine process ended, when it ended by itself
        self._pending = {}  # engine parameter -> value, changed but not sent yet
        self._last_change = 0.0
        self._prompt_rows = None  # the Weighted Prompts rows last sent
        self._prompt_problem = None  # what is wrong with the Weighted Prompts table, once said
        self._picture = None  # the stylised picture on screen (rows bottom to top)
        self._last_cook_ns = None
        self._notice = ("", 0.0)  # (text, time.monotonic() it was said)
        self._log = deque(maxlen=LOG_LINES)

    # -- TouchDesigner's extension callbacks ---------------------------------------------------
    def onInitTD(self):
        self._apply_output_size()
        self._show_status()

    def onDestroyTD(self):
        self.Shutdown()

    # -- Engine page ---------------------------------------------------------------------------
    def Start(self):
        """Start the engine (or attach to one) and stream the input through it."""
        if self._process or self._link or self._stopping_for_restart:
            self._say("already running; Restart applies changed Engine settings")
            return
        self._error = self._ended = None
        problem = self._load_bridge() or self._transport_problem()
        if problem:
            self._fail(problem)
            return
        par = self.ownerComp.par
        if par.Mode.eval() == "attach":
            self._open_link(par.Address.eval())
            return
        python = par.Python.eval().strip()
        problem = python_problem(python)
        if problem:
            self._fail(problem)
            return
        try:
            self._process = EngineProcess.start(python, par.Model.eval(), par.Address.eval(), par.Engineargs.eval())
        except (OSError, ValueError) as error:
            self._fail(f"cannot start the engine with {python}: {error}")
            return
        self._say(f"engine starting: {python} -m engine serve --model {par.Model.eval()} "
                  f"--bind {par.Address.eval()} {par.Engineargs.eval()}".rstrip())

    def Stop(self):
        """Stop streaming (and the engine, if this component started it); the input shows again."""
        self._close_link()
        for process in (self._process, self._stopping_for_restart):
            if process is not None:
                process.stop()
        self._process = self._stopping_for_restart = None
        self._error = self._ended = None
        self._picture = None
        self._say("stopped")

    def Restart(self):
        """Stop and start again with the current settings; the last frame stays meanwhile."""
        self._close_link()
        old = self._process
        self._process = None
        self._error = self._ended = None
        if old is not None and old.returncode is None:
            old.stop()
            self._stopping_for_restart = old  # started again once it is gone and its address free
            self._say("restarting")
        else:
            self.Start()

    def Shutdown(self):
        """TouchDesigner is closing (or the extension reloading): end everything, waiting a little."""
        if self._link is not None:
            self._link.close(wait_s=2.0)  # lets it say bye and free its shared memory
            self._link = None
        for process in (self._process, self._stopping_for_restart):
            if process is not None:
                process.shutdown()
        self._process = self._stopping_for_restart = None

    @property
    def EngineParams(self):
        """The session's parameters as the engine last reported them ({} while there is no session)."""
        return dict(self._link.status().engine_params) if self._link is not None else {}

    # -- callbacks of the component's DATs -------------------------------------------------------
    def OnPulse(self, par):
        actions = {"Start": self.Start, "Stop": self.Stop, "Restart": self.Restart,
                   "Openlog": self.ownerComp.op("engine_log").openViewer}
        actions[par.name]()

    def OnParameterChange(self, par):
        spec = params.SPECS.get(par.name) or params.SPECS[par.name[:-1]]  # Resolution1 -> Resolution
        if spec.name == "Promptlist":
            self._prompt_rows = None  # another table: read it afresh
        elif spec.engine_name:
            self._pending[spec.engine_name] = params.engine_value(spec, par)
            self._last_change = time.monotonic()
        elif spec.name in ("Outputsize", "Resolution"):
            self._apply_output_size()
        elif spec.name in ENGINE_SETTINGS and (self._process or self._link):
            self._say(f"{spec.label} applies at the next Start or Restart")

    def OnFrameStart(self):
        self._tend_processes()
        self._take_link_notes()
        self._read_prompt_list()
        self._send_changes()
        self._show_status()
        self.ownerComp.op("stream").cook(force=True)  # so it takes the newest output every frame

    def Cook(self, scriptOp):
        """The Script TOP's cook: hand the input over and show the newest picture."""
        now_ns = time.monotonic_ns()
        source = scriptOp.inputs[0] if scriptOp.inputs else None
        # The delayed download returns the image the previous call asked for, so the GPU
        # never stalls; that image was current at the previous cook.
        pixels = source.numpyArray(delayed=True) if source is not None else None
        if pixels is not None and self._link is not None:
            # A copy: TouchDesigner may reuse the download's memory, and the link reads it on its thread.
            self._link.post_frame(pixels.copy(), self._last_cook_ns or now_ns)
        self._last_cook_ns = now_ns
        if self._link is not None:
            picture = self._link.take_picture()
            if picture is not None:
                self._picture = picture
        if self._picture is not None:
            scriptOp.copyNumpyArray(self._picture)
        elif pixels is not None:
            scriptOp.copyNumpyArray(pixels)  # nothing stylised yet: the input shows
        state, message = self._state()
        if message and state != "streaming":
            scriptOp.addWarning(message)

    # -- the engine and the link ---------------------------------------------------------------
    def _load_bridge(self):
        """Import the link (and with it the bridge); a message saying what to do if that fails."""
        folder = self.ownerComp.par.Bridgepath.eval().strip()
        if folder and folder not in sys.path:
            sys.path.append(folder)  # appended, so TouchDesigner's own numpy keeps precedence
        try:
            import engine_link  # here, not at the top: Bridge Path must be on the path first
        except ImportError as error:
            return (f"cannot load the bridge ({error}): install it for TouchDesigner's Python "
                    f"{sys.version_info.major}.{sys.version_info.minor} and set Bridge Path (see README.md)")
        self._engine_link = engine_link
        return None

    def _transport_problem(self):
        if self.ownerComp.par.Transport.eval() != "spout":
            return None
        if sys.platform != "win32":
            return "Spout is Windows-only; set Transport to Shared Memory"
        return ("this component exchanges frames over shared memory only; set Transport to Shared Memory, or "
                "use Syphon Spout Out and In TOPs with an engine started as "
                "python -m engine serve --spout-in NAME --spout-out NAME")

    def _open_link(self, address):
        values = self._engine_values()
        defaults = {spec.engine_name: spec.default for spec in params.SPECS.values() if spec.engine_name}
        defaults["prompts"] = params.prompts_json(())
        labels = {spec.engine_name: spec.label for spec in params.SPECS.values() if spec.engine_name}
        self._link = self._engine_link.EngineLink(address, model=self.ownerComp.par.Model.eval(), params=values,
                                                  labels=labels, defaults=defaults)
        self._pending.clear()

    def _engine_values(self):
        par = self.ownerComp.par
        values = {spec.engine_name: params.engine_value(spec, par[spec.name])
                  for spec in params.SPECS.values() if spec.engine_name and spec.name != "Promptlist"}
        self._read_prompt_list()
        values["prompts"] = params.prompts_json(self._prompt_rows or ())
        return values

    def _close_link(self):
        if self._link is not None:
            self._link.close()  # returns at once; the link's thread says bye on its own
            self._take_link_notes()
            self._link = None

    def _tend_processes(self):
        for process in (self._process, self._stopping_for_restart):
            if process is not None:
                self._log_lines(process.take_lines())
        if self._stopping_for_restart is not None and self._stopping_for_restart.returncode is not None:
            self._stopping_for_restart = None
            self.Start()
        process = self._process
        if process is None:
            return
        if process.returncode is not None:  # it ended by itself: it crashed, or could not start
            self._ended = process.describe()
            self._process = None
            self._close_link()
            self._fail(f"the engine stopped ({self._ended}). See the log (Open Log), fix it and press Start")
        elif self._link is None and process.address is not None:
            self._open_link(process.address)

    def _take_link_notes(self):
        if self._link is not None:
            for note in self._link.take_notes():
                self._say(note)

    # -- parameters ------------------------------------------------------------------------------
    def _read_prompt_list(self):
        """Queue the Weighted Prompts when the table's rows changed (it is read every frame:
        no parameter changes when a cell does)."""
        try:
            rows = params.prompt_list(self.ownerComp.par.Promptlist.eval())
        except ValueError as error:
            if str(error) != self._prompt_problem:
                self._prompt_problem = str(error)
                self._say(f"{error}; the prompts sent before stay")
            return
        self._prompt_problem = None
        if rows != self._prompt_rows:
            self._prompt_rows = rows
            self._pending["prompts"] = params.prompts_json(rows)
            self._last_change = time.monotonic()

    def _send_changes(self):
        if not self._pending or time.monotonic() - self._last_change < DEBOUNCE_S:
            return
        if self._link is not None:
            self._link.update_params(dict(self._pending))
        self._pending.clear()  # without a link, the next Start reads every value afresh

    def _apply_output_size(self):
        par = self.ownerComp.par
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
        if self._link is not None:
            status = self._link.status()
            state, message = status.state, status.message
        elif self._stopping_for_restart is not None:
            state, message = "restarting", "restarting the engine; the last frame stays meanwhile"
        elif self._process is not None:
            state, message = "starting engine", "the engine is starting"
        else:
            state, message = "stopped", "press Start to stream the input through the engine"
        notice, said_at = self._notice
        if time.monotonic() - said_at < NOTICE_S and state not in ("error", "disconnected"):
            message = notice  # e.g. that a change restarts the stream
        return state, message

    def _show_status(self):
        par = self.ownerComp.par
        state, message = self._state()
        status = self._link.status() if self._link is not None else None
        shown = {
            "Enginestate": state,
            "Message": message,
            "Outputfps": round(status.output_fps, 1) if status else 0.0,
            "Latency": round(status.latency_ms, 1) if status else 0.0,
            "Droppedframes": status.dropped_frames if status else 0,
            "Firstframe": round(status.first_frame_ms or 0.0, 1) if status else 0.0,
            "Scheduler": status.scheduler if status else "",
            "Processstate": self._process_state(),
        }
        for name, value in shown.items():
            if par[name].eval() != value:  # unchanged values are not set again
                par[name].val = value

    def _process_state(self):
        process = self._process or self._stopping_for_restart
        if process is not None:
            return process.describe()
        if self._link is not None:
            return f"attached to the engine at {self._link.address}"
        return self._ended or "stopped"

    def _fail(self, message):
        self._error = message
        self._say(message)

    def _say(self, line):
        self._notice = (line, time.monotonic())
        self._log_lines([f"[component] {line}"])

    def _log_lines(self, lines):
        if lines:
            self._log.extend(lines)
            self.ownerComp.op("engine_log").text = "\n".join(self._log)
