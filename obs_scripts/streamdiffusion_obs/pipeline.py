"""The running part of the script: capture timer, engine session, output source, Spout wiring.

Three threads take part:

    OBS's graphics thread   tick(), the script's timer, once a video frame: at the target
                            frame rate it renders the input source and reads it back
                            (frames.SourceReader) and offers the frame to the client; it
                            creates the output source once OBS has a scene.
    the client's thread     bridge.background.BackgroundClient: sends frames, and pushes each
                            stylised frame into the output source the moment it arrives
                            (frames.OutputFeeder).
    OBS's UI thread         reconfigure() on script_update, status_rows(), close() on unload.

`_lock` guards the OBS objects tick() uses (input source, reader, output source). The UI
thread takes it to swap or release them; tick() skips its turn when it cannot have it at
once, so OBS's render loop never waits for the UI.

The lock also keeps the two threads from deadlocking over the graphics context:
obspython's obs_enter_graphics keeps Python's lock (the GIL) while it waits for the
context, so a UI thread entering it while tick() is inside, waiting for the GIL, would
wait forever. tick() holds `_lock` for as long as it is inside the context, and the UI
thread enters the context only once it holds `_lock`; waiting for `_lock` lets go of the GIL.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict
from typing import Any

import obspython as obs

from bridge import client as bridge_client
from bridge.background import RATE_WINDOW_S, BackgroundClient, SessionConfig

from . import spout
from .frames import OutputFeeder, SourceReader
from .libobs import LibObs
from .settings import OUTPUT_SOURCE_NAME, SPOUT_OUTPUT_SOURCE_NAME, ScriptSettings

OUTPUT_SOURCE_KIND = "ffmpeg_source"  # an async video source on every OS
LOOKUP_EVERY_S = 0.5  # how often a source that is not there yet is looked for
TIMER_WINDOW = 300  # the tick durations the status summarises


class DurationStats:
    """The durations of the last `window` calls of a callback: median, 95th percentile, worst."""

    def __init__(self, window: int = TIMER_WINDOW):
        self._seconds: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()  # added to on the graphics thread, read on the UI thread

    def add(self, seconds: float) -> None:
        with self._lock:
            self._seconds.append(seconds)

    def summary_ms(self) -> dict[str, float] | None:
        with self._lock:
            ordered = sorted(self._seconds)
        if not ordered:
            return None
        return {
            "calls": len(ordered),
            "median": 1000 * ordered[len(ordered) // 2],
            "p95": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "max": 1000 * ordered[-1],
        }


class Pipeline:
    def __init__(self, settings: ScriptSettings, libobs: LibObs):
        self.settings = settings
        self._libobs = libobs
        self._lock = threading.Lock()
        self._feeder = OutputFeeder(libobs)
        self.tick_seconds = DurationStats()
        self._reader: SourceReader | None = None
        self._input: Any = None  # our reference to the input source, once found
        self._next_input_lookup = 0.0
        self._output: Any = None  # our reference to the output source, once made or found
        self._next_output_attempt = 0.0
        self._output_problem = ""
        self._next_capture = 0.0  # time.monotonic() from which the next frame is due
        self._closed = False
        self._spout_filter: spout.SpoutFilter | None = None
        self.spout_unavailable = spout.unavailable_reason(bridge_client.TRANSPORTS)  # None where Spout works
        self.spout_note = ""
        self._use_spout = self._choose_spout(settings)
        self._client = BackgroundClient(self._session_config(settings), settings.params,
                                        on_output=self._feeder.show).start()

    # -- UI thread ---------------------------------------------------------------------------
    def reconfigure(self, settings: ScriptSettings) -> None:
        """Apply new settings. Nothing here waits: the client applies engine-side changes on its thread."""
        before, self.settings = self.settings, settings
        use_spout = self._choose_spout(settings)
        if use_spout != self._use_spout or settings.input_source != before.input_source:
            with self._lock:
                if use_spout != self._use_spout:  # the output comes from another kind of source now
                    self._release_output()
                    self._use_spout = use_spout
                self._release_input()
                self._next_input_lookup = 0.0
        self._client.configure(self._session_config(settings))
        self._client.set(**settings.changed_params(before))

    def snapshot(self) -> dict[str, Any]:
        """Everything the status shows, as plain values."""
        return {
            "engine": asdict(self._client.status()),
            "spout": self._use_spout,
            "spout_note": self.spout_note,
            "tick_ms": self.tick_seconds.summary_ms(),
            "capture_interval_ms": round(1000 / self.settings.params["target_fps"]),
            "obs_frames": obs.obs_get_total_frames(),
            "obs_lagged_frames": obs.obs_get_lagged_frames(),  # frames OBS rendered late, whoever's fault
            "frames_shown": self._feeder.frames_shown,
            "output_size": self._feeder.last_size,
            "output_problem": self._output_problem,
            "input_found": self._input is not None,
        }

    def status_rows(self) -> dict[str, str]:
        """The status as the script's properties show it: label -> text. Each figure is what the
        host sees now; counts "in all" are over the script's whole run."""
        values = self.snapshot()
        engine, tick = values["engine"], values["tick_ms"]
        config, dropped = engine["config"], engine["dropped"]
        if engine["latency_ms"] is not None:
            frames_now = f"{engine['output_fps']:.1f} frames/s"
            latency = f"{engine['latency_ms']:.0f} ms glass to glass"
        else:
            frames_now = "none coming now"
            latency = f"no frames in the last {RATE_WINDOW_S:g} s" if engine["frames_shown"] else "no frames yet"
        if engine["first_frame_ms"] is not None:
            latency += f"; the session's first frame came {engine['first_frame_ms']:.0f} ms after it was sent"
        if tick is None:
            timer = "not run yet"
        else:
            timer = (f"{tick['median']:.1f} ms median, {tick['p95']:.1f} ms p95, {tick['max']:.1f} ms worst "
                     f"of the last {tick['calls']} captures (one every {values['capture_interval_ms']} ms); "
                     f"OBS rendered {values['obs_lagged_frames']} of {values['obs_frames']} frames late")
        if values["output_problem"]:
            output = values["output_problem"]
        elif values["output_size"] is None:
            output = "no frame shown yet"
        else:
            width, height = values["output_size"]
            output = f"{values['frames_shown']} frames shown, the last {width}x{height}"
        input_text = self.settings.input_source or "none picked"
        if self.settings.input_source and not values["input_found"]:
            input_text += " (not found)"
        state = f"{engine['state']} at {config['address']} ({config['transport']})"
        return {
            "Engine": f"{state}: {engine['message']}" if engine["message"] else state,
            "Model": engine["model"] or "known once a session opens",
            "Frames": f"{frames_now}; {engine['frames_sent']} sent, {engine['frames_shown']} shown in all",
            "Latency": latency,
            "Dropped": (f"{sum(dropped.values())} in all: {dropped['replaced']} replaced by newer ones before "
                        f"sending, {dropped['not_sent']} not sent (no session, or another size), "
                        f"{dropped['by_engine']} by the engine, {dropped['outputs_skipped']} stylised ones skipped"),
            "Scheduler": engine["scheduler"] or "no session",
            "Error": engine["error"] or "none",
            "Notice": engine["notice"] or "none",
            "Input": input_text,
            "Output": output,
            "Capture timer": timer,
            "Spout": values["spout_note"],
        }

    def close(self) -> None:
        """Close the session and release every OBS object the pipeline holds."""
        self._client.close()
        with self._lock:
            self._closed = True
            self._release_output()
            self._release_input()
            if self._reader is not None:
                obs.obs_enter_graphics()
                self._reader.destroy()
                obs.obs_leave_graphics()
                self._reader = None

    # -- graphics thread -----------------------------------------------------------------------
    def tick(self) -> None:
        started = time.perf_counter()
        if not self._lock.acquire(blocking=False):
            return  # the UI thread is swapping sources; this frame is skipped
        try:
            if self._closed:
                return
            self._ensure_output_source()
            source = self._input_source()
            if source is None:
                return
            if self._use_spout:
                self._ensure_spout_filter(source)
            elif self._capture_due():
                self._capture(source)
                self.tick_seconds.add(time.perf_counter() - started)
        finally:
            self._lock.release()

    def _capture_due(self) -> bool:
        """Whether a frame is due at the target frame rate. OBS's frames come with some jitter,
        so a frame up to a quarter interval early still counts."""
        interval = 1 / self.settings.params["target_fps"]
        now = time.monotonic()
        if now < self._next_capture - interval / 4:
            return False
        # Keep the cadence; after a stall, start it again from now.
        self._next_capture = self._next_capture + interval if self._next_capture + interval > now else now + interval
        return True

    def _capture(self, source: Any) -> None:
        width, height = self.settings.width, self.settings.height
        obs.obs_enter_graphics()
        try:
            if self._reader is not None and (self._reader.width, self._reader.height) != (width, height):
                self._reader.destroy()
                self._reader = None
            if self._reader is None:
                self._reader = SourceReader(self._libobs, width, height)
            frame = self._reader.read(source)
        finally:
            obs.obs_leave_graphics()
        if frame is not None:
            self._client.offer(frame.pixels, frame.t_capture_ns)

    def _input_source(self) -> Any:
        """The input source, looked up by name while it is not there; None until it is."""
        if self._input is not None and obs.obs_source_removed(self._input):  # deleted in OBS
            self._release_input()
        name = self.settings.input_source
        now = time.monotonic()
        if self._input is None and name and now >= self._next_input_lookup:
            self._next_input_lookup = now + LOOKUP_EVERY_S
            self._input = obs.obs_get_source_by_name(name)
            if self._input is not None:
                obs.obs_source_inc_showing(self._input)  # keeps a camera running even where no scene shows it
        return self._input

    def _ensure_output_source(self) -> None:
        """Adopt the output source, or create it in the current scene (there is none while OBS starts)."""
        if self._output is not None and obs.obs_source_removed(self._output):  # deleted in OBS: make it again
            self._release_output()
        now = time.monotonic()
        if self._output is not None or now < self._next_output_attempt:
            return
        self._next_output_attempt = now + LOOKUP_EVERY_S
        kind, name = (spout.CAPTURE_ID, SPOUT_OUTPUT_SOURCE_NAME) if self._use_spout else (
            OUTPUT_SOURCE_KIND, OUTPUT_SOURCE_NAME)
        source = obs.obs_get_source_by_name(name)
        if source is not None and obs.obs_source_get_unversioned_id(source) != kind:
            obs.obs_source_release(source)
            self._output_problem = f"a source named {name!r} of another kind is in the way: rename or delete it"
            return
        if source is None:
            source = self._create_in_current_scene(kind, name)
            if source is None:
                return
        self._output_problem = ""
        if not self._use_spout:
            obs.obs_source_set_async_unbuffered(source, True)  # show the newest frame at once, never queue
            self._feeder.attach(source)
        self._output = source

    def _create_in_current_scene(self, kind: str, name: str) -> Any:
        scene_source = obs.obs_frontend_get_current_scene()
        if scene_source is None:
            return None
        settings = spout.capture_settings() if kind == spout.CAPTURE_ID else None
        source = obs.obs_source_create(kind, name, settings, None)
        if settings is not None:
            obs.obs_data_release(settings)
        obs.obs_scene_add(obs.obs_scene_from_source(scene_source), source)
        obs.obs_source_release(scene_source)
        return source

    def _ensure_spout_filter(self, source: Any) -> None:
        if self._spout_filter is None:
            self._spout_filter = spout.SpoutFilter(source)

    # -- either thread, holding _lock -------------------------------------------------------------
    def _release_input(self) -> None:
        self._remove_spout_filter()
        if self._input is not None:
            obs.obs_source_dec_showing(self._input)
            obs.obs_source_release(self._input)
            self._input = None

    def _release_output(self) -> None:
        self._feeder.attach(None)
        if self._output is not None:
            obs.obs_source_release(self._output)
            self._output = None

    def _remove_spout_filter(self) -> None:
        if self._spout_filter is not None:
            self._spout_filter.remove()
            self._spout_filter = None

    # -- set-up ---------------------------------------------------------------------------------------
    def _choose_spout(self, settings: ScriptSettings) -> bool:
        """Whether the Spout path is asked for and possible; says why not in spout_note."""
        reason = self.spout_unavailable
        if settings.transport != "spout":
            self.spout_note = "not used" if reason is None else f"unavailable: {reason}"
            return False
        if reason is not None:
            self.spout_note = f"unavailable: {reason}. Frames go through shared memory instead"
            return False
        self.spout_note = f"in use: OBS sends {spout.SENDER_FROM_OBS!r}, the engine {spout.SENDER_FROM_ENGINE!r}"
        return True

    def _session_config(self, settings: ScriptSettings) -> SessionConfig:
        if self._use_spout:
            transport, transport_params = "spout", tuple(spout.SESSION_PARAMS.items())
        else:  # Spout asked for but unavailable: shared memory, as spout_note says
            transport, transport_params = ("shm" if settings.transport == "spout" else settings.transport), ()
        # No model: the session takes whichever the engine serves (the status says which).
        return SessionConfig(settings.address, transport, width=settings.width, height=settings.height,
                             transport_params=transport_params)
