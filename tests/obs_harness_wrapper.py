"""What the real OBS loads in tests/test_obs_integration.py: obs_scripts/streamdiffusion.py, observed.

The test cannot look inside OBS, so OBS loads this script instead of the real one. It
hands every OBS entry point to the real script unchanged, and besides:

- creates the input source the test asks for: an image source showing the test's
  PNG pattern, in the current scene (settings test_input_name, test_pattern);
- watches the frames the script captures (its background client's offer) and pushes
  into its output source (the on_output callback the client was given), keeping a
  digest of each;
- reads the output source back as OBS renders it, with the script's own SourceReader;
- builds the script's properties once, as the Scripts dialog would, presses Refresh, and
  notes what the real OBS made of them;
- every REPORT_EVERY_MS writes all of it, with the script's status snapshot and OBS's
  frame counters, as JSON to the file named by the setting test_report (replaced
  atomically, so the test never reads half a report).

A digest is the mean RGB of each quarter of a frame (top left, top right, bottom left,
bottom right), with the frame's size: enough to tell frames apart and to see that the
pattern arrives the right way up.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

import obspython as obs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "obs_scripts"))

import streamdiffusion as script  # noqa: E402 - the script under test, from obs_scripts/
from streamdiffusion import script_defaults, script_description, script_properties  # noqa: E402,F401

REPORT_EVERY_MS = 200
KEEP = 40  # digests kept of each kind

_test = {"ticks": 0, "captured": [], "pushed": [], "read_back": [], "input": None, "reader": None,
         "watching": False, "tick_gaps_ms": [], "last_tick": None}
_report_lock = threading.Lock()  # the timer (graphics thread) and unload (UI thread) both write the report
# Held by the timer around its read-back, and by unload around everything that enters the graphics context
# (the script's unload and freeing the reader), as the script's pipeline does with its own lock: unload must
# never wait for the graphics context while a timer holds it and waits for Python's lock (obspython's
# obs_enter_graphics keeps that lock while it waits).
_graphics_lock = threading.Lock()


def digest(rgba) -> dict:
    height, width = rgba.shape[:2]
    quarters = [rgba[:height // 2, :width // 2], rgba[:height // 2, width // 2:],
                rgba[height // 2:, :width // 2], rgba[height // 2:, width // 2:]]
    return {"t": time.monotonic(), "size": [width, height],
            "quarters": [[round(float(v), 1) for v in q[..., :3].reshape(-1, 3).mean(0)] for q in quarters]}


def _keep(kind: str, entry: dict) -> None:
    entries = _test[kind]
    entries.append(entry)
    del entries[:-KEEP]


def script_load(settings):
    obs.timer_add(_test_tick, REPORT_EVERY_MS)  # first, and never removed, as the script does with its own
    _test["name"] = obs.obs_data_get_string(settings, "test_input_name")
    _test["pattern"] = obs.obs_data_get_string(settings, "test_pattern")
    _test["report"] = obs.obs_data_get_string(settings, "test_report")
    script.script_load(settings)


def script_update(settings):
    script.script_update(settings)


def script_unload():
    _test["unloading"] = True
    _write_report(unloaded=False)  # the script's last status, before unload takes it away
    with _graphics_lock:  # from here on this script's timer stays out of the graphics context
        script.script_unload()
        if _test["reader"] is not None:
            obs.obs_enter_graphics()
            _test["reader"].destroy()
            obs.obs_leave_graphics()
    if _test["input"] is not None:
        obs.obs_source_release(_test["input"])
    _write_report(unloaded=True)


def _test_tick():
    if _test.get("unloading"):
        return  # a tick already under way when unload began
    now = time.monotonic()
    if _test["last_tick"] is not None:
        _test["tick_gaps_ms"] = (_test["tick_gaps_ms"] + [1000 * (now - _test["last_tick"])])[-200:]
    _test["last_tick"] = now
    _test["ticks"] += 1
    _make_input_source()
    _watch_pipeline()
    _read_back_output()
    if "properties" not in _test and _test["ticks"] >= 10:  # two seconds in: the output source is there
        _test["properties"] = _inspect_properties()
    _write_report(unloaded=False)


def _make_input_source():
    if _test["input"] is not None:
        return
    scene_source = obs.obs_frontend_get_current_scene()
    if scene_source is None:
        return
    settings = obs.obs_data_create()
    obs.obs_data_set_string(settings, "file", _test["pattern"])
    _test["input"] = obs.obs_source_create("image_source", _test["name"], settings, None)
    obs.obs_data_release(settings)
    obs.obs_scene_add(obs.obs_scene_from_source(scene_source), _test["input"])
    obs.obs_source_release(scene_source)


def _watch_pipeline():
    """Wrap the client's offer, and the on_output callback it was given, once the script's pipeline exists."""
    pipeline = script._script.pipeline if script._script is not None else None
    if pipeline is None or _test["watching"]:
        return
    client = pipeline._client
    offer, show = client.offer, client._on_output

    def watched_offer(pixels, t_capture_ns):
        _keep("captured", digest(pixels))
        offer(pixels, t_capture_ns)

    def watched_show(rgba):
        show(rgba)
        _keep("pushed", digest(rgba))

    client.offer, client._on_output = watched_offer, watched_show
    _test["watching"] = True


def _inspect_properties() -> dict:
    """The script's properties as the real OBS holds them: each one's label, a list's items
    (value, disabled), a status row's text; and what pressing Refresh returns."""
    props = script.script_properties()
    try:
        found = {}
        for name in ("address", "environment", "model", "start_engine", "stop_engine", "input_source", "prompt",
                     "strength", "steps", "seed", "target_fps", "latency_ms", "width", "height", "transport", "refresh",
                     "status_engine"):
            prop = obs.obs_properties_get(props, name)
            if prop is None:
                continue
            items = [[obs.obs_property_list_item_string(prop, i), obs.obs_property_list_item_disabled(prop, i)]
                     for i in range(obs.obs_property_list_item_count(prop))]
            found[name] = {"label": obs.obs_property_description(prop),
                           "text": obs.obs_property_long_description(prop), "items": items}
        refreshed = obs.obs_property_button_clicked(obs.obs_properties_get(props, "refresh"), None)
        return {"found": found, "refresh_returned": refreshed}
    finally:
        obs.obs_properties_destroy(props)


def _read_back_output():
    from streamdiffusion_obs import frames
    from streamdiffusion_obs.settings import OUTPUT_SOURCE_NAME

    pipeline = script._script.pipeline if script._script is not None else None
    if pipeline is None:
        return
    output = obs.obs_get_source_by_name(OUTPUT_SOURCE_NAME)
    if output is None:
        return
    width, height = obs.obs_source_get_width(output), obs.obs_source_get_height(output)
    if not _graphics_lock.acquire(blocking=False):
        obs.obs_source_release(output)
        return
    obs.obs_enter_graphics()
    try:
        reader = _test["reader"]
        if width and height and (reader is None or (reader.width, reader.height) != (width, height)):
            if reader is not None:
                reader.destroy()
            reader = _test["reader"] = frames.SourceReader(pipeline._libobs, width, height)
        frame = reader.read(output) if reader is not None else None
    finally:
        obs.obs_leave_graphics()
        _graphics_lock.release()
        obs.obs_source_release(output)
    if frame is not None:
        _keep("read_back", digest(frame.pixels) | {"source_size": [width, height]})


def _write_report(unloaded: bool):
    """The report; after unload, the status and snapshot are the last ones written before it."""
    with _report_lock:
        pipeline = script._script.pipeline if script._script is not None else None
        report = _test.setdefault("report_so_far", {"status": None, "snapshot": None})
        if script._script is not None:
            report["status"] = script._script.status_rows()
        if pipeline is not None:
            report["snapshot"] = pipeline.snapshot()
        report.update({
            "unloaded": unloaded,
            "ticks": _test["ticks"],
            "captured": _test["captured"],
            "pushed": _test["pushed"],
            "read_back": _test["read_back"],
            "test_tick_gaps_ms": _test["tick_gaps_ms"],
            "properties": _test.get("properties"),
            "now": time.monotonic(),
        })
        path = _test["report"]
        with open(path + ".tmp", "w") as file:
            json.dump(report, file)
        os.replace(path + ".tmp", path)
