"""The one parameter table (bridge/params.py): everything that takes a parameter agrees
with it, and every parameter a host can set does what it says in a real engine."""

import argparse
import time

import numpy as np
import pytest

from processes import PATIENCE_S, ServedEngine
from tiny_loras import random_factors, write_lora
from bridge import params as table
from bridge.client import EngineClient
from bridge.protocol import PARAM_SPECS
from engine import cli
from engine.flow import PUBLISHED_STEPS
from engine.pipeline import LIVE_SETTINGS, StreamSettings
from engine.session import ROUTES, TARGETS

pytestmark = pytest.mark.timeout(600)

HOST_WIDTH, HOST_HEIGHT = 48, 32  # not the model's shape (32x32), so the fit mode shows
FRAMES_BEFORE = 13  # the first chunk and two more ...
LAST_OUTPUT_BEFORE = 8  # ... which give the outputs up to this one (2 steps: a lag of 4 frames)
FRAMES_AFTER = 24  # enough for a restarted stream with 3 steps to give outputs again
MAX_FRAMES_AFTER = 200  # more while no output late enough reached both sessions (a busy machine)
FRAME_SPACING_S = 0.02
FIRST_OUTPUTS_COMPARED = 20  # from here on, a change shows in every output
# Mean differences in levels (of 255) between two sessions' pictures: computing the same
# thing they differ by float rounding (under 0.002 seen); a prompt changes the tiny
# model's random pictures by about 0.1, other parameters by far more.
SAME_LEVELS = 0.01
DIFFERENT_LEVELS = 0.03


# ------------------------------------------------------------------------ the table


@pytest.mark.parametrize("param", table.PARAMS.values(), ids=table.PARAMS)
def test_every_entry_is_complete_and_its_default_passes_its_own_check(param):
    assert param.kind in table.KINDS and param.applies in (table.LIVE, table.RELOAD, table.OPEN)
    assert param.group in table.GROUPS and param.label and param.help.endswith(".")
    assert PARAM_SPECS[param.name].check(param.name, param.default) == param.default
    if param.kind in ("int", "float"):
        low, high = param.slider_range
        assert param.minimum <= low < high <= param.maximum
    assert param.describe()["default"] == (list(param.default) if param.kind in table.PAIR_KINDS else param.default)


def test_the_stream_settings_take_their_defaults_and_liveness_from_the_table():
    settings = StreamSettings()
    for name in ("steps", "strength", "seed", "blend", "fit", "low_latency_start", "transition_frames", "loras"):
        assert getattr(settings, name) == table.PARAMS[name].default, name
    assert (settings.width, settings.height) == (table.PARAMS["model_width"].default,
                                                 table.PARAMS["model_height"].default)
    assert set(LIVE_SETTINGS) == {name for name, param in table.PARAMS.items()
                                  if param.applies == table.LIVE and name not in TARGETS and name not in ROUTES}
    assert table.PARAMS["steps"].maximum == len(PUBLISHED_STEPS)


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_session_flags(parser, cli.SERVE_FLAGS, "")
    return parser.parse_args(argv)


def test_serve_flags_come_from_the_table_and_only_those_given_become_defaults():
    assert cli.session_flag_values(serve_args(), cli.SERVE_FLAGS, only_given=True) == {}
    assert cli.session_flag_values(serve_args(), cli.SERVE_FLAGS) == {
        name: table.PARAMS[name].default for name in cli.SERVE_FLAGS}
    given = serve_args("--strength", "0.5", "--target-fps", "24", "--virtualcam", "--fit", "crop")
    assert cli.session_flag_values(given, cli.SERVE_FLAGS, only_given=True) == {
        "strength": 0.5, "target_fps": 24.0, "virtualcam": True, "fit": "crop"}


def test_a_flag_out_of_the_tables_bounds_is_refused_naming_the_flag_and_the_bounds(capsys):
    with pytest.raises(SystemExit):
        serve_args("--strength", "0.05")
    assert "--strength must be from 0.1 to 1, got 0.05" in capsys.readouterr().err


# ----------------------------------------------------------- every control is real

# How each parameter a host can set shows, as (hello params of both sessions, a change
# to both, a change to one of them only). "state" parameters show in what the engine
# reports; every other one changes the pictures of the session it is set on.
TWO_PROMPTS = [["a fox in the snow", 1.0], ["a neon city at night", 1.0]]
CASES = {
    "prompt": ({}, {}, {"prompt": "a charcoal drawing"}),
    "prompts": ({}, {}, {"prompts": TWO_PROMPTS}),
    "blend": ({"prompts": TWO_PROMPTS}, {}, {"blend": "slerp"}),
    "transition_frames": ({}, {"prompt": "a charcoal drawing"}, {"transition_frames": 16}),
    "loras": ({}, {}, {"loras": [["ink", 1.0]]}),  # a LoRA the engine fixture writes into its LoRA folder
    "strength": ({}, {}, {"strength": 0.3}),
    "steps": ({}, {}, {"steps": 3}),
    "seed": ({}, {}, {"seed": 7}),
    "fit": ({}, {}, {"fit": "crop"}),
    "low_latency_start": ({}, {}, {"low_latency_start": True}),
    "model_width": ({}, {}, {"model_width": 48}),
    "model_height": ({}, {}, {"model_height": 48}),
}
STATE_CASES = {"target_fps": 24.0, "latency_ms": 900.0, "virtualcam": True}


def test_every_parameter_a_host_can_change_is_walked_here():
    changeable = {name for name, param in table.PARAMS.items() if param.applies != table.OPEN}
    assert changeable == set(CASES) | set(STATE_CASES)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    loras = tmp_path_factory.mktemp("loras")
    write_lora(loras / "ink.safetensors", random_factors())
    engine = ServedEngine(tmp_path_factory.mktemp("engine"), "--lora-dir", str(loras))
    yield engine
    assert engine.stop() == 0, engine.log()


def session(engine, **params) -> EngineClient:
    return EngineClient(engine.address, transport="shm", width=HOST_WIDTH, height=HOST_HEIGHT, timeout_s=PATIENCE_S,
                        prompt="a watercolour painting", **params)


class Host:
    """Sends frames to a session only while its next chunk has room, so that no frame is
    dropped as stale and two sessions fed alike see the same frames; keeps the outputs."""

    def __init__(self, client: EngineClient):
        self.client, self.sent, self.outputs = client, 0, {}

    def send(self, frame: np.ndarray) -> None:
        deadline = time.monotonic() + PATIENCE_S
        while True:
            stats = self.client.stats()
            if stats["frames_in"] == self.sent and stats["frames_waiting"] < stats["next_chunk_frames"]:
                break
            assert time.monotonic() < deadline, f"the engine stopped taking frames: {stats}"
            self.collect(0.002)
        self.client.send(frame)
        self.sent += 1
        self.collect(FRAME_SPACING_S)  # outputs are paced as their inputs were: each can be caught

    def collect(self, timeout: float) -> None:
        output = self.client.receive(timeout)
        if output is not None:
            self.outputs[output.seq] = output.pixels.astype(float)

    def wait_for_output(self, seq: int) -> None:
        deadline = time.monotonic() + PATIENCE_S
        while max(self.outputs, default=-1) < seq:
            assert time.monotonic() < deadline, f"output {seq} never came: {self.client.stats()}"
            self.collect(0.002)


def stream(hosts: list[Host], frames: np.ndarray) -> None:
    for frame in frames:
        for host in hosts:
            host.send(frame)


def compared_outputs(unchanged: Host, changed: Host) -> list[int]:
    """The outputs both sessions showed from FIRST_OUTPUTS_COMPARED on."""
    return sorted(seq for seq in changed.outputs if seq >= FIRST_OUTPUTS_COMPARED and seq in unchanged.outputs)


def mean_difference(a: Host, b: Host, seqs: list[int]) -> float:
    return float(np.mean([np.abs(a.outputs[seq] - b.outputs[seq]).mean() for seq in seqs]))


@pytest.mark.parametrize("name", CASES)
def test_a_live_or_restarting_parameter_changes_the_pictures_of_its_session(engine, name):
    both_open, both_change, one_change = CASES[name]
    frames = cli.test_pattern(FRAMES_BEFORE + MAX_FRAMES_AFTER, HOST_HEIGHT, HOST_WIDTH)
    with session(engine, **both_open) as unchanged, session(engine, **both_open) as changed:
        hosts = [Host(unchanged), Host(changed)]
        stream(hosts, frames[:FRAMES_BEFORE])
        for host in hosts:  # every output before the change is out before it is made
            host.wait_for_output(LAST_OUTPUT_BEFORE)
        changed.set(**one_change)
        for client in (unchanged, changed):
            if both_change:
                client.set(**both_change)
        stream(hosts, frames[FRAMES_BEFORE:FRAMES_BEFORE + FRAMES_AFTER])
        # A host catches an output only while it is the newest: on a busy machine one may be
        # missed, so frames go on until both sessions have shown one late enough to compare.
        deadline, sent = time.monotonic() + PATIENCE_S, FRAMES_BEFORE + FRAMES_AFTER
        while not compared_outputs(*hosts):
            assert time.monotonic() < deadline and sent < len(frames), (
                f"no output from {FIRST_OUTPUTS_COMPARED} on came to both sessions: "
                f"{sorted(hosts[0].outputs)} and {sorted(hosts[1].outputs)}")
            stream(hosts, frames[sent:sent + 1])
            sent += 1
        reported = changed.stats()["params"]

    for key, value in one_change.items():
        assert reported[key] == value, (key, reported[key])
    before = sorted(seq for seq in hosts[1].outputs if seq <= LAST_OUTPUT_BEFORE and seq in hosts[0].outputs)
    after = compared_outputs(*hosts)
    assert before and after, (before, after)
    assert mean_difference(*hosts, before) < SAME_LEVELS  # the two sessions agree until the change ...
    assert mean_difference(*hosts, after) > DIFFERENT_LEVELS, name  # ... and not after it


@pytest.mark.parametrize("name", STATE_CASES)
def test_a_parameter_that_changes_no_picture_changes_what_the_engine_reports(engine, name):
    value = STATE_CASES[name]
    with session(engine) as host:
        before = host.stats()
        assert before["params"][name] == table.PARAMS[name].default
        reply = host.set(**{name: value})
        after = host.stats()
    assert after["params"][name] == value
    if name == "virtualcam":  # no camera backend here: the engine says why, which "off" never does
        assert before["virtualcam"]["state"] == "off" and reply["virtualcam"]["state"] != "off"
