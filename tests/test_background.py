"""bridge/background.py: the host layer's client on its own thread.

First against a fake EngineClient (tests/fake_engine_client.py), where every behaviour
a host relies on can be pinned quickly; then against real tiny engines: real processes,
sockets and shared memory. The tests wait for what a host would see (frames shown, the
status) with deadlines in seconds, and never sleep for fixed times where waiting for a
condition will do.
"""

import logging
import re
import time

import numpy as np
import pytest

from fake_engine_client import ENGINES, FakeEngine, FakeEngineClient
from processes import PATIENCE_S, ServedEngine
from bridge import background
from bridge.background import BackgroundClient, SessionConfig
from bridge.client import EngineClient

pytestmark = pytest.mark.timeout(120)

ADDRESS = "tcp://127.0.0.1:5999"
CONFIG = SessionConfig(ADDRESS, "shm", "tiny", 8, 6)
PARAMS = {"prompt": "a watercolour painting", "strength": 0.8, "steps": 2, "seed": 0, "target_fps": 30,
          "latency_ms": 500}
SCHEDULED = re.compile(r"(meeting targets|over budget|frame rate lowered|warming up), "
                       r"(stream-batched|steps in turn), chunks of (4|8) frames")


def frame(value: int, width: int = 8, height: int = 6) -> np.ndarray:
    pixels = np.full((height, width, 4), value, np.uint8)
    pixels[..., 3] = 255
    return pixels


def wait_until(condition, timeout_s: float = PATIENCE_S):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s")
        time.sleep(0.005)


class Shown:
    """An on_output callback: keeps what the client hands over."""

    def __init__(self):
        self.frames = []

    def __call__(self, pixels):
        self.frames.append(pixels)


def offer_until_shown(client, shown, value: int, count: int = 1, timeout_s: float = PATIENCE_S):
    """Offer frames of `value` until `count` more outputs have been shown."""
    target = len(shown.frames) + count
    wait_until(lambda: (client.offer(frame(value), time.monotonic_ns()), len(shown.frames) >= target)[1], timeout_s)


# ------------------------------------------------------------------------- against a fake client


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(background, "EngineClient", FakeEngineClient)
    monkeypatch.setattr(background, "DEBOUNCE_S", 0.05)
    monkeypatch.setattr(background, "RETRY_S", 0.02)
    monkeypatch.setattr(background, "REFUSED_RETRY_S", 0.02)
    monkeypatch.setattr(background, "STATS_EVERY_S", 0.02)
    monkeypatch.setattr(background, "RATE_WINDOW_S", 0.3)
    ENGINES.clear()
    yield
    ENGINES.clear()


@pytest.fixture
def shown():
    return Shown()


@pytest.fixture
def make_client(fake, shown):
    clients = []

    def make(config=CONFIG, params=PARAMS, **hooks):
        hooks.setdefault("on_output", shown)
        client = BackgroundClient(config, dict(params), **hooks).start()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_frames_go_to_the_engine_and_come_back_with_one_status(make_client, shown):
    engine = FakeEngine(ADDRESS)
    client = make_client()
    offer_until_shown(client, shown, 10, count=3)

    assert engine.hellos[0] | {"session": None} == {"session": None, "transport": "shm", "width": 8, "height": 6,
                                                     "model": "tiny", "params": PARAMS}
    assert (engine.frames_received[0][..., :3] == 10).all()
    assert (shown.frames[-1][..., :3] == 245).all()  # the fake engine inverts
    wait_until(lambda: client.status().dropped.by_engine == 4)  # from the engine's stats
    status = client.status()
    assert (status.state, status.message, status.error) == ("streaming", "", "")
    assert status.frames_shown >= 3 and status.frames_sent >= 3
    assert status.output_fps > 0 and status.latency_ms is not None and status.latency_ms >= 0
    assert status.first_frame_ms is not None and status.first_frame_ms >= 0
    assert status.scheduler == "meeting targets, steps in turn, chunks of 4 frames, 410 ms predicted"
    assert status.engine_params["prompt"] == "a watercolour painting"
    assert status.dropped.total == sum((status.dropped.replaced, status.dropped.not_sent, status.dropped.by_engine,
                                        status.dropped.outputs_skipped))


def test_a_newer_frame_replaces_one_not_sent_yet(fake):
    client = BackgroundClient(CONFIG, PARAMS)  # not started: nothing takes frames
    for value in (1, 2, 3):
        client.offer(frame(value), value)
    assert client.status().dropped.replaced == 2


def test_without_on_output_take_returns_the_newest_output_converted_on_the_thread(make_client):
    FakeEngine(ADDRESS)
    client = make_client(on_output=None, convert_input=lambda pixels: pixels[::-1].copy(),
                         convert_output=lambda pixels: ("converted", pixels))
    pixels = frame(10)
    pixels[0] = 200  # the top row, which convert_input makes the bottom one
    wait_until(lambda: (client.offer(pixels, time.monotonic_ns()), client.status().frames_shown > 0)[1])
    taken = client.take()
    assert taken[0] == "converted" and (taken[1][-1, :, :3] == 55).all() and (taken[1][0, :, :3] == 245).all()
    assert client.take() is None  # taken once


def test_parameters_set_quickly_go_to_the_engine_once_they_settle(make_client, shown):
    engine = FakeEngine(ADDRESS)
    client = make_client()
    offer_until_shown(client, shown, 10)
    for prompt in ("a", "a c", "a ca", "a cat"):  # one call per key typed
        client.set(prompt=prompt)
    client.set(strength=0.5)
    engine.wait_for(lambda e: e.params_received)
    time.sleep(3 * background.DEBOUNCE_S)  # nothing more may come
    assert engine.params_received == [{"prompt": "a cat", "strength": 0.5}]


def test_a_stream_restarting_parameter_is_a_notice(make_client, shown):
    engine = FakeEngine(ADDRESS)
    client = make_client()
    offer_until_shown(client, shown, 10)
    client.set(steps=3)
    engine.wait_for(lambda e: e.params_received)
    wait_until(lambda: client.status().notice != "")
    assert client.status().notice == "Steps changed: the stream restarts (the last frame stays meanwhile)"


def test_a_refused_value_is_an_error_until_a_value_of_it_is_taken(make_client, shown):
    engine = FakeEngine(ADDRESS)
    client = make_client()
    offer_until_shown(client, shown, 10)
    client.set(strength=5.0)
    wait_until(lambda: client.status().error != "")
    assert client.status().error == "the engine refused Strength: params.strength must be from 0.1 to 1"
    client.set(strength=0.5)
    wait_until(lambda: client.status().error == "")
    assert engine.params_received[-1] == {"strength": 0.5}


def test_parameters_this_engine_lacks_are_named_and_left_out(make_client, shown, caplog):
    caplog.set_level(logging.INFO, "bridge")
    engine = FakeEngine(ADDRESS, lacking=frozenset({"blend", "transition_frames"}))
    client = make_client(params={**PARAMS, "blend": "slerp"})
    offer_until_shown(client, shown, 10)  # the hello went without it
    assert "blend" not in engine.hellos[-1]["params"]
    client.set(transition_frames=8, seed=3)
    engine.wait_for(lambda e: e.params_received)
    assert engine.params_received == [{"seed": 3}]
    lacking = [r.getMessage() for r in caplog.records if "does not take" in r.getMessage()]
    assert lacking == ["this engine does not take Blend Method yet; left as the engine has it",
                       "this engine does not take Transition Length yet; left as the engine has it"]
    assert all(r.levelno == logging.INFO for r in caplog.records if "does not take" in r.getMessage())


def test_no_engine_is_a_state_not_an_error_and_it_connects_once_one_starts(make_client, shown):
    client = make_client()
    wait_until(lambda: client.status().state == "unreachable")
    status = client.status()
    assert status.message == f"no engine answers at {ADDRESS}: start one there, or check the address"
    assert status.error == ""
    client.offer(frame(10), 1)  # nobody to send it to: nothing breaks

    engine = FakeEngine(ADDRESS)
    offer_until_shown(client, shown, 20)
    assert engine.sessions_opened == 1 and client.status().state == "streaming"


def test_during_an_outage_the_status_says_what_the_host_sees_now(make_client, shown):
    engine = FakeEngine(ADDRESS)
    client = make_client()
    offer_until_shown(client, shown, 10, count=3)

    engine.kill()
    wait_until(lambda: (client.offer(frame(11), 1), client.status().state == "disconnected")[1])
    wait_until(lambda: (client.offer(frame(11), 1), client.status().dropped.not_sent > 0)[1])  # dropped in the client
    time.sleep(background.RATE_WINDOW_S)
    status = client.status()
    assert status.message == f"the engine at {ADDRESS} stopped answering; the last frame stays until it is back"
    assert status.error == ""  # an expected state, not a fault
    assert status.output_fps == 0 and status.latency_ms is None  # nothing is coming now
    assert status.first_frame_ms is None and status.scheduler == "" and status.engine_params == {}  # no session
    shown_while_away, sent_while_away = len(shown.frames), status.frames_sent
    assert client.status().frames_sent == sent_while_away  # frames offered now are dropped, not sent

    engine.start()
    offer_until_shown(client, shown, 30)
    assert len(shown.frames) > shown_while_away
    assert engine.sessions_opened == 2  # the client opened a new session by itself
    assert (shown.frames[-1][..., :3] == 225).all()
    wait_until(lambda: client.status().dropped.by_engine == 8)  # both sessions' engine drops


def test_parameters_changed_while_the_engine_is_away_reach_it_when_it_is_back(make_client, shown):
    engine = FakeEngine(ADDRESS)
    client = make_client()
    offer_until_shown(client, shown, 10)
    engine.kill()
    client.set(prompt="a fox")
    time.sleep(4 * background.DEBOUNCE_S)  # sent into the void, or kept while there is no session
    engine.start()
    offer_until_shown(client, shown, 20)
    wait_until(lambda: engine.hellos[-1]["params"]["prompt"] == "a fox" or {"prompt": "a fox"} in
               engine.params_received)


def test_a_session_the_engine_ended_is_replaced_and_its_error_clears_once_frames_come(make_client, shown):
    engine = FakeEngine(ADDRESS)
    client = make_client()
    offer_until_shown(client, shown, 10)
    engine.fail_session(engine.hellos[-1]["session"])
    errors = set()
    wait_until(lambda: (errors.add(client.status().error), engine.sessions_opened == 2)[1])
    assert "the engine ended the session: out of memory in a step" in errors
    offer_until_shown(client, shown, 40)
    assert client.status().error == ""


def test_a_new_configuration_replaces_the_session_once_it_settles(make_client, shown):
    engine = FakeEngine(ADDRESS)
    client = make_client()
    offer_until_shown(client, shown, 10)

    for width in (10, 12, 16):  # typed into the width box
        client.configure(SessionConfig(ADDRESS, "shm", "tiny", width, 6))
    wait_until(lambda: engine.sessions_opened == 2)
    assert engine.hellos[-1]["width"] == 16 and engine.sessions_closed == 1
    assert client.status().config.width == 16
    received_before = len(engine.frames_received)
    client.offer(frame(50), 1)  # captured at the old size, just before the new session: not sent
    wait_until(lambda: (client.offer(frame(60, width=16), 2), len(engine.frames_received) > received_before)[1])
    assert [f.shape[1] for f in engine.frames_received[received_before:]] == [16] * (
        len(engine.frames_received) - received_before)
    dropped = client.status().dropped
    assert dropped.not_sent + dropped.replaced >= 1  # the old size's frame: dropped, or replaced before that


def test_a_session_without_a_size_opens_at_the_frames_size_and_follows_it(make_client, shown):
    engine = FakeEngine(ADDRESS)
    client = make_client(config=SessionConfig(ADDRESS, "shm", "tiny"))
    wait_until(lambda: client.status().state == "waiting for frames")
    offer_until_shown(client, shown, 10)
    assert (engine.hellos[-1]["width"], engine.hellos[-1]["height"]) == (8, 6)
    wait_until(lambda: (client.offer(frame(10, width=4, height=2), 1), len(shown.frames) and
                        shown.frames[-1].shape == (2, 4, 4))[1])
    assert (engine.hellos[-1]["width"], engine.hellos[-1]["height"]) == (4, 2) and engine.sessions_closed == 1


def test_transport_parameters_go_with_the_session_that_takes_them(make_client, shown):
    engine = FakeEngine(ADDRESS)
    make_client(SessionConfig(ADDRESS, "zmq", "tiny", 8, 6, (("fit", "crop"),)))
    engine.wait_for(lambda e: e.hellos)
    assert engine.hellos[0]["transport"] == "zmq" and engine.hellos[0]["params"]["fit"] == "crop"


def test_close_ends_the_session_and_the_thread(make_client, shown):
    engine = FakeEngine(ADDRESS)
    client = make_client()
    offer_until_shown(client, shown, 10)
    started = time.monotonic()
    client.close()
    assert time.monotonic() - started < 1
    assert engine.sessions_closed == 1
    assert client.status().state == "stopped"


# ---------------------------------------------------------------------- against real engines


def stream_until(client: BackgroundClient, condition, what: str, size=(48, 64)) -> None:
    """Offer frames at about 30 a second until condition() holds."""
    pixels = np.zeros((*size, 3), np.uint8)
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}; the status is {client.status()}"
        pixels[..., 0] += 8
        client.offer(pixels.copy(), time.monotonic_ns())
        time.sleep(1 / 30)


def bridge_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("bridge") and r.levelno >= logging.WARNING]


@pytest.fixture
def engine(tmp_path):
    engine = ServedEngine(tmp_path)
    yield engine
    engine.stop()


def test_a_real_engine_streams_and_the_status_is_right(engine):
    client = BackgroundClient(SessionConfig(engine.address, "shm", "tiny"), {"prompt": "ink on paper"}).start()
    try:
        stream_until(client, lambda: client.status().frames_shown >= 3, "the first outputs")
        stream_until(client, lambda: SCHEDULED.match(client.status().scheduler), "the scheduler's plan")
        status = client.status()
        assert (status.state, status.message, status.error) == ("streaming", "", "")
        assert status.output_fps > 0 and status.latency_ms > 0 and status.first_frame_ms > 0
        assert status.frames_sent >= status.frames_shown >= 3
        assert status.engine_params["prompt"] == "ink on paper"
        output = client.take()
        assert output.dtype == np.uint8 and output.shape == (48, 64, 3)  # at the host's size and format
    finally:
        client.close()
    assert client.status().state == "stopped"


def test_parameter_changes_are_debounced_into_few_requests(engine, monkeypatch):
    requests = []
    real_set = EngineClient.set
    monkeypatch.setattr(EngineClient, "set", lambda self, **params: (requests.append(params),
                                                                     real_set(self, **params))[1])
    client = BackgroundClient(SessionConfig(engine.address, "shm", "tiny")).start()
    try:
        stream_until(client, lambda: client.status().frames_shown >= 1, "the first output")
        for step in range(50):  # a slider dragged: a change every 10 ms
            client.set(strength=0.3 + step / 100)
            time.sleep(0.01)
        last = 0.3 + 49 / 100
        stream_until(client, lambda: client.status().engine_params.get("strength") == pytest.approx(last),
                     "the last value")
        assert 1 <= len(requests) <= 3, requests

        client.set(strength=5.0)  # out of bounds: refused, and said
        stream_until(client, lambda: client.status().error, "the refusal")
        assert client.status().error.startswith("the engine refused Strength")
        client.set(strength=0.5)
        stream_until(client, lambda: client.status().error == "", "the error to clear")
    finally:
        client.close()


def test_a_lost_engine_is_information_and_the_stream_resumes_when_it_is_back(tmp_path, caplog):
    caplog.set_level(logging.INFO, "bridge")
    first = ServedEngine(tmp_path)
    second = None
    client = BackgroundClient(SessionConfig(first.address, "shm", "tiny")).start()
    try:
        stream_until(client, lambda: client.status().frames_shown >= 2, "the first outputs")
        first_session = re.findall(r"session (\w+) open", caplog.text)[-1]

        first.kill_with_its_tracker()
        stream_until(client, lambda: client.status().state == "disconnected", "the engine's loss to show")
        status = client.status()
        assert "stopped answering" in status.message and status.error == ""
        assert any("stopped answering" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
        assert bridge_warnings(caplog) == []  # nothing for a host to pop a window up about
        shown_while_away = status.frames_shown

        second = ServedEngine(tmp_path, address=first.address)
        stream_until(client, lambda: client.status().frames_shown > shown_while_away + 1, "the stream to resume")
        status = client.status()
        assert (status.state, status.error) == ("streaming", "")
        assert re.findall(r"session (\w+) open", caplog.text)[-1] != first_session
        assert bridge_warnings(caplog) == []
    finally:
        client.close()
        if second is not None:
            assert second.stop() == 0, second.log()
        first.stop()


def test_no_engine_at_the_address_is_said_quietly(caplog):
    caplog.set_level(logging.INFO, "bridge")
    client = BackgroundClient(SessionConfig("tcp://127.0.0.1:9", "shm", "tiny")).start()  # discard: nobody there
    try:
        stream_until(client, lambda: client.status().state == "unreachable", "no engine to be said")
        assert client.status().error == "" and bridge_warnings(caplog) == []
    finally:
        client.close()
