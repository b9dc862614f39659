"""OSC control (engine/osc.py): how OSC values are taken, and a real engine process whose
hosts stream over shared memory while python-osc's own UDP client changes their parameters.

Every wait is a generous deadline in seconds, so a busy machine makes these slower, never wrong.
"""

import logging
import random
import socket
import time

import numpy as np
import pytest
from pythonosc.udp_client import SimpleUDPClient

from processes import PATIENCE_S, ServedEngine
from bridge.client import EngineClient
from bridge.params import MAX_SEED
from bridge.protocol import PARAM_SPECS, ProtocolError
from engine import cli
from engine.osc import LogOnce, OscControl, check_osc_bind, osc_params, osc_value
from engine.server import Limits

pytestmark = pytest.mark.timeout(180)

HOST_SIZE = 32
STILL_FRAME = cli.test_pattern(1, HOST_SIZE, HOST_SIZE)[0]  # every chunk the same frames
FRAMES_PER_CHUNK = 4
SAME_PICTURE_LEVELS = 0.05  # the mean difference under which two outputs are the same picture
POLL_S = 0.02  # between two looks at the engine: often enough, and leaves the CPU to its steps


# ------------------------------------------------------------------------------ values


def value(name, *args):
    converted, clamped = osc_value(name, PARAM_SPECS[name], args)
    assert clamped == []
    return converted


def test_values_are_taken_as_osc_senders_send_them():
    assert value("strength", 1) == 1.0 and isinstance(value("strength", 1), float)  # an int for a float
    assert value("strength", "0.5") == 0.5  # a numeric string
    assert value("seed", 7.0) == 7 and value("seed", 41.6) == 42 and value("seed", "12") == 12
    assert value("virtualcam", 1) is True and value("virtualcam", 0.0) is False
    assert value("virtualcam", True) is True and value("virtualcam", "Off") is False and value("virtualcam", "true")
    assert value("fit", "CROP") == "crop" and value("fit", 2) == "stretch"  # a menu's name or its index
    assert value("prompt", "a fox") == "a fox"
    # Weighted prompts: text, weight, text, weight ...; a last text alone weighs 1; nothing clears them.
    assert value("prompts", "a fox", 0.75, "a wolf", "0.25", "a crow") == (
        ("a fox", 0.75), ("a wolf", 0.25), ("a crow", 1.0))
    assert value("prompts") == ()
    # LoRA adapters the same way: name, scale, name, scale ...
    assert value("loras", "ink", 0.5, "grain", "-1") == (("ink", 0.5), ("grain", -1.0))


@pytest.mark.parametrize("name, sent, taken, note", [
    ("strength", 5.0, 1.0, "strength 5 clamped to 1"),
    ("strength", 0, 0.1, "strength 0 clamped to 0.1"),
    ("seed", -3, 0, "seed -3 clamped to 0"),
    ("seed", 5e9, MAX_SEED, f"seed 5000000000 clamped to {MAX_SEED}"),
    ("steps", "9", 4, "steps 9 clamped to 4"),
])
def test_numbers_out_of_bounds_are_clamped_and_say_so(name, sent, taken, note):
    assert osc_value(name, PARAM_SPECS[name], [sent]) == (taken, [note])


def test_texts_too_long_are_cut_to_the_engines_bounds():
    prompt_spec = Limits(max_prompt_chars=10).params()["prompt"]
    assert osc_value("prompt", prompt_spec, ["x" * 20]) == ("x" * 10, ["prompt cut to 10 characters"])
    prompts, clamped = osc_value("prompts", PARAM_SPECS["prompts"], ["a", -1.0] + ["b", 1.0] * 9)
    assert prompts == (("a", 0.0),) + (("b", 1.0),) * 7
    assert clamped == ["prompts: only the first 8 prompts taken", "prompts[0] weight -1 clamped to 0"]
    loras, clamped = osc_value("loras", PARAM_SPECS["loras"], ["ink", 5])
    assert loras == (("ink", 2.0),) and clamped == ["loras[0] scale 5 clamped to 2"]


@pytest.mark.parametrize("name, args, code", [
    ("strength", ["loud"], "bad_type"),
    ("strength", [float("nan")], "bad_value"),
    ("strength", [], "bad_type"),
    ("strength", [0.5, 0.6], "bad_type"),
    ("steps", [True], "bad_type"),
    ("virtualcam", ["maybe"], "bad_type"),
    ("fit", [7], "bad_value"),
    ("fit", ["sepia"], "bad_value"),
    ("prompt", [3], "bad_type"),
    ("prompts", [1, 0.5], "bad_type"),
    ("prompts", ["a", 0.0], "bad_value"),  # the protocol's check has the last word: no weight above 0
])
def test_values_that_mean_nothing_for_the_parameter_are_refused(name, args, code):
    with pytest.raises(ProtocolError) as refused:
        osc_value(name, PARAM_SPECS[name], args)
    assert refused.value.code == code


def test_osc_sets_what_a_running_session_can_change():
    names = {param.name for param in osc_params()}
    assert {"prompt", "prompts", "strength", "seed", "steps", "model_width", "virtualcam"} <= names
    assert not names & {"spout_input", "spout_output"}  # taken only when a session opens


def test_osc_listens_beyond_loopback_only_when_told_it_is_unauthenticated():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_osc_bind(host, allow_remote=False)
    with pytest.raises(ValueError, match="--osc-allow-remote"):
        check_osc_bind("0.0.0.0", allow_remote=False)
    check_osc_bind("0.0.0.0", allow_remote=True)


def test_each_problem_is_logged_once_and_memory_stays_bounded(caplog):
    problems = LogOnce(capacity=3)
    with caplog.at_level(logging.WARNING, logger="engine.osc"):
        for _ in range(2):
            for key in range(10):
                problems.warning(key, "problem %d", key)
    assert [record.getMessage() for record in caplog.records] == [
        "problem 0", "problem 1", "problem 2", "OSC: 3 different problems logged; further ones are not"]


# ---------------------------------------------------------------------- OSC addresses


class RecordingEngine:
    """Stands in for EngineServer: records set_params calls."""

    param_specs = PARAM_SPECS

    def __init__(self):
        self.changes = []

    def set_params(self, session, params, refused):
        self.changes.append((session, params))


def test_addresses_reach_every_session_or_one_and_the_rest_is_logged(caplog):
    engine = RecordingEngine()
    osc = OscControl(engine, 0)
    osc.start()
    try:
        sender = SimpleUDPClient("127.0.0.1", osc.port)
        with caplog.at_level(logging.WARNING, logger="engine.osc"):
            sender.send_message("/sd/strength", 1)
            sender.send_message("/sd/3f2a9c0d41b7e865/seed", "7")
            sender.send_message("/sd/a/b/seed", 7)  # not a session id
            sender.send_message("/sd/spout_input", "Camera")  # taken only when a session opens
            sender.send_message("/sd/3f2a9c0d41b7e865/spout_output", "Out")
            sender.send_message("/sd/strength", "loud")
            sender.send_message("/sd/fit", 1)
            deadline = time.monotonic() + PATIENCE_S
            while len(engine.changes) < 3:
                assert time.monotonic() < deadline, engine.changes
                time.sleep(0.01)
    finally:
        osc.close()
    assert engine.changes == [(None, {"strength": 1.0}), ("3f2a9c0d41b7e865", {"seed": 7}), (None, {"fit": "crop"})]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for address in ("/sd/a/b/seed", "/sd/spout_input", "/sd/3f2a9c0d41b7e865/spout_output"):
        assert f"OSC: ignored {address}: no such address" in logged
    assert "OSC: ignored /sd/strength: strength takes a number, got 'loud'" in logged


# --------------------------------------------------------------------- a real engine


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def osc_port() -> int:
    return free_udp_port()


@pytest.fixture(scope="module")
def engine(tmp_path_factory, osc_port):
    engine = ServedEngine(tmp_path_factory.mktemp("osc"), "--osc", str(osc_port))
    yield engine
    assert engine.stop() == 0, engine.log()
    assert "Traceback" not in engine.log()


def host(engine: ServedEngine, prompt: str = "a watercolour painting") -> EngineClient:
    return EngineClient(engine.address, transport="shm", width=HOST_SIZE, height=HOST_SIZE, timeout_s=PATIENCE_S,
                        prompt=prompt)


class LockstepHosts:
    """Hosts that send the same still frame in turn, each only once the engine took the one
    before and the chunk being collected has room: no frame is dropped, so every session's
    n-th chunk holds the same frames, and sessions with the same parameters the same pictures."""

    def __init__(self, *clients: EngineClient):
        self.clients = clients
        self.sent = 0  # frames each client sent
        self.outputs: dict[str, dict[int, np.ndarray]] = {client.session: {} for client in clients}  # by seq

    def send(self, frames: int) -> None:
        for _ in range(frames):
            for client in self.clients:
                self.wait_until(lambda: self._room_for_a_frame(client),
                                lambda: f"the engine to take a frame: {client.stats()}")
                client.send(STILL_FRAME)
            self.sent += 1

    def pictures(self) -> list[np.ndarray]:
        """Each host's output of one input: the newest every host has an output of, once that is
        no older than the newest input whose chunk (and the lag after it) went in."""
        first, lag = self.clients[0].info["first_chunk_frames"], self.clients[0].info["lag_frames"]
        finished = first + FRAMES_PER_CHUNK * ((self.sent - first) // FRAMES_PER_CHUNK) - 1 - lag

        def newest() -> int:
            return max(set.intersection(*map(set, self.outputs.values())), default=-1)

        self.wait_until(lambda: newest() >= finished, lambda: f"output {finished}; got {list(self.outputs.values())}")
        return [self.outputs[client.session][newest()] for client in self.clients]

    def wait_until(self, condition, what) -> None:
        """Wait for condition, every host collecting its outputs meanwhile, which also keeps
        its session open (on a busy machine a step can take seconds)."""
        deadline = time.monotonic() + PATIENCE_S
        while not condition():
            assert time.monotonic() < deadline, f"waited {PATIENCE_S:g} s for {what()}"
            time.sleep(POLL_S)
            for client in self.clients:
                # receive() gives only the newest output, so the hosts look often.
                if (output := client.receive()) is not None:
                    self.outputs[client.session][output.seq] = output.pixels

    def _room_for_a_frame(self, client: EngineClient) -> bool:
        stats = client.stats()
        return stats["frames_in"] == self.sent and self.sent - stats["frames_processed"] < stats["next_chunk_frames"]


def params_of(client: EngineClient) -> dict:
    return client.stats()["params"]


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b).mean())


def test_an_osc_sender_changes_prompt_strength_and_seed_of_running_sessions(engine, osc_port):
    sender = SimpleUDPClient("127.0.0.1", osc_port)
    with host(engine) as fox, host(engine) as twin:
        hosts = LockstepHosts(fox, twin)
        hosts.send(fox.info["first_chunk_frames"] + 4 * FRAMES_PER_CHUNK)
        # Same frames, same parameters: the same picture (but for the rounding of a forward
        # shared by both sessions: 0.0001 levels on average).
        assert mean_difference(*hosts.pictures()) < SAME_PICTURE_LEVELS

        sender.send_message("/sd/strength", 1)  # an int for a float, on every session
        sender.send_message("/sd/seed", "7")  # a numeric string
        sender.send_message(f"/sd/{fox.session}/prompt", "a charcoal drawing")  # on one session
        hosts.wait_until(lambda: params_of(fox)["prompt"] == "a charcoal drawing", lambda: "the new prompt")
        for client, prompt in ((fox, "a charcoal drawing"), (twin, "a watercolour painting")):
            params = params_of(client)
            assert (params["prompt"], params["strength"], params["seed"]) == (prompt, 1.0, 7)

        hosts.send(4 * FRAMES_PER_CHUNK)
        # Strength and seed changed for both between the same two chunks: the prompt made the
        # difference (0.15 levels on average, on the tiny model).
        assert mean_difference(*hosts.pictures()) > SAME_PICTURE_LEVELS


def test_bad_osc_is_logged_once_and_streaming_goes_on(engine, osc_port):
    sender = SimpleUDPClient("127.0.0.1", osc_port)
    with host(engine) as first, host(engine) as second:
        hosts = LockstepHosts(first, second)
        hosts.send(first.info["first_chunk_frames"])
        hosts.pictures()

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            for garbage in (random.Random(15).randbytes(200), b"/sd/strength\x00\x00\x00\x00,i\x00\x00\x01",
                            b"#bundle\x00\x00\x00"):  # random bytes, an int cut short, a bundle cut short
                raw.sendto(garbage, ("127.0.0.1", osc_port))
        for _ in range(2):
            sender.send_message("/sd/strength", "loud")
            sender.send_message("/sd/colour", 1)
            sender.send_message("/sd/seed", [1, 2])
            sender.send_message("/sd/nosuchsession/strength", 0.5)
            sender.send_message("/sd/strength", 7.5)
            sender.send_message("/sd/model_width", 40)  # within the bounds, but the pipeline takes multiples of 16
        sender.send_message(f"/sd/{first.session}/prompts", ["a fox", 0.75, "a wolf"])
        # A float for an int, on one session; sent last, so the others were handled once it is.
        sender.send_message(f"/sd/{second.session}/transition_frames", 3.0)
        hosts.wait_until(lambda: params_of(second)["transition_frames"] == 3, lambda: "transition_frames")

        assert params_of(first)["transition_frames"] == 0
        assert params_of(first)["prompts"] == [["a fox", 0.75], ["a wolf", 1.0]]
        assert params_of(first)["strength"] == params_of(second)["strength"] == 1.0  # clamped from 7.5
        log = engine.log()
        for line in ("OSC: ignored a datagram from 127.0.0.1 that is not an OSC message or bundle",
                     "OSC: ignored /sd/strength: strength takes a number, got 'loud'",
                     "OSC: ignored /sd/colour: no such address",
                     "OSC: ignored /sd/seed: seed takes one value, got 2",
                     "OSC: session nosuchsession did not take the change (session): no session 'nosuchsession' is open",
                     "OSC: /sd/strength: strength 7.5 clamped to 1"):
            assert log.count(line) == 1, (line, log)
        for session in (first.session, second.session):
            assert log.count(f"OSC: session {session} did not take the change (params.model_width)") == 1, log

        hosts.send(2 * FRAMES_PER_CHUNK)
        hosts.pictures()  # the newest outputs came: both sessions stream on
        assert first.stats()["state"] == second.stats()["state"] == "streaming"
