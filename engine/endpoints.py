"""Engine-side video endpoints: where a session's frames come from and go to besides its host.

A session whose transport is "spout", "ndi" or "syphon" takes no frames from its host:
the engine reads them from a source and publishes the stylised frames to its sinks. All
of them are one interface:

    Source   frames in, with their own clock and size: open(), receive() -> SourceFrame or
             None (never waits long), close(). A frame of another size than the session's
             is fitted to it as the session's `fit` says; a source that vanishes returns
             None until it is back, at whatever size.
    Sink     frames out: open(), send(output) (the session paces outputs: each goes when it
             is due, at the cadence its input was captured), close().

Both raise EndpointUnavailable (reason and fix) from open() where their runtime is missing;
the server refuses such a session at hello with that reason and the fix. Any other
exception fails the session, which says why.

Which thread: each such session has one thread of its own (EndpointSessionIO), which
opens its source and then its sinks, moves frames, and closes the sinks and then the
source; nothing else touches them. That is what Spout needs (its OpenGL context belongs
to the thread that made it, and the receiver's serves the sender too: see bridge/spout.py),
what Syphon's Metal objects and NDI's receiver are happy with, and it keeps reading back,
fitting and converting frames off the IO thread (which serves every other host) and off
the worker. stop() waits for the thread a bounded time (JOIN_TIMEOUT_S): a driver that
hangs holds up the IO thread no longer, and its thread closes the endpoints when it returns.

The thread polls, as the IO thread polls shared-memory rings: neither Spout nor NDI's
frame synchroniser has a wake-up that works for every sender.

Timestamps: a source's frame carries when it was captured (NDI: its sender's stamp, or when
it was submitted; Spout and Syphon: when it was read), on time.monotonic_ns as every
session's latencies are; a sink that can carry it (NDI) sends the output's capture time
back out, so a host downstream measures glass to glass.

A session has one source and any number of sinks: its transport's own, any extra ones
(`serve --spout-in A --spout-out B --ndi-out C` also publishes the Spout session as an NDI
source), and the virtual camera, VirtualCameraSink, which any session (of any transport)
turns on and off live with its `virtualcam` parameter (engine/camera.py). The camera is
not owned by the session's thread: it is opened and closed by the IO thread, as its
parameter changes, and its send() only hands the frame to bridge.virtualcam's own pacing
thread, so whichever thread sends a session's outputs sends them to it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from .pipeline import fit_to

if TYPE_CHECKING:
    from .session import OutputFrame, Session

log = logging.getLogger(__name__)

POLL_S = 0.002  # between looks at the source while it has no new frame
# How long stop() waits for the thread to close its endpoints: milliseconds normally; a
# driver that hangs holds up the IO thread (every other session) no longer than this.
JOIN_TIMEOUT_S = 1.0


class EndpointUnavailable(RuntimeError):
    """An endpoint's runtime is missing here: `reason` says why, `fix` what to do."""

    def __init__(self, reason: str, fix: str):
        self.reason, self.fix = reason, fix
        super().__init__(f"{reason}. {fix}")


@dataclass(frozen=True)
class SourceFrame:
    rgb: np.ndarray  # [height, width, 3] uint8, at the source's own size
    t_capture_ns: int  # time.monotonic_ns when it was captured


class Source:
    """Frames in. Made anywhere; opened, used and closed on the session's thread."""

    kind = "source"
    name = ""

    def open(self) -> None:
        raise NotImplementedError

    def receive(self) -> SourceFrame | None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Sink:
    """Frames out. Made anywhere; opened, used and closed on the session's thread."""

    kind = "sink"
    name = ""
    format = "rgba8"  # the protocol format outputs are best made in for it

    def open(self) -> None:
        raise NotImplementedError

    def send(self, output: OutputFrame) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


# ------------------------------------------------------------------------------ Spout


def _unavailable(error: Exception) -> EndpointUnavailable:
    return EndpointUnavailable(error.reason, error.fix)  # the bindings' own *Unavailable errors


class SpoutSource(Source):
    kind = "spout"

    def __init__(self, name: str):
        self.name = name
        self._receiver = None

    def open(self) -> None:
        from bridge.spout import SpoutReceiver, SpoutUnavailable

        try:
            self._receiver = SpoutReceiver(self.name, format="rgb8")
        except SpoutUnavailable as error:
            raise _unavailable(error) from None

    def receive(self) -> SourceFrame | None:
        rgb = self._receiver.receive()
        return None if rgb is None else SourceFrame(rgb, time.monotonic_ns())

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.close()


class SpoutSink(Sink):
    kind = "spout"
    format = "bgra8"  # Spout's own texture format (DXGI B8G8R8A8): the driver has nothing to reorder

    def __init__(self, name: str):
        self.name = name
        self._sender = None

    def open(self) -> None:
        from bridge.spout import SpoutSender, SpoutUnavailable

        try:
            self._sender = SpoutSender(self.name)
        except SpoutUnavailable as error:
            raise _unavailable(error) from None

    def send(self, output: OutputFrame) -> None:
        self._sender.send(output.pixels, output.format)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()


# ------------------------------------------------------------------------------ Syphon


class SyphonSource(Source):
    kind = "syphon"

    def __init__(self, name: str):
        self.name = name
        self._receiver = None

    def open(self) -> None:
        from bridge.syphon import SyphonReceiver, SyphonUnavailable

        try:
            self._receiver = SyphonReceiver(self.name, format="rgb8")
        except SyphonUnavailable as error:
            raise _unavailable(error) from None

    def receive(self) -> SourceFrame | None:
        rgb = self._receiver.receive()
        return None if rgb is None else SourceFrame(np.ascontiguousarray(rgb), time.monotonic_ns())

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.close()


class SyphonSink(Sink):
    kind = "syphon"

    def __init__(self, name: str):
        self.name = name
        self._sender = None

    def open(self) -> None:
        from bridge.syphon import SyphonSender, SyphonUnavailable

        try:
            self._sender = SyphonSender(self.name)
        except SyphonUnavailable as error:
            raise _unavailable(error) from None

    def send(self, output: OutputFrame) -> None:
        self._sender.send(output.pixels, output.format)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()


# ------------------------------------------------------------------------------ NDI


class NdiSource(Source):
    kind = "ndi"

    def __init__(self, name: str):
        self.name = name
        self._receiver = None

    def open(self) -> None:
        from bridge.ndi import NdiReceiver, NdiUnavailable

        try:
            self._receiver = NdiReceiver(self.name, format="rgb8", receiver_name="sdbridge engine")
        except NdiUnavailable as error:
            raise _unavailable(error) from None

    def receive(self) -> SourceFrame | None:
        from bridge.ndi import epoch_to_monotonic_ns

        frame = self._receiver.receive()
        if frame is None:
            return None
        # Never in the future (another machine's clock ahead of ours): that would hide latency.
        return SourceFrame(frame.pixels, min(epoch_to_monotonic_ns(frame.t_capture_ns), time.monotonic_ns()))

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.close()


class NdiSink(Sink):
    kind = "ndi"

    def __init__(self, name: str, fps: float = 30.0):
        self.name, self.fps = name, fps
        self._sender = None

    def open(self) -> None:
        from bridge.ndi import NdiSender, NdiUnavailable

        try:
            self._sender = NdiSender(self.name, fps=self.fps)
        except NdiUnavailable as error:
            raise _unavailable(error) from None

    def send(self, output: OutputFrame) -> None:
        from bridge.ndi import monotonic_to_epoch_ns

        self._sender.send(output.pixels, output.format, t_capture_ns=monotonic_to_epoch_ns(output.t_capture_ns),
                          seq=output.seq)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()


# ------------------------------------------------------------------------------ the virtual camera


class VirtualCameraSink(Sink):
    """The virtual camera as a sink. send() never waits: bridge.virtualcam's own thread
    paces the frames out at `fps`. A frame of another size reopens the camera at that size.
    Any session's camera is one of these (engine/camera.py), turned on and off live."""

    kind = "virtualcam"

    def __init__(self, width: int, height: int, fps: float, **options):
        self.width, self.height, self.fps, self._options = width, height, fps, options
        self.name = options.get("backend") or "virtual camera"
        self.camera = None  # bridge.virtualcam.VirtualCamera, while open

    def open(self) -> None:
        from bridge.virtualcam import VirtualCameraUnavailable, open_virtual_camera

        try:
            opened = open_virtual_camera(self.width, self.height, self.fps, **self._options)
        except (ValueError, TypeError) as error:  # a backend's own argument checks
            raise EndpointUnavailable(f"{type(error).__name__}: {error}",
                                      "the camera backend refused this size or frame rate: open the session at "
                                      "another size or target_fps") from None
        if isinstance(opened, VirtualCameraUnavailable):
            raise EndpointUnavailable(opened.reason, opened.fix)
        self.camera = opened

    def send(self, output: OutputFrame) -> None:
        camera = self.camera  # one read: another thread may close it meanwhile, and then submit refuses
        if camera is None:
            return
        height, width = output.rgb.shape[:2]
        if (width, height) != (self.width, self.height):  # a camera has one size: open it again at the new one
            self.close()
            self.width, self.height = width, height
            self.open()
            camera = self.camera
        camera.submit(output.pixels, output.format)

    def close(self) -> None:
        camera, self.camera = self.camera, None
        if camera is not None:
            camera.close()


# ------------------------------------------------------------------------------ a session's endpoints


def sink_for(kind: str, name: str, fps: float) -> Sink:
    """The sink that publishes a session's frames as `name` over `kind` (spout, ndi, syphon)."""
    sinks = {"spout": lambda: SpoutSink(name), "ndi": lambda: NdiSink(name, fps), "syphon": lambda: SyphonSink(name)}
    if kind not in sinks:
        raise ValueError(f"{kind!r} has no engine-side sink")
    return sinks[kind]()


def endpoints_for(transport: str, routes: dict, target_fps: float,
                  extra_outputs: Sequence[tuple[str, str]] = ()) -> tuple[Source, list[Sink]]:
    """The source and sinks a session of this transport has, by its routes; extra_outputs,
    (kind, name) pairs, add sinks beside its own (its frames also out as an NDI source, say)."""
    sources = {"spout": SpoutSource, "ndi": NdiSource, "syphon": SyphonSource}
    if transport not in sources:
        raise ValueError(f"transport {transport!r} has no engine-side endpoints")
    source = sources[transport](routes[f"{transport}_input"])
    own = sink_for(transport, routes[f"{transport}_output"], target_fps)
    return source, [own, *(sink_for(kind, name, target_fps) for kind, name in extra_outputs)]


def check_available(transport: str) -> None:
    """Raise EndpointUnavailable where this machine cannot serve sessions of this transport."""
    from bridge.ndi import NdiUnavailable, load_cyndilib
    from bridge.spout import SpoutUnavailable, load_spoutgl
    from bridge.syphon import SyphonUnavailable, load_syphon

    loaders = {"spout": (load_spoutgl, SpoutUnavailable), "ndi": (load_cyndilib, NdiUnavailable),
               "syphon": (load_syphon, SyphonUnavailable)}
    load, unavailable = loaders[transport]
    try:
        load()
    except unavailable as error:
        raise _unavailable(error) from None


class EndpointSessionIO:
    """Moves a session's frames between its source and sinks on a thread of its own: start(),
    then stop() when the session closes. A failure fails the session (the IO thread then
    closes it). Sinks beyond the first are extra outputs (another NDI source, say)."""

    def __init__(self, session: Session, frames_ready: Callable[[], None], source: Source | None = None,
                 sinks: Sequence[Sink] | None = None, extra_outputs: Sequence[tuple[str, str]] = ()):
        """frames_ready: called when the session's next chunk is complete (the worker's wake).
        source and sinks: by default those of the session's transport and routes, and a sink
        for each of extra_outputs' (kind, name) pairs."""
        if source is None or sinks is None:
            source, sinks = endpoints_for(session.transport, session.routes, session.target_fps, extra_outputs)
        self._session = session
        self._frames_ready = frames_ready
        self.source, self.sinks = source, list(sinks)
        self._stopping = threading.Event()
        self._next_seq = 0
        self._thread = threading.Thread(target=self._run, name=f"{session.transport}-{session.id}", daemon=True)

    @property
    def output_format(self) -> str:
        return self.sinks[0].format if self.sinks else "rgba8"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait (bounded) for the thread to close the endpoints."""
        self._stopping.set()
        self._thread.join(JOIN_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("session %s: %s has not answered for %.0f s; its endpoints close when it does",
                        self._session.id, _title(self.source.kind), JOIN_TIMEOUT_S)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        session = self._session
        opened: list = []
        try:
            # The source first and closed last: Spout's receiver makes the GL context its sender works in.
            for endpoint in (self.source, *self.sinks):
                endpoint.open()
                opened.append(endpoint)
            log.info("session %s: reading %s %r, publishing %s", session.id, self.source.kind,
                     self.source.name or "(the first/active one)",
                     ", ".join(f"{sink.kind} {sink.name!r}" for sink in self.sinks))
            self._move_frames()
        except EndpointUnavailable as error:
            session.fail(f"{_title(self.source.kind)} is unavailable ({error.reason}); {error.fix}")
        except Exception as error:  # noqa: BLE001 - ends only this session, which says why
            log.exception("session %s: %s failed", session.id, _title(self.source.kind))
            session.fail(f"{_title(self.source.kind)} failed ({type(error).__name__}: {error}); open a new session")
        finally:
            for endpoint in reversed(opened):
                try:
                    endpoint.close()
                except Exception:  # noqa: BLE001 - the others still close
                    log.exception("session %s: closing %s %r failed", session.id, endpoint.kind, endpoint.name)

    def _move_frames(self) -> None:
        session = self._session
        while not self._stopping.is_set() and session.is_active():
            frame = self.source.receive()
            if frame is not None:
                self._take(frame)
            while (output := session.due_output(time.monotonic_ns())) is not None:
                for sink in self.sinks:
                    sink.send(output)
                session.camera.submit(output)
                session.output_sent(output)
            if frame is None:
                self._stopping.wait(POLL_S)

    def _take(self, frame: SourceFrame) -> None:
        from .session import InputFrame

        session = self._session
        fitted = fit_frame(frame.rgb, session.width, session.height, session.settings.fit)
        if session.put(InputFrame(fitted, self.output_format, self._next_seq, frame.t_capture_ns)):
            self._frames_ready()
        self._next_seq += 1


def _title(kind: str) -> str:
    return {"spout": "Spout", "ndi": "NDI", "syphon": "Syphon", "virtualcam": "the virtual camera"}.get(kind, kind)


def fit_frame(rgb: np.ndarray, width: int, height: int, fit: str) -> np.ndarray:
    """An [h, w, 3] uint8 frame fitted to height x width as `fit` says (crop, letterbox,
    stretch); the frame itself when it has that size already."""
    if rgb.shape[:2] == (height, width):
        return rgb
    with torch.no_grad():
        pixels = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255
        fitted = fit_to(pixels, height, width, fit)[0]
        return (fitted.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).contiguous().numpy()
