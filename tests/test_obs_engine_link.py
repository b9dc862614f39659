"""The OBS script's engine link (obs_scripts/streamdiffusion_obs/engine_link.py) against a fake EngineClient.

The link runs its client on its own thread; these tests wait for what a user would
see (frames shown, the status) with short deadlines, and never sleep for fixed times
where waiting for a condition will do.
"""

import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "obs_scripts"))

from fake_engine_client import ENGINES, FakeEngine, FakeEngineClient  # noqa: E402
from streamdiffusion_obs import engine_link  # noqa: E402
from streamdiffusion_obs.engine_link import EngineLink, SessionConfig  # noqa: E402

pytestmark = pytest.mark.timeout(30)

ADDRESS = "tcp://127.0.0.1:5999"
SESSION = SessionConfig(ADDRESS, "shm", "tiny", 8, 6)
PARAMS = {"prompt": "a watercolour painting", "strength": 0.8, "steps": 2, "seed": 0, "target_fps": 30,
          "latency_ms": 500}


@pytest.fixture(autouse=True)
def fake_client(monkeypatch):
    monkeypatch.setattr(engine_link, "EngineClient", FakeEngineClient)
    monkeypatch.setattr(engine_link, "DEBOUNCE_S", 0.05)
    monkeypatch.setattr(engine_link, "RETRY_S", 0.02)
    monkeypatch.setattr(engine_link, "STATS_EVERY_S", 0.02)
    ENGINES.clear()
    yield
    ENGINES.clear()


class Shown:
    """The show callback: keeps what the link hands over."""

    def __init__(self):
        self.frames = []

    def __call__(self, pixels):
        self.frames.append(pixels)


@pytest.fixture
def shown():
    return Shown()


@pytest.fixture
def make_link(shown):
    links = []

    def make(session=SESSION, params=PARAMS):
        link = EngineLink(session, dict(params), shown)
        link.start()
        links.append(link)
        return link

    yield make
    for link in links:
        link.stop()


def frame(value: int, width: int = 8, height: int = 6) -> np.ndarray:
    pixels = np.full((height, width, 4), value, np.uint8)
    pixels[..., 3] = 255
    return pixels


def wait_until(condition, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def offer_until_shown(link, shown, value: int, count: int = 1):
    """Offer frames of `value` until `count` more stylised frames have been shown."""
    target = len(shown.frames) + count
    wait_until(lambda: (link.offer(frame(value), time.monotonic_ns()), len(shown.frames) >= target)[1])


def test_frames_go_to_the_engine_and_stylised_frames_are_shown_with_status(make_link, shown):
    engine = FakeEngine(ADDRESS)
    link = make_link()
    offer_until_shown(link, shown, 10, count=3)

    assert engine.hellos[0] | {"session": None} == {"session": None, "transport": "shm", "width": 8, "height": 6,
                                                     "model": "tiny", "params": PARAMS}
    assert (engine.frames_received[0][..., :3] == 10).all()
    assert (shown.frames[-1][..., :3] == 245).all()  # the fake engine inverts
    wait_until(lambda: link.status().dropped_by_engine == 4)  # from the engine's stats
    status = link.status()
    assert status.engine == "streaming"
    assert status.frames_shown >= 3 and status.frames_sent >= 3
    assert status.output_fps > 0 and status.latency_ms is not None and status.latency_ms >= 0
    assert status.last_error == ""


def test_a_newer_frame_replaces_one_not_sent_yet():
    link = EngineLink(SESSION, PARAMS, Shown())  # not started: nothing takes frames
    link.offer(frame(1), 1)
    link.offer(frame(2), 2)
    link.offer(frame(3), 3)
    assert link.status().replaced_before_send == 2


def test_parameters_typed_quickly_go_to_the_engine_once_they_settle(make_link, shown):
    engine = FakeEngine(ADDRESS)
    link = make_link()
    offer_until_shown(link, shown, 10)
    for prompt in ("a", "a c", "a ca", "a cat"):  # one script_update per key
        link.update_params({"prompt": prompt})
    link.update_params({"strength": 0.5})
    engine.wait_for(lambda e: e.params_received)
    time.sleep(3 * engine_link.DEBOUNCE_S)  # nothing more may come
    assert engine.params_received == [{"prompt": "a cat", "strength": 0.5}]


def test_a_stream_restarting_parameter_says_so(make_link, shown):
    engine = FakeEngine(ADDRESS)
    link = make_link()
    offer_until_shown(link, shown, 10)
    link.update_params({"steps": 3})
    engine.wait_for(lambda e: e.params_received)
    wait_until(lambda: link.status().notice != "")
    assert link.status().notice == "steps changed: the engine restarted the stream"


def test_a_refused_parameter_is_the_last_error(make_link, shown):
    FakeEngine(ADDRESS)
    link = make_link()
    offer_until_shown(link, shown, 10)
    link.update_params({"no_such_thing": 1})
    wait_until(lambda: link.status().last_error != "")
    assert "the engine refused params.no_such_thing" in link.status().last_error


def test_no_engine_is_reported_and_the_link_connects_once_one_starts(make_link, shown):
    link = make_link()
    wait_until(lambda: link.status().engine == "unreachable")
    assert f"no engine answers at {ADDRESS}" in link.status().last_error
    link.offer(frame(10), 1)  # nobody to send it to: nothing breaks

    engine = FakeEngine(ADDRESS)
    offer_until_shown(link, shown, 20)
    assert engine.sessions_opened == 1
    assert link.status().engine == "streaming"


def test_an_engine_killed_mid_stream_is_reported_and_the_stream_resumes_when_it_returns(make_link, shown):
    engine = FakeEngine(ADDRESS)
    link = make_link()
    offer_until_shown(link, shown, 10)

    engine.kill()
    wait_until(lambda: (link.offer(frame(11), 1), link.status().engine == "disconnected")[1])
    assert "stopped answering; reconnecting" in link.status().last_error
    shown_while_away = len(shown.frames)
    wait_until(lambda: (link.offer(frame(11), 1), link.status().not_sent > 0)[1])  # dropped in the client

    engine.start()
    offer_until_shown(link, shown, 30)
    assert len(shown.frames) > shown_while_away
    assert engine.sessions_opened == 2  # the client opened a new session by itself
    assert (shown.frames[-1][..., :3] == 225).all()


def test_parameters_changed_while_the_engine_is_away_reach_it_when_it_is_back(make_link, shown):
    engine = FakeEngine(ADDRESS)
    link = make_link()
    offer_until_shown(link, shown, 10)
    engine.kill()
    link.update_params({"prompt": "a fox"})
    time.sleep(4 * engine_link.DEBOUNCE_S)  # sent into the void, or kept while there is no session
    engine.start()
    offer_until_shown(link, shown, 20)
    wait_until(lambda: engine.hellos[-1]["params"]["prompt"] == "a fox" or {"prompt": "a fox"} in
               engine.params_received)


def test_a_session_the_engine_ended_is_replaced(make_link, shown):
    engine = FakeEngine(ADDRESS)
    link = make_link()
    offer_until_shown(link, shown, 10)
    engine.fail_session(engine.hellos[-1]["session"])
    wait_until(lambda: (link.offer(frame(11), 1), engine.sessions_opened == 2)[1])
    assert "the engine ended the session: out of memory in a step" in link.status().last_error
    offer_until_shown(link, shown, 40)


def test_a_new_session_configuration_replaces_the_session_once_it_settles(make_link, shown):
    engine = FakeEngine(ADDRESS)
    link = make_link()
    offer_until_shown(link, shown, 10)

    for width in (10, 12, 16):  # typed into the width box
        link.update_session(SessionConfig(ADDRESS, "shm", "tiny", width, 6))
    wait_until(lambda: engine.sessions_opened == 2)
    assert engine.hellos[-1]["width"] == 16
    assert engine.sessions_closed == 1
    assert link.session.width == 16
    received_before = len(engine.frames_received)
    link.offer(frame(50), 1)  # captured at the old size, just before the new session: not sent
    wait_until(lambda: (link.offer(frame(60, width=16), 2), len(engine.frames_received) > received_before)[1])
    assert [f.shape[1] for f in engine.frames_received[received_before:]] == [16] * (
        len(engine.frames_received) - received_before)


def test_transport_parameters_go_with_the_session_that_takes_them(make_link, shown):
    engine = FakeEngine(ADDRESS)
    link = make_link(SessionConfig(ADDRESS, "zmq", "tiny", 8, 6, (("fit", "crop"),)))
    offer_until_shown(link, shown, 10)
    assert engine.hellos[0]["transport"] == "zmq"
    assert engine.hellos[0]["params"]["fit"] == "crop"


def test_stop_closes_the_session_and_ends_the_thread(make_link, shown):
    engine = FakeEngine(ADDRESS)
    link = make_link()
    offer_until_shown(link, shown, 10)
    started = time.monotonic()
    link.stop()
    assert time.monotonic() - started < 1
    assert engine.sessions_closed == 1
    assert link.status().engine == "stopped"  # set as the thread ends
