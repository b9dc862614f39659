"""One contract for every engine-side video endpoint (engine/endpoints.py): Spout, Syphon,
NDI and the virtual camera pass the same tests.

    open       a source or sink opens on the thread that uses it
    frames     a source gives each new frame once, in order, at its own size; a sink
               publishes each frame it is sent, in order
    size       a source follows its sender to another size; a sink publishes a new size
    vanish     a source whose sender goes away gives nothing and waits; when it is back
               (at whatever size) its frames come again
    close      bounded in time, and no thread is left behind
    missing    where the runtime is missing, open() says why and what to do about it

Each endpoint meets the other side as it would for real: Spout a fake SpoutGL
(tests/fake_spoutgl.py), Syphon a fake syphon-python (tests/fake_syphon.py), the virtual
camera a fake pyvirtualcam backend (tests/test_virtualcam.py's), and NDI the real NDI
runtime (cyndilib's libndi) inside a private loopback network (tests/ndi_network.py), where
the other application is a cyndilib sender or receiver in this process. NDI compresses
(SpeedHQ, 4:2:2), so its frames are compared within a tolerance; frames are flat colours,
one per frame, so that which frame arrived shows through it. NDI connects asynchronously,
so a frame not seen within RESEND_S is sent again: order is judged on the frames that
arrive, repeats of one frame counted once.
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
import time

import numpy as np
import pytest

import ndi_network
from bridge import params as table
from engine.endpoints import (EndpointSessionIO, EndpointUnavailable, NdiSink, NdiSource, SpoutSink, SpoutSource,
                              SyphonSink, SyphonSource, VirtualCameraSink, check_available)
from engine.pipeline import StreamSettings
from engine.session import OutputFrame, Session, session_routes
from fake_spoutgl import DXGI_ORDER, FakeSpoutMachine, convert
from fake_syphon import MTL_RGBA8, FakeSyphonMachine
from processes import PATIENCE_S
from test_virtualcam import fake_pyvirtualcam

pytestmark = pytest.mark.timeout(120)

SIZE = (48, 32)  # width, height: not square, so a swap shows
OTHER_SIZE = (32, 64)
RESEND_S = 0.5  # NDI: a frame not seen by then is sent again (the receiver may still be connecting)
CLOSE_BOUND_S = 2.0  # closing an endpoint, or stopping a session's thread, takes at most this


def flat(index: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """Frame `index`: one colour, far from the others' (each channel at least 30 levels apart)."""
    width, height = size
    colour = [(40 + 60 * index) % 240, (200 - 45 * index) % 240, (90 + 75 * index) % 240]
    return np.broadcast_to(np.array(colour, np.uint8), (height, width, 3)).copy()


def rgba(rgb: np.ndarray) -> np.ndarray:
    return np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=-1)


def output(rgb: np.ndarray, fmt: str, seq: int) -> OutputFrame:
    now = time.monotonic_ns()
    return OutputFrame(rgb, fmt, seq, now, now)


# ------------------------------------------------------------------------ the other side of each


class Spout:
    kind, has_source, tolerance, named_in_fix = "spout", True, 0, "Spout"

    def __init__(self, monkeypatch, tmp_path):
        self.machine = FakeSpoutMachine(tmp_path / "spout")
        self.monkeypatch = monkeypatch
        monkeypatch.setitem(sys.modules, "SpoutGL", self.machine.module())

    def source(self, name):
        return SpoutSource(name)

    def sink(self, name, size):
        return SpoutSink(name)

    def publish(self, name, rgb):
        self.machine.publish(name, rgba(rgb))

    def vanish(self, name):
        self.machine.close_sender(name)

    def published(self, name):
        texture = self.machine.senders.get(name)
        return None if texture is None else convert(texture.pixels, DXGI_ORDER[texture.dxgi_format], "RGB")

    def remove_runtime(self):
        self.monkeypatch.setitem(sys.modules, "SpoutGL", None)

    def close(self):
        pass


class Syphon:
    kind, has_source, tolerance, named_in_fix = "syphon", True, 0, "Syphon"

    def __init__(self, monkeypatch, tmp_path):
        self.machine = FakeSyphonMachine(tmp_path / "syphon")
        self.monkeypatch = monkeypatch
        self.machine.install(monkeypatch)

    def source(self, name):
        return SyphonSource(name)

    def sink(self, name, size):
        return SyphonSink(name)

    def publish(self, name, rgb):
        self.machine.share(name, rgba(rgb), MTL_RGBA8)

    def vanish(self, name):
        self.machine.retire(name)

    def published(self, name):
        latest = self.machine.latest(name)
        if latest is None:
            return None
        pixels, flipped, _ = latest
        assert flipped  # Syphon keeps OpenGL's bottom-up rows: published flipped
        return pixels[..., :3]

    def remove_runtime(self):
        self.monkeypatch.setitem(sys.modules, "syphon", None)

    def close(self):
        pass


class Ndi:
    """The real runtime; the other application is a cyndilib sender or receiver in this process."""

    kind, has_source, tolerance, named_in_fix = "ndi", True, 12, "cyndilib"

    def __init__(self, monkeypatch, tmp_path):
        from bridge.ndi import NdiReceiver, NdiSender

        self._sender_type, self._receiver_type = NdiSender, NdiReceiver
        self.monkeypatch = monkeypatch
        self.senders, self.receivers, self.latest = {}, {}, {}

    def source(self, name):
        return NdiSource(name)

    def sink(self, name, size):
        return NdiSink(name, fps=30)

    def publish(self, name, rgb):
        if name not in self.senders:
            self.senders[name] = self._sender_type(name, fps=30)
        self.senders[name].send(rgba(rgb), "rgba8")

    def vanish(self, name):
        self.senders.pop(name).close()

    def published(self, name):
        if name not in self.receivers:
            self.receivers[name] = self._receiver_type(name, format="rgb8", receiver_name="contract test")
        while (frame := self.receivers[name].receive()) is not None:
            self.latest[name] = frame.pixels
        return self.latest.get(name)

    def remove_runtime(self):
        self.monkeypatch.setitem(sys.modules, "cyndilib", None)

    def close(self):
        for endpoint in [*self.senders.values(), *self.receivers.values()]:
            endpoint.close()
        self.senders, self.receivers = {}, {}


class VirtualCamera:
    kind, has_source, tolerance, named_in_fix = "virtualcam", False, 0, "pyvirtualcam"

    def __init__(self, monkeypatch, tmp_path):
        self.module = fake_pyvirtualcam([])
        self.monkeypatch = monkeypatch
        monkeypatch.setitem(sys.modules, "pyvirtualcam", self.module)

    def sink(self, name, size):
        return VirtualCameraSink(*size, fps=60)

    def published(self, name):
        cameras = [camera for camera in self.module.cameras if camera.sent]
        return cameras[-1].sent[-1][1] if cameras else None

    def remove_runtime(self):
        self.monkeypatch.setitem(sys.modules, "pyvirtualcam", None)

    def close(self):
        pass


BACKENDS = {"spout": Spout, "syphon": Syphon, "ndi": Ndi, "virtualcam": VirtualCamera}
SOURCES = [kind for kind, backend in BACKENDS.items() if backend.has_source]


@pytest.fixture(scope="module")
def ndi_environment(tmp_path_factory):
    """A private NDI network for this module, its environment in os.environ while it runs."""
    try:
        import cyndilib  # noqa: F401
    except ImportError as error:
        pytest.skip(f"cyndilib is not installed ({error}): pip install .[ndi]")
    why = ndi_network.missing()
    if why is not None:
        pytest.skip(f"no private NDI network here: {why}")
    with ndi_network.NdiNetwork.start(tmp_path_factory.mktemp("ndi")) as network:
        before = {name: os.environ.get(name) for name in network.environment()}
        os.environ.update(network.environment())
        yield
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def backend(request, monkeypatch, tmp_path):
    if request.param == "ndi":
        request.getfixturevalue("ndi_environment")
    other_side = BACKENDS[request.param](monkeypatch, tmp_path)
    yield other_side
    other_side.close()


def sources(kinds=SOURCES):
    return pytest.mark.parametrize("backend", kinds, indirect=True)


every_endpoint = pytest.mark.parametrize("backend", list(BACKENDS), indirect=True)


def name() -> str:
    return f"contract-{secrets.token_hex(3)}"  # NDI remembers sources a while: each test its own


def same(got: np.ndarray, expected: np.ndarray, tolerance: int) -> bool:
    return got.shape == expected.shape and int(np.abs(got.astype(int) - expected).max()) <= tolerance


def which(got: np.ndarray, sent: list[np.ndarray], tolerance: int) -> int | None:
    """The index of the sent frame `got` is."""
    return next((index for index, frame in enumerate(sent) if same(got, frame, tolerance)), None)


def receive_each(backend, source, called: str, frames: list[np.ndarray]) -> list:
    """Publish each frame as `called` and take it from the source; every frame received, in turn."""
    got = []
    for index, rgb in enumerate(frames):
        deadline = time.monotonic() + PATIENCE_S
        backend.publish(called, rgb)
        resend = time.monotonic() + RESEND_S
        while True:
            frame = source.receive()
            if frame is not None:
                got.append(frame)
                if same(frame.rgb, rgb, backend.tolerance):
                    break
            if time.monotonic() > resend:
                backend.publish(called, rgb)
                resend = time.monotonic() + RESEND_S
            assert time.monotonic() < deadline, f"frame {index} never came through {backend.kind}"
            time.sleep(0.002)
    return got


def assert_in_order(got: list, frames: list[np.ndarray], tolerance: int) -> None:
    indices = [which(frame.rgb, frames, tolerance) for frame in got]
    assert None not in indices, "a frame came that was never sent"
    assert [index for n, index in enumerate(indices) if n == 0 or index != indices[n - 1]] == list(range(len(frames)))
    stamps = [frame.t_capture_ns for frame in got]
    assert stamps == sorted(stamps) and stamps[-1] <= time.monotonic_ns()  # on the sessions' clock


def publish_each(backend, sink, called: str, frames: list[np.ndarray]) -> None:
    """Send each frame through the sink and wait until the other side has it."""
    for seq, rgb in enumerate(frames):
        deadline = time.monotonic() + PATIENCE_S
        sink.send(output(rgb, sink.format, seq))
        resend = time.monotonic() + RESEND_S
        while (seen := backend.published(called)) is None or not same(seen, rgb, backend.tolerance):
            if time.monotonic() > resend:
                sink.send(output(rgb, sink.format, seq))
                resend = time.monotonic() + RESEND_S
            assert time.monotonic() < deadline, f"frame {seq} never came out of {backend.kind}"
            time.sleep(0.002)


def nothing_for(source, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert source.receive() is None
        time.sleep(0.01)


def threads_settle(before: set[threading.Thread]) -> set[threading.Thread]:
    """Threads still alive that were not before, once given CLOSE_BOUND_S to end."""
    deadline = time.monotonic() + CLOSE_BOUND_S
    while (left := set(threading.enumerate()) - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


# ------------------------------------------------------------------------------------ sources


@sources()
def test_a_source_gives_each_new_frame_once_in_order_at_its_own_size(backend):
    called, frames = name(), [flat(index) for index in range(4)]
    source = backend.source(called)
    source.open()
    try:
        got = receive_each(backend, source, called, frames)
        assert_in_order(got, frames, backend.tolerance)
        assert {frame.rgb.shape for frame in got} == {(SIZE[1], SIZE[0], 3)}
        nothing_for(source, 0.2)  # nothing new was sent
    finally:
        source.close()


@sources()
def test_a_source_follows_its_sender_to_another_size(backend):
    called = name()
    frames = [flat(0), flat(1), flat(2, OTHER_SIZE), flat(3, OTHER_SIZE)]
    source = backend.source(called)
    source.open()
    try:
        got = receive_each(backend, source, called, frames)
        assert_in_order(got, frames, backend.tolerance)
        assert got[-1].rgb.shape == (OTHER_SIZE[1], OTHER_SIZE[0], 3)
    finally:
        source.close()


@sources()
def test_a_source_whose_sender_vanishes_waits_and_takes_it_back_at_any_size(backend):
    called = name()
    source = backend.source(called)
    source.open()
    try:
        first = receive_each(backend, source, called, [flat(0), flat(1)])
        backend.vanish(called)
        nothing_for(source, 0.5)  # gone: nothing, and no error
        back = [flat(2, OTHER_SIZE), flat(3, OTHER_SIZE)]
        again = receive_each(backend, source, called, back)
        assert_in_order(again, back, backend.tolerance)
        assert first[-1].t_capture_ns < again[0].t_capture_ns
    finally:
        source.close()


# -------------------------------------------------------------------------------------- sinks


@every_endpoint
def test_a_sink_publishes_each_frame_in_order_and_follows_a_size_change(backend):
    called = name()
    sink = backend.sink(called, SIZE)
    sink.open()
    try:
        publish_each(backend, sink, called, [flat(0), flat(1), flat(2)])
        publish_each(backend, sink, called, [flat(3, OTHER_SIZE), flat(4, OTHER_SIZE)])
        assert backend.published(called).shape == (OTHER_SIZE[1], OTHER_SIZE[0], 3)
    finally:
        sink.close()


# ------------------------------------------------------------------------------------- closing


@every_endpoint
def test_closing_is_bounded_and_leaves_no_thread(backend):
    before = set(threading.enumerate())
    called = name()
    endpoints = []
    if backend.has_source:
        source = backend.source(called + "-in")
        source.open()
        endpoints.append(source)
        receive_each(backend, source, called + "-in", [flat(0)])
    sink = backend.sink(called, SIZE)
    sink.open()
    endpoints.append(sink)
    publish_each(backend, sink, called, [flat(1)])
    started = time.monotonic()
    for endpoint in reversed(endpoints):
        endpoint.close()
    assert time.monotonic() - started < CLOSE_BOUND_S
    backend.close()  # the other side's too, which this test made
    assert not threads_settle(before)


@sources()
def test_a_sessions_thread_over_the_endpoint_moves_frames_and_stops_in_bounded_time(backend):
    """EndpointSessionIO, the thread a session of this transport has: frames in, then stop."""
    before = set(threading.enumerate())
    kind = backend.kind
    routes = {**session_routes(kind, table.defaults()), f"{kind}_input": name(), f"{kind}_output": name()}
    session = Session("s1", None, kind, *SIZE, StreamSettings(height=32, width=32), {}, routes, "ready")
    endpoint_io = EndpointSessionIO(session, lambda: None)
    endpoint_io.start()
    try:
        deadline = time.monotonic() + PATIENCE_S
        while session.stats()["frames_in"] < 2:
            assert session.failure is None, session.failure
            assert time.monotonic() < deadline, "no frame reached the session"
            backend.publish(routes[f"{kind}_input"], flat(0, OTHER_SIZE))  # fitted to the session's size
            time.sleep(0.05)
    finally:
        session.close()
        started = time.monotonic()
        endpoint_io.stop()
        stopped_in = time.monotonic() - started
    assert stopped_in < CLOSE_BOUND_S and not endpoint_io.is_alive()
    assert session.failure is None
    assert not threads_settle(before)


# ------------------------------------------------------------------------ a missing runtime


@every_endpoint
def test_without_its_runtime_opening_says_why_and_what_to_do(backend):
    backend.remove_runtime()
    endpoints = [backend.sink(name(), SIZE)]
    if backend.has_source:
        endpoints.append(backend.source(name()))
    for endpoint in endpoints:
        with pytest.raises(EndpointUnavailable) as caught:
            endpoint.open()
        assert caught.value.reason and caught.value.fix
        assert backend.named_in_fix in f"{caught.value.reason} {caught.value.fix}"
        endpoint.close()  # closing what never opened is harmless
    if backend.has_source:  # a host asking for such a session is refused with the same words
        with pytest.raises(EndpointUnavailable) as refused:
            check_available(backend.kind)
        assert refused.value.reason == caught.value.reason and refused.value.fix == caught.value.fix
