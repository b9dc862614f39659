"""The engine server: host applications open sessions and stream frames through them.

    python -m engine serve --model tiny --bind tcp://127.0.0.1:5555

Two threads, each with one job:

    IO thread   owns the ZeroMQ socket and every shared-memory ring. It answers control
                requests, puts received frames into their session's inbox, sends
                finished frames when they are due, tells a host when its session
                failed, and closes sessions whose host went silent. It never waits on
                the device, so frames keep coming in (and stale ones are dropped) while
                a step runs.
    worker      runs on the device: loads the models, builds pipelines, runs steps
                (engine/worker.py).

An engine-side session (Spout, NDI, Syphon) has a third thread of its own, which reads
its source and publishes to its sinks (engine/endpoints.py says why there). OSC control
(`serve --osc PORT`, engine/osc.py) has one too, which touches no session: it hands
parameter changes to the IO thread through set_params. The main thread starts them
and waits for a stop (Ctrl-C, SIGTERM, or stop()); closing unlinks every
shared-memory segment the engine made. Sessions, their inboxes and outboxes are
described in engine/session.py.

What a host sees (messages as in bridge/protocol.py):

- hello opens a session. The ok payload holds: session (its id), state, model,
  params (the session's parameter values), schema (each parameter's type, bounds and
  whether it applies "live" at the next step, "reload"s the stream, or is taken only
  when the session "open"s), lag_frames and first_chunk_frames (outputs trail inputs
  by lag_frames; the first chunk takes first_chunk_frames, later ones 4, or 8 when
  the scheduler runs a stream without stream batching in chunks of 2 latent frames),
  session_timeout_s, virtualcam (the camera's state, as in stats), and with transport
  "shm" the ring names: the host creates input_ring (its frames, at the hello's size)
  and reads output_ring, which the engine creates.
- Frames go over the session's transport; each output echoes its input's seq and
  t_capture_ns, in the input's pixel format, at the host's size.
- Transport "spout" (Windows): the host sends and receives no frames. The engine reads
  the Spout sender named by the parameter spout_input ("" for the active sender) and
  publishes the outputs, at the hello's size, as the sender spout_output (default
  "StreamDiffusion"). Both are fixed when the session opens. Transports "ndi" and "syphon"
  are the same with ndi_input/ndi_output (an NDI source, as NDI lists it or by its name;
  the output carries each frame's capture time as NDI metadata) and syphon_input/
  syphon_output (macOS); engine/endpoints.py has the one interface they share.
- params changes parameters between steps; the payload says which applied live and
  whether the stream restarts. stats returns the session's state, parameters and
  counters. bye closes the session. shutdown stops the engine as SIGTERM does (bridge/launcher.py
  sends it); only hosts that may send requests at all can send it (see Safety).
- loras (live) names the session's LoRA adapters as [name or path, scale] pairs: a name
  is a file in the engine's LoRA folder (`serve --lora-dir`), anything with a folder in it
  a path on the engine's machine. Each file is read and checked when the params (or hello)
  come, so a broken one is refused at once: error bad_value, field params.loras, naming
  the file and its first offending keys; the session keeps the adapters it had and
  streams on. A new mix applies from the next chunk, without restarting the stream.
- virtualcam (a live parameter; `serve --virtualcam` makes it default to true) also
  sends the session's outputs to a virtual camera. Where none can be opened, the host
  gets an error without an id, code output_unavailable, field params.virtualcam, whose
  message is pyvirtualcam's reason and the fix; the session streams on, and stats'
  virtualcam says the same (state unavailable, reason, fix).
- States: starting, loading (the model is still loading), ready, streaming, error.
- When a step fails the host gets an error without an id, code session_failed, and
  the session is closed.
- A host not heard from for session_timeout_s (no request, ping or frame over ZeroMQ)
  loses its session; hosts streaming over shared memory or Spout keep it with a ping
  or stats.
- `serve --spout-in NAME --spout-out NAME` (or --ndi-in/--ndi-out, --syphon-in/--syphon-out)
  opens such a session in the engine itself, with no host (another kind's --KIND-out
  beside it adds a sink: it publishes there too): its id is its transport
  ("spout", "ndi", "syphon"), no timeout closes it, and any host may change its
  parameters (params) or read its stats, though none may close it. The engine stops
  if that session fails.

Safety:
- The engine binds to loopback unless given keys (ServerKeys, `serve --keys DIR`): then
  only hosts whose public key is in DIR/authorized_clients get through ZeroMQ's CURVE
  handshake, and nobody else reaches the code below at all (bridge/zmq_io.py).
- Limits (Limits, the `serve --max-*` flags) bound what one host can make the engine
  hold: frame size, sessions, prompt length, model size. Each refusal names the field
  and the flag that raises it.
- Starting, the engine removes shared-memory rings whose owner process is gone (an
  engine or host killed outright); closing, it unlinks every ring it made.
- A model that fails to load stops the engine with the reason (serve_forever), rather
  than leave it listening with nothing to serve.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import torch

from bridge import params as table
from bridge.params import MAX_ENDPOINT_NAME_CHARS, MAX_MODEL_SIZE, MAX_PROMPT_CHARS, MAX_SPOUT_NAME_CHARS, OPEN
from bridge.protocol import (
    FORMATS,
    MAX_HEIGHT,
    MAX_MESSAGE_BYTES,
    MAX_WIDTH,
    Bye,
    ErrorCode,
    FrameHeader,
    Hello,
    ParamsUpdate,
    ProtocolError,
    Shutdown,
    StatsRequest,
    ENGINE_SIDE_TRANSPORTS,
    ValueSpec,
    check_params,
)
from bridge.shm import RingReader, RingWriter, reclaim_abandoned_rings, session_ring_names
from bridge.zmq_io import DEFAULT_ADDRESS, EngineSocket, ReceivedFrame, Request, ServerKeys

from .models.lora import LoraLibrary
from .models.lora_files import LoraFileError
from .models.weights import Models
from .session import (PARAMS, TARGETS, InputFrame, Session, applies, apply_params, current_params, session_routes,
                      session_settings, to_rgb)
from .endpoints import EndpointSessionIO, EndpointUnavailable, check_available
from .worker import Worker

log = logging.getLogger(__name__)

DEFAULT_SESSION_TIMEOUT_S = 10.0
POLL_S = 0.002  # IO loop period while sessions are open: shared memory has no wake-up, so it is polled
IDLE_POLL_S = 0.05  # with no session open
REAP_EVERY_S = 0.25  # how often silent hosts are looked for
JOIN_TIMEOUT_S = 10.0  # how long close() waits for a step (or a model load) in progress
ENGINE_SPOUT_SESSION = "spout"  # the id of the session `serve --spout-in/--spout-out` opens
# (that of `serve --ndi-in/--ndi-out` is "ndi", of `--syphon-in/--syphon-out` "syphon": its transport)
MAX_QUEUED_PARAM_CHANGES = 1024  # set_params calls waiting for the IO thread

# Told, on the IO thread, that a session did not take a set_params change: its id, and why.
ParamsRefused = Callable[[str, ProtocolError], None]


@dataclass(frozen=True)
class Limits:
    """What one engine takes at most. The defaults suit one GPU serving a few hosts;
    each is a `serve` flag."""

    max_sessions: int = 8  # --max-sessions
    max_frame_width: int = 3840  # --max-frame-size WxH: the hosts' frames (4K UHD by default)
    max_frame_height: int = 2160
    max_prompt_chars: int = 1000  # --max-prompt-chars
    max_model_size: int = 1024  # --max-model-size: model_width and model_height, the memory that matters

    def __post_init__(self) -> None:
        for name, value, top in (("max_sessions", self.max_sessions, 10_000),
                                 ("max_frame_width", self.max_frame_width, MAX_WIDTH),
                                 ("max_frame_height", self.max_frame_height, MAX_HEIGHT),
                                 ("max_prompt_chars", self.max_prompt_chars, MAX_PROMPT_CHARS),
                                 ("max_model_size", self.max_model_size, MAX_MODEL_SIZE)):
            if not 1 <= value <= top:
                raise ValueError(f"{name} must be from 1 to {top}, got {value}")

    @property
    def max_frame_bytes(self) -> int:
        return self.max_frame_width * self.max_frame_height * max(FORMATS.values())

    def params(self) -> dict[str, ValueSpec]:
        """The session parameter table with this engine's bounds."""
        return {**PARAMS,
                "prompt": replace(PARAMS["prompt"], maximum=self.max_prompt_chars),
                "prompts": replace(PARAMS["prompts"], max_chars=self.max_prompt_chars),
                "model_width": replace(PARAMS["model_width"], maximum=self.max_model_size),
                "model_height": replace(PARAMS["model_height"], maximum=self.max_model_size)}


@dataclass(frozen=True)
class EngineSpoutSession:
    """The session the engine opens for itself over Spout (`serve --spout-in NAME --spout-out
    NAME`), NDI (`--ndi-in/--ndi-out`) or Syphon (`--syphon-in/--syphon-out`): no host, so no
    silent-host timeout; TouchDesigner's, OBS's or any tool's own operators send and show the
    frames. Its id is its transport."""

    input: str = table.PARAMS["spout_input"].default  # --spout-in: the sender read; "" for Spout's active sender
    output: str = table.PARAMS["spout_output"].default  # --spout-out: the sender published
    width: int = 512  # --spout-size: the frames' size, published and fitted to
    height: int = 512
    transport: str = "spout"  # or "ndi", "syphon"
    # More sinks beside its own, as (kind, name): `--ndi-out NAME` beside `--spout-in/--spout-out`
    # also publishes the session as an NDI source.
    extra_outputs: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.transport not in ENGINE_SIDE_TRANSPORTS:
            raise ValueError(f"the engine opens sessions of its own over {', '.join(ENGINE_SIDE_TRANSPORTS)}, "
                             f"not {self.transport}")
        longest = MAX_SPOUT_NAME_CHARS if self.transport == "spout" else MAX_ENDPOINT_NAME_CHARS
        if not self.output:
            raise ValueError(f"--{self.transport}-out needs a name")
        for flag, name in ((f"--{self.transport}-in", self.input), (f"--{self.transport}-out", self.output)):
            if len(name) > longest:
                raise ValueError(f"{flag} takes a name of at most {longest} characters")
        for kind, name in self.extra_outputs:
            if kind not in ENGINE_SIDE_TRANSPORTS or not name or len(name) > MAX_ENDPOINT_NAME_CHARS:
                raise ValueError(f"--{kind}-out takes a name of 1 to {MAX_ENDPOINT_NAME_CHARS} characters")

    @property
    def params(self) -> dict[str, str]:
        return {f"{self.transport}_input": self.input, f"{self.transport}_output": self.output}


EngineVideoSession = EngineSpoutSession  # the name that says what it is now


def process_alive(pid: int) -> bool:
    """Whether the process pid is still running."""
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # ERROR_ACCESS_DENIED: it runs, as another user
        exit_code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(exit_code))
        kernel32.CloseHandle(handle)
        return exit_code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def is_loopback(address: str) -> bool:
    """Whether only this machine can reach a bind address."""
    parts = urlsplit(address)
    return parts.scheme == "ipc" or (parts.scheme == "tcp" and is_loopback_host(parts.hostname or ""))


def is_loopback_host(host: str) -> bool:
    """Whether a host name or address is this machine's loopback (a name other than
    localhost may resolve to any address, so it is not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(address: str, authenticated: bool) -> None:
    """Refuse an address other machines could reach unless hosts must authenticate."""
    if authenticated or is_loopback(address):
        return
    raise ValueError(
        f"--bind {address} reaches beyond this machine, so hosts must authenticate. Create keys with\n"
        "    python -m engine keys --dir KEYS --client NAME\n"
        "then start the engine with --keys KEYS, and give each host KEYS/server.key and its own NAME.key_secret "
        "(EngineClient(..., server_key=..., client_keys=...)). Without keys the engine listens only on "
        "tcp://127.0.0.1:PORT, tcp://localhost:PORT, tcp://[::1]:PORT or ipc://PATH"
    )


class EngineServer:
    """Serves sessions of one model. Binds in the constructor (a taken port fails there);
    start() runs it, stop() asks it to stop, close() stops it and cleans up."""

    def __init__(
        self,
        load_models: Callable[[], Models],
        *,
        model: str,
        address: str = DEFAULT_ADDRESS,
        model_size: tuple[int, int] = (512, 512),
        session_timeout_s: float = DEFAULT_SESSION_TIMEOUT_S,
        limits: Limits = Limits(),
        auth: ServerKeys | None = None,
        session_defaults: Mapping[str, Any] = {},
        spout: EngineSpoutSession | None = None,
        loras: LoraLibrary | None = None,
        ranks: int = 1,
    ):
        """auth: the keys hosts must authenticate with; required unless address is loopback.
        session_defaults: parameter values (bridge/params.py) a new session has unless its
        hello says otherwise, in place of the table's defaults (targets given here count as
        stated by the session, engine/slo.py says why that matters); model_size sets the model's.
        spout: the Spout, NDI or Syphon session to open in the engine itself; raises
        EndpointUnavailable (saying why, and the fix) where its runtime is missing. loras: where the LoRA adapters
        sessions name are read (None: sessions can name none); a default adapter that cannot
        be used raises LoraFileError. ranks: how many pipeline ranks load_models' models run
        the DiT over (engine/parallel/); each adds a stream batch's lag, which hosts are told."""
        check_bind(address, auth is not None)
        self.model = model
        height, width = model_size
        if max(height, width) > limits.max_model_size:
            raise ValueError(f"the model size {height}x{width} is over --max-model-size {limits.max_model_size}")
        self._session_defaults = {**table.defaults(), **session_defaults, "model_width": width,
                                  "model_height": height}
        self._param_specs = limits.params()
        for name, value in session_defaults.items():  # a bad default fails here, not in every hello
            self._param_specs[name].check(name, value)
        self._loras = loras
        self._check_loras(self._session_defaults)
        self._stated_targets = {name: value for name, value in session_defaults.items() if name in TARGETS}
        self._ranks = ranks
        default_settings = replace(session_settings(self._session_defaults), ranks=ranks)  # validates the size
        self._session_timeout_s = session_timeout_s
        self.limits = limits
        if spout is not None:
            for kind in dict.fromkeys([spout.transport, *(kind for kind, _ in spout.extra_outputs)]):
                check_available(kind)
            if spout.width > limits.max_frame_width or spout.height > limits.max_frame_height:
                raise ValueError(f"--{spout.transport}-size {spout.width}x{spout.height} is over --max-frame-size "
                                 f"{limits.max_frame_width}x{limits.max_frame_height}")
        self._engine_spout = spout
        self._spout_io: dict[str, EndpointSessionIO] = {}  # the IO thread's, by session id: Spout, NDI, Syphon
        self._sessions: dict[str, Session] = {}  # changed by the IO thread only
        self._sessions_lock = threading.Lock()  # the worker reads the table from its thread
        # Parameter changes from other threads (OSC), for the IO thread's next turn; past the
        # bound the oldest go, as for a fader newer values matter more.
        self._param_changes: deque[tuple[str | None, dict[str, Any], ParamsRefused]] = deque(
            maxlen=MAX_QUEUED_PARAM_CHANGES)
        self._worker = Worker(load_models, self._open_sessions, warm_up=default_settings, loras=loras)
        self._stopping = threading.Event()
        self.failed = False  # set when a thread died of an unexpected error, or the model did not load
        reclaimed = reclaim_abandoned_rings()
        if reclaimed:
            log.info("removed %d shared-memory segments left by processes that are gone: %s", len(reclaimed),
                     " ".join(reclaimed))
        self._socket = EngineSocket(address, params_schema=self._param_specs, auth=auth,
                                    max_message_bytes=max(limits.max_frame_bytes, MAX_MESSAGE_BYTES))
        self.address = self._socket.address
        self._threads = [
            threading.Thread(target=self._guarded(self._serve_io), name="engine-io", daemon=True),
            threading.Thread(target=self._guarded(lambda: self._worker.run(self._stopping)), name="engine-worker",
                             daemon=True),
        ]
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Ask the engine to stop; safe from a signal handler or any thread."""
        self._stopping.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for a stop; True once one was asked for."""
        return self._stopping.wait(timeout_s)

    def close(self) -> None:
        """Stop, wait for the threads, close every session (unlinking its rings) and the socket."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(JOIN_TIMEOUT_S)
        for session in self._open_sessions():
            self._close_session(session, "the engine is stopping")
        self._socket.close()

    @property
    def load_error(self) -> str | None:
        """Why the model failed to load, once it has."""
        return self._worker.load_error

    @property
    def param_specs(self) -> Mapping[str, ValueSpec]:
        """The session parameters' checks, with this engine's bounds (Limits)."""
        return self._param_specs

    def set_params(self, session_id: str | None, params: Mapping[str, Any], refused: ParamsRefused) -> None:
        """Change session parameters from any thread (OSC, engine/osc.py): checked here, then
        applied by the IO thread at its next turn, between steps, as a host's params request
        is. session_id None means every open session. A session that does not take them (not
        open, or its pipeline refuses a value) goes to refused; the others still get them.
        Raises ProtocolError for a value no session takes."""
        self._param_changes.append((session_id, check_params(params, self._param_specs), refused))

    def serve_forever(self, parent_pid: int | None = None) -> None:
        """Run until Ctrl-C or SIGTERM (call from the main thread), then close. A model
        that fails to load stops the engine too (failed, load_error say why). With
        parent_pid, the engine also stops once that process has ended: an application
        that started it and crashed leaves no engine holding the GPU behind."""
        previous = {sig: signal.signal(sig, lambda *_: self.stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            while not self.wait(0.2):  # a timed wait, so the signal handlers get to run
                if self.load_error is not None:
                    self.failed = True
                    break
                if parent_pid is not None and not process_alive(parent_pid):
                    log.info("the process that started the engine (pid %d) has ended; stopping", parent_pid)
                    break
        finally:
            self.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _guarded(self, target: Callable[[], None]) -> Callable[[], None]:
        """A thread body that stops the whole engine if it fails, rather than leave it half working."""

        def run() -> None:
            try:
                target()
            except BaseException:
                log.exception("the engine stops: %s failed", threading.current_thread().name)
                self.failed = True
                self.stop()

        return run

    def _open_sessions(self) -> list[Session]:
        with self._sessions_lock:
            return list(self._sessions.values())

    # -- IO thread ------------------------------------------------------------------------
    def _serve_io(self) -> None:
        if self._engine_spout is not None:
            self._open_engine_spout_session(self._engine_spout)
        next_reap = time.monotonic()
        while not self._stopping.is_set():
            inbox = self._socket.poll(POLL_S if self._sessions else IDLE_POLL_S)
            for request in inbox.requests:
                self._answer(request)
            self._apply_param_changes()
            for frame in inbox.frames:
                self._take_zmq_frame(frame)
            for rejected in inbox.rejected:
                log.debug("refused a message: %s", rejected.error)  # the host got an error reply
            now_ns = time.monotonic_ns()
            for session in self._open_sessions():
                if session.failure is not None:  # closed (its memory freed) before the host hears of it
                    self._close_session(session, "it failed")
                    self._tell_owner(session, ProtocolError(ErrorCode.SESSION_FAILED, None, session.failure))
                    continue
                if session.transport in ENGINE_SIDE_TRANSPORTS:
                    continue  # its own thread moves its frames
                try:
                    if session.transport == "shm":
                        self._read_input_ring(session)
                    self._send_due_outputs(session, now_ns)
                except Exception as error:  # noqa: BLE001 - one session's frames failing must not stop the others
                    _fail_moving_frames(session, error)
            if time.monotonic() >= next_reap:
                next_reap = time.monotonic() + REAP_EVERY_S
                self._close_silent_sessions()

    def _answer(self, request: Request) -> None:
        handlers = {Hello: self._hello, ParamsUpdate: self._params, StatsRequest: self._stats, Bye: self._bye,
                    Shutdown: self._shutdown}
        try:
            payload = handlers[type(request.message)](request)
        except ProtocolError as error:
            self._socket.reply_error(request, error)
            return
        except Exception as error:  # noqa: BLE001 - a fault handling one request must not end every session
            self._answer_fault(request, error)
            return
        try:
            self._socket.reply_ok(request, payload)
        except Exception as error:  # noqa: BLE001 - a reply that cannot be encoded is a fault of ours too
            self._answer_fault(request, error)

    def _answer_fault(self, request: Request, error: Exception) -> None:
        kind = type(request.message).__name__
        log.exception("handling a %s failed", kind)
        self._socket.reply_error(request, ProtocolError(
            ErrorCode.INTERNAL, None, f"the engine failed to handle this {kind} ({type(error).__name__}: {error}); "
            "it goes on serving: try again, and if it happens again report it with the engine's log"))

    def _hello(self, request: Request) -> dict[str, Any]:
        hello: Hello = request.message
        if hello.model not in (self.model, "default"):
            raise ProtocolError(ErrorCode.MODEL_UNAVAILABLE, "model",
                                f"this engine serves {self.model!r}, not {hello.model!r}; ask for 'default', or "
                                f"start an engine with python -m engine serve --model {hello.model}")
        if self._worker.load_error is not None:
            raise ProtocolError(ErrorCode.MODEL_UNAVAILABLE, "model",
                                f"{self.model} failed to load ({self._worker.load_error}); "
                                "fix that and restart the engine")
        self._check_limits(hello)
        self._refuse_unusable_loras(hello.params)
        if hello.transport in ENGINE_SIDE_TRANSPORTS:
            try:
                check_available(hello.transport)
            except EndpointUnavailable as error:
                title = {"spout": "Spout", "ndi": "NDI", "syphon": "Syphon"}[hello.transport]
                raise ProtocolError(ErrorCode.BAD_VALUE, "transport",
                                    f"this engine cannot take {title} sessions: {error.reason}; {error.fix}") from None
        return self._open_session(secrets.token_hex(8), request.sender, hello.transport, hello.width, hello.height,
                                  hello.prompt, hello.params)

    def _open_engine_spout_session(self, spout: EngineSpoutSession) -> None:
        self._open_session(spout.transport, None, spout.transport, spout.width, spout.height,
                           self._session_defaults["prompt"], spout.params, spout.extra_outputs)

    def _open_session(self, session_id: str, owner: bytes | None, transport: str, width: int, height: int,
                      prompt: str, params: dict[str, Any],
                      extra_outputs: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
        """Open a session and start moving its frames; returns what hello answers. extra_outputs:
        (kind, name) sinks beside an engine-side session's own (engine/endpoints.py)."""
        settings = replace(session_settings({**self._session_defaults, "prompt": prompt}), ranks=self._ranks)
        settings, targets, routes = apply_params(settings, self._stated_targets,
                                                 session_routes(transport, self._session_defaults), params)
        state = "starting" if self._worker.state == "ready" else "loading"
        session = Session(session_id, owner, transport, width, height, settings, targets, routes, state)
        reply = {
            "session": session_id,
            "state": state,
            "model": self.model,
            "params": current_params(settings, targets, routes),
            "schema": {name: {**table.PARAMS[name].describe(), **spec.describe()}  # with this engine's bounds
                       for name, spec in self._param_specs.items()},
            "lag_frames": settings.lag_frames,
            "first_chunk_frames": settings.first_chunk_frames,
            "session_timeout_s": self._session_timeout_s,
        }
        if transport == "shm":
            input_ring, output_ring = session_ring_names(session_id)
            try:
                session.output_ring = RingWriter.create(width, height, "rgba8", name=output_ring)
            except OSError as error:  # shared memory is full
                raise ProtocolError(ErrorCode.TOO_LARGE, "width", str(error)) from None
            reply.update(input_ring=input_ring, output_ring=output_ring)
        with self._sessions_lock:
            self._sessions[session_id] = session
        try:
            if transport in ENGINE_SIDE_TRANSPORTS:
                self._spout_io[session_id] = EndpointSessionIO(session, self._worker.wake,
                                                               extra_outputs=extra_outputs)
                self._spout_io[session_id].start()
            self._worker.wake()
            log.info("session %s opened: %s, %dx%d frames, model at %dx%d", session_id, transport, width, height,
                     settings.width, settings.height)
            self._turn_camera(session)
            reply["virtualcam"] = session.camera.describe()
        except BaseException:
            self._close_session(session, "it failed to open")  # its host never learns its id, nor could close it
            raise
        return reply

    def _turn_camera(self, session: Session) -> None:
        """Open or close the session's virtual camera as its virtualcam parameter says. Where
        none can be opened, the log and the host hear why and the fix; the session streams on."""
        unavailable = session.camera.turn(session.routes["virtualcam"], session.target_fps)
        if unavailable is None:
            return
        message = (f"no virtual camera ({unavailable.reason}); to get one: {unavailable.fix}. "
                   "The session streams on without it")
        log.warning("session %s: %s", session.id, message)
        self._tell_owner(session, ProtocolError(ErrorCode.OUTPUT_UNAVAILABLE, "params.virtualcam", message))

    def _tell_owner(self, session: Session, error: ProtocolError) -> None:
        """Send a session's host an error no request asked about; the engine's own session has none."""
        if session.owner is not None:
            self._socket.notify(session.owner, error)

    def _check_limits(self, hello: Hello) -> None:
        limits = self.limits
        if len(self._sessions) >= limits.max_sessions:
            raise ProtocolError(ErrorCode.TOO_LARGE, None,
                                f"this engine serves at most {limits.max_sessions} sessions at once; close one, "
                                "or start the engine with a larger --max-sessions")
        if hello.width > limits.max_frame_width or hello.height > limits.max_frame_height:
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, "width" if hello.width > limits.max_frame_width else "height",
                                f"this engine takes frames up to {limits.max_frame_width}x{limits.max_frame_height}, "
                                f"not {hello.width}x{hello.height}; send smaller frames, or start the engine with "
                                "a larger --max-frame-size")
        if len(hello.prompt) > limits.max_prompt_chars:
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, "prompt",
                                f"the prompt is {len(hello.prompt)} characters; this engine takes at most "
                                f"{limits.max_prompt_chars} (--max-prompt-chars)")

    def _params(self, request: Request) -> dict[str, Any]:
        message: ParamsUpdate = request.message
        return self._change_params(self._owned_session(request.sender, message.session, shared=True), message.params)

    def _apply_param_changes(self) -> None:
        """Apply what set_params queued, in order."""
        while self._param_changes:
            session_id, params, refused = self._param_changes.popleft()
            if session_id is None:
                sessions = self._open_sessions()
            elif session_id in self._sessions:
                sessions = [self._sessions[session_id]]
            else:
                refused(session_id, ProtocolError(ErrorCode.UNKNOWN_SESSION, "session",
                                                  f"no session {session_id!r:.80} is open"))
                continue
            for session in sessions:
                try:
                    self._change_params(session, params)
                except ProtocolError as error:
                    refused(session.id, error)
                except Exception:  # noqa: BLE001 - as for a host's request: the engine serves on
                    log.exception("session %s: changing its parameters failed", session.id)

    def _change_params(self, session: Session, params: Mapping[str, Any]) -> dict[str, Any]:
        """Apply checked parameters to a session between steps; returns what params answers."""
        for name in params:
            if applies(name) == OPEN and name in session.routes:
                raise ProtocolError(ErrorCode.BAD_VALUE, f"params.{name}",
                                    f"{name} is fixed when a session opens; open a new session to change it")
        self._refuse_unusable_loras(params)
        settings, targets, routes = apply_params(session.settings, session.targets, session.routes, params)
        restarts = session.change(settings, targets, routes)
        if "virtualcam" in params:
            self._turn_camera(session)
        self._worker.wake()
        return {
            "params": current_params(settings, targets, routes),
            "restarts": restarts,  # a reload parameter changed: the stream starts over (lag and first chunk again)
            "lag_frames": settings.lag_frames,
            "first_chunk_frames": settings.first_chunk_frames,
            "virtualcam": session.camera.describe(),
        }

    def _check_loras(self, params: Mapping[str, Any]) -> None:
        """Read and check every LoRA file params name (into the library, where the worker takes
        them from); raises LoraFileError naming the file and its first offending keys."""
        loras = params.get("loras")
        if not loras:
            return
        if self._loras is None:
            raise LoraFileError(loras[0][0], ["this engine reads no LoRA adapters (it was made without a library)"])
        self._loras.check(loras)

    def _refuse_unusable_loras(self, params: Mapping[str, Any]) -> None:
        """_check_loras, for a host: a file that cannot be used is a bad value of params.loras."""
        try:
            self._check_loras(params)
        except LoraFileError as error:
            raise ProtocolError(ErrorCode.BAD_VALUE, "params.loras", str(error)) from None

    def _stats(self, request: Request) -> dict[str, Any]:
        stats = self._owned_session(request.sender, request.message.session, shared=True).stats()
        # The engine's device memory, for hosts (and bench/soak.py) watching it over hours.
        stats["device_memory_allocated"] = torch.cuda.memory_allocated() if torch.cuda.is_initialized() else None
        stats["lora_memory_bytes"] = self._loras.nbytes() if self._loras is not None else 0  # every session's
        return stats

    def _bye(self, request: Request) -> dict[str, Any]:
        session = self._owned_session(request.sender, request.message.session)
        self._close_session(session, "the host said bye")
        return {"session": session.id}

    def _shutdown(self, request: Request) -> dict[str, Any]:
        """Stop as SIGTERM does: answered first, then serve_forever closes everything."""
        log.info("a host asked the engine to stop (a shutdown request); stopping")
        self.stop()
        return {}

    def _owned_session(self, sender: bytes, session_id: str, *, shared: bool = False) -> Session:
        """The sender's session; with shared, the engine's own Spout session too (it has no host)."""
        session = self._sessions.get(session_id)
        if session is None or (session.owner != sender and not (shared and session.owner is None)):
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, "session",
                                f"no session {session_id!r} on this connection; open one with hello")
        return session

    def _take_zmq_frame(self, frame: ReceivedFrame) -> None:
        header = frame.header
        try:
            session = self._owned_session(frame.sender, header.session)
            _check_size(session, header.width, header.height)
        except ProtocolError as error:
            self._socket.reply_error(frame, error)
            return
        try:
            ready = session.put(InputFrame(to_rgb(frame.pixels, header.format), header.format, header.seq,
                                           header.t_capture_ns), frame.dropped)
        except Exception as error:  # noqa: BLE001 - one session's frames failing must not stop the others
            _fail_moving_frames(session, error)
            return
        if ready:
            self._worker.wake()

    def _read_input_ring(self, session: Session) -> None:
        if session.input_ring is None:
            try:
                session.input_ring = RingReader.attach(session_ring_names(session.id)[0])
            except FileNotFoundError:
                return  # the host has not made it yet
            except ProtocolError as error:
                if error.field != "magic":  # e.g. the host's bridge writes another ring layout version
                    session.fail(f"the input ring is unusable: {error.message}")
                return  # no magic yet: the host is still making the ring
        ring = session.input_ring
        try:
            frame = ring.read_latest()
            if frame is not None:
                _check_size(session, ring.width, ring.height)
        except ProtocolError as error:  # the host's ring: a frame block or a frame it refuses, or another size
            if session.bad_ring_generation != ring.writer_generation:  # told once per frame block, not per frame
                session.bad_ring_generation = ring.writer_generation
                self._socket.notify(session.owner, error)
            return
        if frame is not None and session.put(InputFrame(to_rgb(frame.pixels, ring.format), ring.format, frame.seq,
                                                        frame.t_capture_ns)):
            self._worker.wake()

    def _send_due_outputs(self, session: Session, now_ns: int) -> None:
        while (output := session.due_output(now_ns)) is not None:
            if session.transport == "shm":
                ring = session.output_ring
                if ring.format != output.format:
                    try:
                        ring.resize(session.width, session.height, output.format)
                    except OSError as error:  # shared memory is full
                        session.fail(f"cannot make the output ring: {error}")
                        return
                ring.write_in_place(output.write_pixels, output.seq, output.t_capture_ns)  # no copy of its own
            else:
                header = FrameHeader(session=session.id, seq=output.seq, t_capture_ns=output.t_capture_ns,
                                     width=session.width, height=session.height, format=output.format)
                if not self._socket.send_frame(session.owner, header, output.pixels):
                    return  # the host's queue is full; the frame waits for room (or a newer chunk)
            session.camera.submit(output)
            session.output_sent(output)

    def _close_silent_sessions(self) -> None:
        silent = set(self._socket.forget_silent_peers(self._session_timeout_s))
        closed = False
        for session in self._open_sessions():
            if session.owner in silent:
                self._close_session(session, f"its host was silent for {self._session_timeout_s:g} s")
                closed = True
        if closed:  # a host killed outright, its resource tracker with it, leaves its input ring behind
            for segment in reclaim_abandoned_rings():
                log.info("removed shared-memory segment %s: its owner process is gone", segment)

    def _close_session(self, session: Session, reason: str) -> None:
        with self._sessions_lock:
            self._sessions.pop(session.id, None)
        session.close()
        spout_io = self._spout_io.pop(session.id, None)
        if spout_io is not None:
            spout_io.stop()  # its thread closes its source and sinks
        session.camera.close()
        if session.owner is None and not self._stopping.is_set():
            log.error("the engine stops: its own %s session closed because %s", session.transport,
                      session.failure or reason)
            self.failed = True
            self.stop()
        if session.input_ring is not None:
            session.input_ring.close()
        if session.output_ring is not None:
            session.output_ring.close()  # unlinks it
        self._worker.wake()  # to free the session's pipeline
        log.info("session %s closed: %s", session.id, reason)


def _fail_moving_frames(session: Session, error: Exception) -> None:
    log.exception("session %s: moving its frames failed", session.id)
    session.fail(f"the engine could not move this session's frames ({type(error).__name__}: {error}); "
                 "open a new session")


def _check_size(session: Session, width: int, height: int) -> None:
    if (width, height) != (session.width, session.height):
        raise ProtocolError(ErrorCode.SIZE_MISMATCH, "width",
                            f"this session takes {session.width}x{session.height} frames, as its hello said; "
                            f"got {width}x{height}. Open a new session for another size")
