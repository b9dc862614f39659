"""The OBS script obs_scripts/streamdiffusion.py, run by a fake OBS (fake_obspython) against a fake engine.

Everything a user meets is here: the properties and their defaults, the frame path
from an input source through the engine into the output source, live and restarting
settings, the status when the engine is away or comes back, the Spout path and its
fallback, the local engine buttons, and an unload that leaves nothing behind. The
real OBS runs the same script in test_obs_integration.py.
"""

import logging
import os
import re
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fake_obspython as obs

sys.modules["obspython"] = obs  # before the script imports it
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "obs_scripts"))

import streamdiffusion  # noqa: E402 - the script, from obs_scripts/
from bridge import background, controls, launcher  # noqa: E402
from fake_engine_client import ENGINES, FakeEngine, FakeEngineClient  # noqa: E402
from streamdiffusion_obs import environment, libobs, spout  # noqa: E402
from streamdiffusion_obs.frames import cover_crop  # noqa: E402
from streamdiffusion_obs.settings import OUTPUT_SOURCE_NAME, SPOUT_OUTPUT_SOURCE_NAME  # noqa: E402

pytestmark = pytest.mark.timeout(30)
REAL_ACTIVATE = environment.activate  # the fixture below replaces it, for all but the test of it

ADDRESS = "tcp://127.0.0.1:5999"
FPS = 60  # the target frame rate of these tests, so that frames come quickly
QUARTER_COLOURS = [(230, 30, 30), (30, 200, 40), (40, 60, 220), (240, 220, 40)]  # TL, TR, BL, BR


def quarters_pattern(width: int, height: int) -> np.ndarray:
    pixels = np.empty((height, width, 4), np.uint8)
    for index, colour in enumerate(QUARTER_COLOURS):
        top, left = (index // 2) * height // 2, (index % 2) * width // 2
        pixels[top:top + height // 2, left:left + width // 2, :3] = colour
    pixels[..., 3] = 255
    return pixels


def quarter_means(pixels: np.ndarray) -> list[tuple]:
    height, width = pixels.shape[:2]
    parts = [pixels[:height // 2, :width // 2], pixels[:height // 2, width // 2:],
             pixels[height // 2:, :width // 2], pixels[height // 2:, width // 2:]]
    return [tuple(int(v) for v in part[..., :3].reshape(-1, 3).mean(0).round()) for part in parts]


@pytest.fixture(autouse=True)
def fake_obs(monkeypatch):
    obs.reset()
    ENGINES.clear()
    monkeypatch.setattr(background, "EngineClient", FakeEngineClient)
    monkeypatch.setattr(background, "DEBOUNCE_S", 0.05)
    monkeypatch.setattr(background, "RETRY_S", 0.02)
    monkeypatch.setattr(background, "STATS_EVERY_S", 0.02)
    monkeypatch.setattr(libobs, "load", obs.FakeLibObs)
    monkeypatch.setattr(environment, "activate", lambda env, repo_root: None)  # the tests' own sys.path stays
    yield
    if streamdiffusion._script is not None:
        obs.unload_script(streamdiffusion)
    ENGINES.clear()


def load(**values) -> obs.Data:
    """Load the script in OBS with these settings over the defaults."""
    settings = obs.settings({"address": ADDRESS, "target_fps": FPS, "model": "tiny"} | values)
    obs.load_script(streamdiffusion, settings)
    return settings


def run_frames(count: int) -> None:
    """Let OBS render `count` video frames at the tests' frame rate."""
    for _ in range(count):
        obs.tick()
        time.sleep(1 / FPS)


def run_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        run_frames(1)


def status(label: str) -> str:
    props = streamdiffusion.script_properties()
    return obs.obs_properties_get(props, streamdiffusion._status_key(label)).long_description


def output_source() -> obs.Source | None:
    return obs.source(OUTPUT_SOURCE_NAME)


@pytest.fixture
def scene_with_pattern():
    obs.make_current_scene()
    return obs.add_source("image_source", "Camera", quarters_pattern(640, 360))


# ------------------------------------------------------------------ properties and settings


def test_defaults_cover_every_setting(monkeypatch):
    monkeypatch.setenv(environment.ENVIRONMENT_VARIABLE, "/opt/sd-venv")
    settings = obs.settings()
    streamdiffusion.script_defaults(settings)
    session_params = {param.name for param in controls.host_params()}  # the table's (test_host_controls.py)
    assert {name: value for name, value in settings.defaults.items() if name not in session_params} == {
        "address": "tcp://127.0.0.1:5555", "environment": "/opt/sd-venv", "model": "wan2.1-1.3b",
        "input_source": "", "width": 512, "height": 512, "transport": "shm",
    }
    assert session_params < set(settings.defaults)


def test_without_the_variable_the_default_environment_is_the_repositorys_venv(monkeypatch, tmp_path):
    monkeypatch.delenv(environment.ENVIRONMENT_VARIABLE, raising=False)
    assert environment.default_folder(tmp_path) == ""
    (tmp_path / ".venv").mkdir()
    assert environment.default_folder(tmp_path) == str(tmp_path / ".venv")


def test_properties_offer_every_setting_and_say_what_a_change_restarts(scene_with_pattern):
    obs.add_source("wasapi_output_capture", "Desktop audio")
    load()
    run_frames(1)  # the output source appears
    props = streamdiffusion.script_properties().all()

    for name in ("address", "environment", "model", "input_source", "width", "height", "transport"):
        assert name in props, name
    for name in ("start_engine", "stop_engine", "refresh"):
        assert props[name].kind == "button"
    assert props["model"].item_values() == ["wan2.1-1.3b", "wan2.1-14b", "tiny"]
    for name in ("address", "width", "height", "transport"):
        assert props[name].description.endswith("(restarts the session)"), name
    assert props["steps"].description == "Steps (restarts the stream)"
    assert props["prompt"].description == "Prompt" and props["strength"].bounds == (0.1, 1.0, 0.01)
    # sources with video, not audio-only ones nor the script's own output
    assert props["input_source"].item_values() == ["", "Camera"]
    # Spout needs Windows: listed, but disabled
    spout_item = next(item for item in props["transport"].items if item[1] == "spout")
    assert spout_item[2] is True
    for label in streamdiffusion.STATUS_ROWS:
        row = props[streamdiffusion._status_key(label)]
        assert row.text_type == obs.OBS_TEXT_INFO and row.description == label and row.long_description


def test_properties_before_load_say_the_script_is_not_loaded():
    props = streamdiffusion.script_properties().all()
    assert props["status_engine"].long_description == "the script is not loaded"


# ---------------------------------------------------------------------------------- frame path


def test_frames_flow_from_the_input_source_through_the_engine_into_the_output_source(scene_with_pattern):
    engine = FakeEngine(ADDRESS)
    load(input_source="Camera")
    run_until(lambda: output_source() is not None and output_source().frames_pushed >= 3)

    # the engine gets the input at the output size, cropped to its shape, the right way up, RGBA
    sent = engine.frames_received[-1]
    assert sent.shape == (512, 512, 4)
    assert quarter_means(sent) == QUARTER_COLOURS
    # the output source is a Media Source in the current scene, unbuffered, showing the engine's frames
    output = output_source()
    assert output.kind == "ffmpeg_source" and output in obs.source("Scene").items and output.async_unbuffered
    assert output.pixels.shape == (512, 512, 4)
    assert quarter_means(output.pixels) == [tuple(255 - c for c in colour) for colour in QUARTER_COLOURS]
    assert obs.obs_source_get_width(output) == 512 and obs.obs_source_get_height(output) == 512

    assert status("Engine") == f"streaming at {ADDRESS} (shm)"
    assert "frames/s" in status("Frames") and "ms glass to glass" in status("Latency")
    assert ", 4 by the engine, " in status("Dropped")  # the engine's stale inputs and replaced outputs
    assert status("Scheduler") == "meeting targets, steps in turn, chunks of 4 frames, 410 ms predicted"
    assert status("Input") == "Camera"
    assert status("Output").endswith("frames shown, the last 512x512")
    assert " ms median, " in status("Capture timer") and "one every 17 ms" in status("Capture timer")
    assert status("Error") == "none" and status("Set-up") == "ok"


def test_the_read_back_is_one_frame_behind_so_it_never_waits_for_the_gpu(scene_with_pattern):
    engine = FakeEngine(ADDRESS)
    load(input_source="Camera")
    engine.wait_for(lambda e: e.sessions_opened == 1)
    run_frames(1)  # staged, not read yet
    time.sleep(0.05)
    assert engine.frames_received == []
    run_frames(1)  # read back: the frame staged a tick ago
    engine.wait_for(lambda e: e.frames_received)


def test_frames_come_at_the_target_frame_rate_not_at_obss(scene_with_pattern):
    FakeEngine(ADDRESS)
    load(input_source="Camera", target_fps=10)
    captures = streamdiffusion._script.pipeline.tick_seconds
    started = time.monotonic()
    run_frames(30)  # OBS at 60 frames/s
    elapsed = time.monotonic() - started
    assert abs(captures.summary_ms()["calls"] - 10 * elapsed) <= 2


def test_without_a_scene_the_output_source_waits_for_one():
    FakeEngine(ADDRESS)
    load()
    run_frames(3)
    assert output_source() is None
    obs.make_current_scene()
    run_until(lambda: output_source() is not None)
    assert output_source() in obs.source("Scene").items


def test_an_output_source_from_an_earlier_session_is_used_again():
    obs.make_current_scene()
    earlier = obs.add_source("ffmpeg_source", OUTPUT_SOURCE_NAME)
    FakeEngine(ADDRESS)
    load()
    run_frames(3)
    assert output_source() is earlier and earlier.async_unbuffered


def test_a_source_of_another_kind_in_the_way_of_the_output_is_reported():
    obs.make_current_scene()
    obs.add_source("color_source_v3", OUTPUT_SOURCE_NAME)
    load()
    run_frames(3)
    assert status("Output") == ("a source named 'StreamDiffusion output' of another kind is in the way: "
                                "rename or delete it")


def test_an_output_source_the_user_deleted_is_made_again(scene_with_pattern):
    FakeEngine(ADDRESS)
    load(input_source="Camera")
    run_until(lambda: output_source() is not None)
    first = output_source()
    obs.remove_source(OUTPUT_SOURCE_NAME)
    run_until(lambda: output_source() is not None)
    assert output_source() is not first and first.script_refs == 0
    run_until(lambda: output_source().frames_pushed > 0)


def test_a_missing_or_deleted_input_source_is_reported_and_released(scene_with_pattern):
    FakeEngine(ADDRESS)
    load(input_source="Webcam")
    run_frames(3)
    assert status("Input") == "Webcam (not found)"

    obs.add_source("image_source", "Webcam", quarters_pattern(64, 64))
    run_until(lambda: obs.source("Webcam").showing == 1)  # found, and kept showing while the script reads it
    webcam = obs.source("Webcam")
    obs.remove_source("Webcam")
    run_frames(2)
    assert webcam.script_refs == 0 and webcam.showing == 0
    assert status("Input") == "Webcam (not found)"


def test_picking_another_input_source_releases_the_first(scene_with_pattern):
    engine = FakeEngine(ADDRESS)
    other = obs.add_source("color_source_v3", "Colour", np.full((100, 100, 4), 200, np.uint8))
    settings = load(input_source="Camera")
    run_until(lambda: scene_with_pattern.showing == 1)
    obs.update_script(streamdiffusion, settings, input_source="Colour")
    assert scene_with_pattern.script_refs == 0 and scene_with_pattern.showing == 0
    run_until(lambda: engine.frames_received and (engine.frames_received[-1][..., :3] == 200).all())
    assert other.showing == 1


# ------------------------------------------------------------------------- changing settings


def test_live_parameters_are_sent_once_typing_stops(scene_with_pattern):
    engine = FakeEngine(ADDRESS)
    settings = load(input_source="Camera")
    run_until(lambda: engine.frames_received)
    for prompt in ("a", "a f", "a fox"):
        obs.update_script(streamdiffusion, settings, prompt=prompt)
    obs.update_script(streamdiffusion, settings, strength=0.4, seed=7)
    run_until(lambda: engine.params_received)
    run_frames(6)
    assert engine.params_received == [{"prompt": "a fox", "strength": 0.4, "seed": 7}]
    assert engine.sessions_opened == 1


def test_steps_restart_the_stream_and_the_status_says_so(scene_with_pattern):
    engine = FakeEngine(ADDRESS)
    settings = load(input_source="Camera")
    run_until(lambda: engine.frames_received)
    obs.update_script(streamdiffusion, settings, steps=3)
    run_until(lambda: status("Notice") != "none")
    assert status("Notice") == "Steps changed: the stream restarts (the last frame stays meanwhile)"
    assert engine.params_received == [{"steps": 3}]


def test_a_new_output_size_opens_a_new_session_of_that_size(scene_with_pattern):
    engine = FakeEngine(ADDRESS)
    settings = load(input_source="Camera")
    run_until(lambda: output_source() is not None and output_source().frames_pushed > 0)
    obs.update_script(streamdiffusion, settings, width=320, height=240)
    run_until(lambda: engine.sessions_opened == 2 and output_source().pixels.shape == (240, 320, 4))
    assert engine.hellos[-1]["width"] == 320 and engine.hellos[-1]["height"] == 240
    assert engine.frames_received[-1].shape == (240, 320, 4)
    assert quarter_means(engine.frames_received[-1]) == QUARTER_COLOURS


def test_another_address_opens_a_new_session_whose_engine_serves_its_own_model(scene_with_pattern):
    first, second = FakeEngine(ADDRESS), FakeEngine("tcp://127.0.0.1:6001", model="wan2.1-14b")
    settings = load(input_source="Camera")
    run_until(lambda: first.frames_received)
    assert status("Model") == "tiny"
    obs.update_script(streamdiffusion, settings, address=" tcp://127.0.0.1:6001 ")
    run_until(lambda: second.frames_received)
    assert second.hellos[0]["model"] == "default"  # whichever it serves
    assert status("Engine").startswith("streaming at tcp://127.0.0.1:6001") and status("Model") == "wan2.1-14b"
    obs.update_script(streamdiffusion, settings, model="wan2.1-1.3b")  # the model a local engine would start with
    run_frames(6)
    assert second.sessions_opened == 1


# ------------------------------------------------------------------------ engine comes and goes


def test_no_engine_is_reported_and_the_script_streams_once_one_starts(scene_with_pattern):
    load(input_source="Camera")
    run_until(lambda: status("Engine").startswith("unreachable") and output_source() is not None)
    assert status("Engine") == (f"unreachable at {ADDRESS} (shm): no engine answers at {ADDRESS}: start one there, "
                                "or check the address")
    assert status("Error") == "none"  # an expected state, not a fault
    assert status("Frames") == "none coming now; 0 sent, 0 shown in all" and status("Latency") == "no frames yet"
    assert output_source().frames_pushed == 0

    engine = FakeEngine(ADDRESS)
    run_until(lambda: output_source().frames_pushed > 0)
    assert engine.sessions_opened == 1 and status("Engine").startswith("streaming")


def test_an_engine_killed_mid_run_is_reported_obs_keeps_rendering_and_the_stream_resumes(scene_with_pattern):
    engine = FakeEngine(ADDRESS)
    load(input_source="Camera")
    run_until(lambda: output_source() is not None and output_source().frames_pushed > 0)

    engine.kill()
    run_until(lambda: status("Engine").startswith("disconnected"))
    assert "stopped answering" in status("Engine") and status("Error") == "none"
    # capturing goes on while the engine is away; the frames are dropped, and counted
    run_until(lambda: int(re.search(r"(\d+) not sent", status("Dropped")).group(1)) > 0)
    # what OBS sees now: no frames coming, rather than the last rate beside "no frames yet"
    run_until(lambda: status("Frames").startswith("none coming now; "))
    assert status("Latency").startswith(f"no frames in the last {background.RATE_WINDOW_S:g} s")
    shown_while_away = output_source().frames_pushed

    engine.start()
    run_until(lambda: output_source().frames_pushed > shown_while_away + 2)
    assert status("Engine").startswith("streaming") and engine.sessions_opened == 2
    assert [message for level, message in obs.log_records() if level <= obs.LOG_WARNING] == []  # all quiet


def test_the_refresh_button_updates_the_status_and_the_source_list(scene_with_pattern):
    load()
    props = streamdiffusion.script_properties()
    FakeEngine(ADDRESS)
    obs.add_source("image_source", "New camera", quarters_pattern(32, 32))
    run_until(lambda: streamdiffusion._script.status_rows()["Engine"].startswith("ready"))

    assert obs.click(props, "refresh") is True  # the properties view redraws
    assert obs.obs_properties_get(props, "status_engine").long_description.startswith("ready")
    assert obs.obs_properties_get(props, "input_source").item_values() == ["", "Camera", "New camera"]


def test_the_bridges_log_reaches_obss_script_log_at_its_level(scene_with_pattern):
    load()
    logging.getLogger("bridge.client").info("the engine at X stopped answering")
    logging.getLogger("bridge.background").warning("the engine refused strength")
    run_frames(1)
    # OBS opens its Script Log window on a warning: an expected state must not bring it up.
    assert (obs.LOG_INFO, "the engine at X stopped answering") in obs.log_records()
    assert (obs.LOG_WARNING, "the engine refused strength") in obs.log_records()


# ---------------------------------------------------------------------------------- Spout


def test_spout_asked_for_off_windows_falls_back_to_shared_memory(scene_with_pattern):
    engine = FakeEngine(ADDRESS)
    load(input_source="Camera", transport="spout")
    run_until(lambda: output_source() is not None and output_source().frames_pushed > 0)
    assert engine.hellos[0]["transport"] == "shm"
    assert status("Spout") == ("unavailable: Spout shares DirectX textures and needs Windows. "
                               "Frames go through shared memory instead")


def test_spout_without_the_plugin_says_to_install_it(scene_with_pattern, monkeypatch):
    monkeypatch.setattr(spout, "PLATFORM", "win32")
    FakeEngine(ADDRESS)
    load(input_source="Camera", transport="spout")
    assert "the Spout2 plugin for OBS is not installed (no source type win_spout_filter or spout_capture)" in \
        status("Spout")
    run_until(lambda: output_source() is not None and output_source().frames_pushed > 0)


def test_the_spout_path_wires_the_plugins_filter_and_capture_source(scene_with_pattern, monkeypatch):
    monkeypatch.setattr(spout, "PLATFORM", "win32")
    obs.register_type(spout.FILTER_ID, "Spout Filter")
    obs.register_type(spout.CAPTURE_ID, "Spout2 Capture")
    engine = FakeEngine(ADDRESS)
    load(input_source="Camera", transport="spout")
    run_until(lambda: scene_with_pattern.filters and obs.source(SPOUT_OUTPUT_SOURCE_NAME) is not None)

    spout_filter = scene_with_pattern.filters[0]
    assert spout_filter.kind == "win_spout_filter"
    assert spout_filter.settings == {"spout_filter_name": spout.SENDER_FROM_OBS}
    capture = obs.source(SPOUT_OUTPUT_SOURCE_NAME)
    assert capture.kind == "spout_capture" and capture.settings == {"spoutsenders": spout.SENDER_FROM_ENGINE}
    assert capture in obs.source("Scene").items
    engine.wait_for(lambda e: e.hellos)
    assert engine.hellos[0]["transport"] == "spout"
    assert engine.hellos[0]["params"] | spout.SESSION_PARAMS == engine.hellos[0]["params"]
    run_frames(5)
    assert engine.frames_received == [] and output_source() is None  # no read-back: frames stay on the GPU
    assert status("Spout").startswith("in use")

    obs.unload_script(streamdiffusion)
    assert scene_with_pattern.filters == [] and obs.leaks() == []


# ----------------------------------------------------------------------- set-up and unload


def test_unload_releases_everything_and_closes_the_session(scene_with_pattern):
    engine = FakeEngine(ADDRESS)
    load(input_source="Camera")
    run_until(lambda: output_source() is not None and output_source().frames_pushed > 0)
    obs.unload_script(streamdiffusion)
    assert obs.leaks() == []
    assert engine.sessions_closed == 1
    assert streamdiffusion._script is None
    assert output_source() in obs.source("Scene").items  # the user's scene keeps it
    frames_before = output_source().frames_pushed
    time.sleep(0.05)
    assert output_source().frames_pushed == frames_before  # nothing feeds it any more


def test_a_missing_environment_is_explained(scene_with_pattern, tmp_path):
    load(environment=str(tmp_path / "nowhere"))
    assert f"the Python environment {tmp_path / 'nowhere'} does not exist" in status("Set-up")
    props = streamdiffusion.script_properties()
    obs.click(props, "start_engine")
    assert status("Local engine").startswith("cannot start one: the Python environment")


def test_missing_packages_say_what_to_do_and_obs_carries_on(scene_with_pattern, monkeypatch):
    monkeypatch.setitem(sys.modules, "streamdiffusion_obs.pipeline", None)  # its import fails
    load(input_source="Camera")
    run_frames(3)
    assert status("Set-up").startswith("cannot import streamdiffusion_obs.pipeline: set the Python environment")
    assert status("Engine") == "not connected: the script cannot run (see Set-up)"
    obs.unload_script(streamdiffusion)
    assert obs.leaks() == []


@pytest.fixture
def fake_venv(tmp_path):
    """A venv whose python only records how it was started, then waits to be stopped."""
    venv = tmp_path / "venv"
    (venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.parent.mkdir()
    python.write_text(f'#!/bin/sh\necho "$PWD $@" > {tmp_path / "started"}\nexec sleep 30\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return venv


@pytest.mark.skipif(os.name != "posix", reason="the fake interpreter is a shell script")
def test_the_local_engine_buttons_start_and_stop_python_m_engine_serve(scene_with_pattern, fake_venv, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(launcher, "log_folder", lambda: tmp_path / "logs")
    load(environment=str(fake_venv), model="tiny")
    props = streamdiffusion.script_properties()
    assert obs.click(props, "start_engine") is True
    deadline = time.monotonic() + 5
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    log = tmp_path / "logs" / "obs-engine.log"
    assert (tmp_path / "started").read_text().split() == [
        str(REPO), "-m", "engine", "serve", "--model", "tiny", "--bind", ADDRESS, "--ready-file",
        str(log.with_suffix(".address")), "--parent-pid", str(os.getpid())]
    assert status("Local engine").startswith("starting (pid ") and status("Local engine").endswith(f"its log: {log}")

    obs.click(props, "stop_engine")  # returns at once; the launcher stops it on its thread
    run_until(lambda: status("Local engine").startswith("stopped (killed by signal 15)"))


@pytest.mark.skipif(os.name != "posix", reason="the fake interpreter is a shell script")
def test_unload_stops_the_local_engine(scene_with_pattern, fake_venv, tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "log_folder", lambda: tmp_path / "logs")
    load(environment=str(fake_venv))
    obs.click(streamdiffusion.script_properties(), "start_engine")
    local_engine = streamdiffusion._script.local_engine
    assert local_engine.returncode is None
    obs.unload_script(streamdiffusion)
    assert local_engine.returncode is not None


# ------------------------------------------------------------------------------ parts


def test_cover_crop_fills_the_output_without_stretching():
    assert cover_crop(640, 360, 512, 512) == (140.0, 0.0, 500.0, 360.0)  # sides cut
    assert cover_crop(360, 640, 512, 512) == (0.0, 140.0, 360.0, 500.0)  # top and bottom cut
    assert cover_crop(1280, 720, 640, 360) == (0.0, 0.0, 1280.0, 720.0)  # same shape: all of it


def test_an_environment_is_found_checked_against_obss_python_and_activated(tmp_path, monkeypatch):
    version = sys.version_info[:2]
    venv = tmp_path / "venv"
    site_packages = venv / "lib" / f"python{version[0]}.{version[1]}" / "site-packages"
    site_packages.mkdir(parents=True)
    (tmp_path / "project").mkdir()
    (site_packages / "project.pth").write_text(str(tmp_path / "project") + "\n")  # as an editable install writes

    found = environment.find(str(venv))
    assert found.site_packages == site_packages and found.python == venv / "bin" / "python"
    monkeypatch.setattr(sys, "path", list(sys.path))
    REAL_ACTIVATE(found, tmp_path / "repo")
    assert sys.path[:2] == [str(tmp_path / "repo"), str(site_packages)]
    assert str(tmp_path / "project") in sys.path

    other = tmp_path / "old"
    (other / "lib" / "python3.9" / "site-packages").mkdir(parents=True)
    with pytest.raises(environment.EnvironmentProblem, match="is for Python 3.9, but OBS runs Python"):
        environment.find(str(other))
    with pytest.raises(environment.EnvironmentProblem, match="no Python environment is set"):
        environment.find("")
    with pytest.raises(environment.EnvironmentProblem, match="is not a Python environment"):
        environment.find(str(tmp_path / "project"))
