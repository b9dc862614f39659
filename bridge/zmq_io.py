"""ZeroMQ transport for control messages and frames between hosts and the engine.

The engine binds one ROUTER socket (EngineSocket); each host connects one DEALER
(HostSocket). Two kinds of message travel over the pair:

    control   one part: an encoded protocol message (a request, or a reply)
    frame     two parts: an encoded FrameHeader, then the raw pixel bytes

How it behaves:
- Latest frame wins. Every queue is QUEUE_DEPTH messages deep, a sender drops a frame
  rather than wait when its queue is full, and a receiver drains everything that has
  arrived and keeps only the newest frame per sender and session, counting the rest
  as dropped. (ZMQ_CONFLATE would keep only the newest message, but it cannot carry
  multipart messages.) TCP buffers can still hold a few frames between the queues, so
  receive from a loop that does little else (an IO thread owning the socket): a
  receiver that only looks between long GPU steps gets frames that waited there.
- Requests carry an id and replies echo it. A host waits for its own id, with a
  timeout, and discards replies to requests it has given up on, so a peer restarting
  mid-request never leaves the two sides out of step, as strict REQ/REP would.
- The DEALER reconnects by itself after the engine restarts. ZMQ_IMMEDIATE keeps it
  from queueing messages while no engine is connected, so a restarted engine never
  receives stale frames or requests.
- Liveness: a host pings the engine (HostSocket.ping, a request with a timeout), or
  posts requests without waiting (HostSocket.post) and watches HostSocket.last_heard;
  the engine answers pings itself and notes when it last heard from each host
  (EngineSocket.forget_silent_peers). Dead TCP connections are found by the kernel's
  TCP keepalive, not by ZMTP heartbeats: libzmq 4.3.5 aborts the whole process
  (assertion `!_io_error`) when a heartbeat times out on a peer that was stopped for
  longer than the timeout and then resumes, which a paused engine or host must survive.
- ZeroMQ sockets are not thread-safe: use each object from one thread only.

Authentication (CURVE): an engine that hosts on other machines can reach must know
who they are. It gets ServerKeys (its key pair and a folder of the client public keys
it accepts) and each host gets ClientKeys (the engine's public key and its own key
pair). ZeroMQ's CURVE then encrypts the connection and the engine's authenticator
thread (zmq.auth) turns away any client whose key is not in the folder before a single
message of it reaches the engine. make_keys writes the key files (`python -m engine
keys`); keys are given as those files or as their Z85 text.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
import zmq.utils.z85
from zmq.utils.monitor import recv_monitor_message

from .protocol import (
    MAX_FRAME_BYTES,
    PARAM_SPECS,
    REPLY_TYPES,
    REQUEST_TYPES,
    ErrorCode,
    ErrorReply,
    FrameHeader,
    Message,
    Ok,
    Ping,
    ProtocolError,
    ValueSpec,
    check_pixels,
    decode_frame_header,
    decode_message,
    encode_frame_header,
    encode_message,
    frame_array,
)

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"  # loopback only; wider binds need authentication
ZMQ_TRANSPORTS = ("tcp", "ipc", "inproc", "ws", "wss", "pgm", "epgm", "tipc", "vmci", "udp")
QUEUE_DEPTH = 2  # messages queued per peer and direction (ZeroMQ high-water marks)
MAX_MESSAGES_PER_POLL = 256  # so a flooding peer cannot keep a receive call busy forever
MAX_UNSENT_REPLIES = 1024
MAX_NOTICES = 64

_TCP_KEEPALIVE_IDLE_S = 10  # an idle TCP connection is probed after this long ...
_TCP_KEEPALIVE_INTERVAL_S = 2  # ... every this often, and dropped after 5 unanswered probes
_RECONNECT_MS = 100
_RECONNECT_MAX_MS = 1000
_AUTH_CHECK_S = 0.05  # how often a waiting request looks for a failed handshake

SERVER_KEY_NAME = "server"  # <dir>/server.key (give to hosts) and server.key_secret (the engine's alone)
AUTHORIZED_CLIENTS_DIR = "authorized_clients"  # <dir>/authorized_clients/<name>.key: the hosts the engine accepts
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

log = logging.getLogger(__name__)


def check_address(address: str, name: str = "address") -> str:
    """The address, if ZeroMQ can take it; else a ValueError that shows how to write it
    (ZeroMQ itself says only "Invalid argument"). name: how the user gave it (--bind)."""
    transport, separator, rest = address.partition("://")
    if not separator:
        raise ValueError(f"{name} {address} has no transport: ZeroMQ addresses start with tcp:// (or ipc:// for a "
                         f"socket file); write tcp://{address}")
    if transport not in ZMQ_TRANSPORTS or not rest:
        raise ValueError(f"{name} {address} is not a ZeroMQ address: write tcp://HOST:PORT, such as "
                         f"{DEFAULT_ADDRESS}, or ipc://PATH")
    return address


class RemoteError(ProtocolError):
    """The engine answered a request with an error reply."""


class AuthenticationError(ConnectionError):
    """The engine turned our keys away (or we expected CURVE and it does not speak it)."""


# ------------------------------------------------------------------------- keys

KeySource = Union[str, bytes, os.PathLike]  # Z85 key text, or a .key / .key_secret file


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 characters
    secret: bytes


@dataclass(frozen=True)
class ServerKeys:
    """What an engine needs for CURVE: its key pair, and the folder of client public keys it accepts."""

    keys: KeyPair
    authorized_clients: Path

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> ServerKeys:
        """The keys make_keys wrote into directory."""
        directory = Path(directory)
        keys = load_key_pair(directory / f"{SERVER_KEY_NAME}.key_secret")
        clients = directory / AUTHORIZED_CLIENTS_DIR
        if not clients.is_dir() or not any(clients.glob("*.key")):
            raise FileNotFoundError(f"{clients} holds no client public keys (*.key), so no host could connect; "
                                    f"add one with python -m engine keys --dir {directory} --client NAME")
        return cls(keys, clients)


@dataclass(frozen=True)
class ClientKeys:
    """What a host needs for CURVE: the engine's public key and its own key pair."""

    server_public: bytes
    keys: KeyPair

    @classmethod
    def load(cls, server_key: KeySource, client_keys: KeySource | tuple[KeySource, KeySource]) -> ClientKeys:
        """server_key: the engine's public key (server.key or its text); client_keys: this
        host's <name>.key_secret file, or its (public, secret) key texts."""
        if isinstance(client_keys, tuple):
            pair = KeyPair(_key_text(client_keys[0], "client_keys[0]"), _key_text(client_keys[1], "client_keys[1]"))
        else:
            pair = load_key_pair(client_keys)
        return cls(load_public_key(server_key), pair)


class AuthorizedClients:
    """The client public keys in a folder, as they are at each handshake: a key added
    (python -m engine keys --client NAME) or removed takes effect at the next connection,
    without restarting the engine. The folder holds a few small files and hosts connect
    rarely, so it is simply read again each time."""

    def __init__(self, folder: Path):
        self.folder = folder

    def callback(self, domain: str, client_key: bytes) -> bool:
        """zmq.auth's question: may the client with this (Z85) public key connect?"""
        return client_key in self.keys()

    def keys(self) -> set[bytes]:
        keys = set()
        for path in self.folder.glob("*.key"):
            try:
                keys.add(zmq.auth.load_certificate(path)[0])
            except (OSError, ValueError):  # being written, or not a key file: not a key
                continue
        return keys


def make_keys(directory: str | os.PathLike, client: str | None = "client") -> dict[str, Path]:
    """Write CURVE key files into directory, readable by their owner only.

    The engine's pair (server.key, server.key_secret) is made once and kept after that;
    with client, a client pair <client>.key and <client>.key_secret is made as well and
    its public key copied into authorized_clients/, so the engine accepts it. Returns
    the paths it wrote. An existing client name is refused rather than overwritten.
    """
    directory = Path(directory)
    clients = directory / AUTHORIZED_CLIENTS_DIR
    clients.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    written: dict[str, Path] = {}
    server_public = directory / f"{SERVER_KEY_NAME}.key"
    if not server_public.exists():
        public, secret = zmq.auth.create_certificates(directory, SERVER_KEY_NAME)
        written.update(server_public=Path(public), server_secret=Path(secret))
    if client is not None:
        if not client.replace("-", "").replace("_", "").isalnum() or client == SERVER_KEY_NAME:
            raise ValueError(f"a client name is letters, digits, - and _ (and not {SERVER_KEY_NAME!r}); got {client!r}")
        if (directory / f"{client}.key").exists():
            raise FileExistsError(f"{directory / client}.key exists already; choose another --client name")
        public, secret = zmq.auth.create_certificates(directory, client)
        authorized = clients / f"{client}.key"
        shutil.copyfile(public, authorized)
        written.update(client_public=Path(public), client_secret=Path(secret), authorized=authorized)
    for path in written.values():
        os.chmod(path, 0o600)
    return written


def load_public_key(key: KeySource) -> bytes:
    """A public key from its Z85 text or from a .key or .key_secret file."""
    if _is_key_text(key):
        return _key_text(key, "key")
    public, _ = _read_certificate(key)
    return public


def load_key_pair(path: str | os.PathLike) -> KeyPair:
    """A key pair from a .key_secret file (which holds both halves)."""
    public, secret = _read_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds only a public key; give the .key_secret file beside it")
    return KeyPair(public, secret)


def _read_certificate(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    path = Path(os.fsdecode(path))
    if not path.is_file():
        raise FileNotFoundError(f"no key file at {path}; create keys with python -m engine keys --dir DIR")
    try:
        return zmq.auth.load_certificate(path)
    except ValueError as error:
        raise ValueError(f"{path} is not a ZeroMQ key file ({error}); create keys with python -m engine keys") from None


def _is_key_text(key: KeySource) -> bool:
    return isinstance(key, (str, bytes)) and len(key) == 40 and not os.path.exists(os.fsdecode(key))


def _key_text(key: KeySource, name: str) -> bytes:
    text = key.encode("ascii") if isinstance(key, str) else key
    if not isinstance(text, bytes) or len(text) != 40:
        raise ValueError(f"{name} must be a 40-character Z85 key or a key file, got {key!r:.60}")
    try:
        zmq.utils.z85.decode(text)
    except (ValueError, KeyError):
        raise ValueError(f"{name} is not Z85 text: {key!r:.60}") from None
    return text


@dataclass(frozen=True)
class Request:
    """A request from a host, for the engine to answer with reply_ok or reply_error."""

    sender: bytes  # the host's identity on the engine's socket
    message: Message


@dataclass(frozen=True)
class ReceivedFrame:
    header: FrameHeader
    pixels: np.ndarray  # [height, width, channels] view of the received bytes, no copy
    dropped: int = 0  # older frames of the same sender and session discarded for this one
    sender: bytes | None = None  # the host's identity (engine side); None on the host side


@dataclass(frozen=True)
class Rejected:
    """A message the engine refused; the error reply has already been sent."""

    sender: bytes
    error: ProtocolError


@dataclass
class Inbox:
    """What one EngineSocket.poll took in."""

    requests: list[Request] = field(default_factory=list)
    frames: list[ReceivedFrame] = field(default_factory=list)  # the newest per sender and session
    rejected: list[Rejected] = field(default_factory=list)


class EngineSocket:
    """The engine's end: serves many hosts, each known by its identity (bytes)."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        params_schema: Mapping[str, ValueSpec] = PARAM_SPECS,
        context: zmq.Context | None = None,
        auth: ServerKeys | None = None,
        max_message_bytes: int = MAX_FRAME_BYTES,
    ):
        """With auth, only hosts holding a key in auth.authorized_clients can connect.
        max_message_bytes: a host sending a larger message part is disconnected."""
        check_address(address)
        self._params_schema = params_schema
        self._context = context or zmq.Context()
        self._owns_context = context is None
        self._socket = self._context.socket(zmq.ROUTER)
        self._authenticator: ThreadAuthenticator | None = None
        _configure(self._socket, max_message_bytes)
        # Report full queues and departed hosts to us instead of dropping silently.
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            if auth is not None:
                self._require_keys(auth)
            self._socket.bind(address)
        except zmq.ZMQError:  # e.g. the port is taken: another engine is running there
            self.close()
            raise
        self.address: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)  # with the real port
        self._last_heard: dict[bytes, float] = {}
        # Replies waiting for room in a host's queue (it may be full of frames).
        self._unsent: deque[tuple[bytes, bytes]] = deque(maxlen=MAX_UNSENT_REPLIES)

    def _require_keys(self, auth: ServerKeys) -> None:
        # The authenticator answers ZeroMQ's handshake requests (ZAP) from a thread of
        # its own; it must run before the socket binds, so no connection slips past it.
        self._authenticator = ThreadAuthenticator(self._context, log=log)
        self._authenticator.start()
        self._authenticator.configure_curve_callback(domain="*",
                                                     credentials_provider=AuthorizedClients(auth.authorized_clients))
        self._socket.curve_server = True
        self._socket.curve_publickey = auth.keys.public
        self._socket.curve_secretkey = auth.keys.secret

    def poll(self, timeout_s: float) -> Inbox:
        """Wait up to timeout_s for messages, then take everything that has arrived.

        Pings are answered here. Bad messages are answered with an error reply and
        listed in inbox.rejected; they never stop the messages after them.
        """
        self._send_unsent()
        inbox = Inbox()
        if not self._socket.poll(_ms(timeout_s), zmq.POLLIN):
            return inbox
        newest: dict[tuple[bytes, str], ReceivedFrame] = {}
        for _ in range(MAX_MESSAGES_PER_POLL):
            try:
                sender, *body = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            sender = sender.bytes
            self._last_heard[sender] = time.monotonic()
            try:
                self._take(sender, body, inbox, newest)
            except ProtocolError as error:
                inbox.rejected.append(Rejected(sender, error))
                self._send_reply(sender, ErrorReply.from_error(error, error.request_id))
        inbox.frames = list(newest.values())
        return inbox

    def _take(self, sender: bytes, body: list, inbox: Inbox, newest: dict) -> None:
        if len(body) == 1:
            message = decode_message(body[0].bytes, self._params_schema)
            if isinstance(message, Ping):
                self._send_reply(sender, Ok(id=message.id))
            elif isinstance(message, REQUEST_TYPES):
                inbox.requests.append(Request(sender, message))
            else:
                raise ProtocolError(ErrorCode.UNKNOWN_TYPE, "type", f"hosts send requests, not {message.TYPE!r}")
        elif len(body) == 2:
            header = decode_frame_header(body[0].bytes)
            pixels = frame_array(header, body[1].buffer)  # checks the size first
            older = newest.get((sender, header.session))
            dropped = 0 if older is None else older.dropped + 1
            newest[(sender, header.session)] = ReceivedFrame(header, pixels, dropped, sender)
        else:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, None, f"expected 1 part (control) or 2 (frame header, pixels), got {len(body)}"
            )

    def reply_ok(self, request: Request, payload: Mapping[str, Any] | None = None) -> None:
        """Answer a request with success. Never blocks."""
        self._send_reply(request.sender, Ok(payload or {}, id=request.message.id))

    def reply_error(self, to: Request | ReceivedFrame, error: ProtocolError) -> None:
        """Answer a request, or report a problem with a frame, with an error. Never blocks."""
        request_id = to.message.id if isinstance(to, Request) else None
        self._send_reply(to.sender, ErrorReply.from_error(error, request_id))

    def notify(self, recipient: bytes, error: ProtocolError) -> None:
        """Tell a host about a problem no request of its asked about (its session
        failed, say): an error reply without an id. Never blocks."""
        self._send_reply(recipient, ErrorReply.from_error(error))

    def send_frame(self, recipient: bytes, header: FrameHeader, pixels: np.ndarray) -> bool:
        """Send a frame to a host without copying it; don't modify pixels afterwards.

        Returns False, dropping the frame, when the host's queue is full (latest
        wins: a newer frame will follow) or the host has gone.
        """
        pixels = check_pixels(header, pixels)
        try:
            self._socket.send_multipart([recipient, encode_frame_header(header), pixels], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        except zmq.ZMQError as error:
            if error.errno == zmq.EHOSTUNREACH:
                return False
            raise
        return True

    def forget_silent_peers(self, timeout_s: float) -> list[bytes]:
        """Identities of hosts not heard from in timeout_s, which are then forgotten."""
        cutoff = time.monotonic() - timeout_s
        silent = [peer for peer, heard in self._last_heard.items() if heard < cutoff]
        for peer in silent:
            del self._last_heard[peer]
        return silent

    def _send_reply(self, recipient: bytes, reply: Ok | ErrorReply) -> None:
        self._unsent.append((recipient, encode_message(reply)))
        self._send_unsent()

    def _send_unsent(self) -> None:
        """Send queued replies in order; those for a host whose queue is full wait."""
        waiting: list[tuple[bytes, bytes]] = []
        full: set[bytes] = set()
        while self._unsent:
            recipient, data = self._unsent.popleft()
            if recipient in full:
                waiting.append((recipient, data))
                continue
            try:
                self._socket.send_multipart([recipient, data], zmq.NOBLOCK)
            except zmq.Again:
                full.add(recipient)
                waiting.append((recipient, data))
            except zmq.ZMQError as error:
                if error.errno != zmq.EHOSTUNREACH:  # a departed host's replies go with it
                    raise
        self._unsent.extend(waiting)

    def close(self, linger_s: float = 0.0) -> None:
        """Close the socket. linger_s > 0 gives queued replies (say, to a last bye) up to
        that long to go out before close returns; by default they are dropped."""
        if linger_s > 0:
            self._send_unsent()
        self._socket.close(linger=_ms(linger_s))
        if self._authenticator is not None:
            self._authenticator.stop()
        if self._owns_context:
            self._context.term()  # returns once lingering messages are out

    def __enter__(self) -> EngineSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class HostSocket:
    """A host's end: requests with timeouts, frames out, newest frame in."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, context: zmq.Context | None = None,
                 auth: ClientKeys | None = None):
        """With auth, the connection uses CURVE: the engine must hold auth.keys.public
        among its authorized clients, and must itself own auth.server_public."""
        self.address = check_address(address)
        self._context = context or zmq.Context()
        self._owns_context = context is None
        self._socket = self._context.socket(zmq.DEALER)
        _configure(self._socket)
        self._authenticates = auth is not None
        if auth is not None:
            self._socket.curve_serverkey = auth.server_public
            self._socket.curve_publickey = auth.keys.public
            self._socket.curve_secretkey = auth.keys.secret
        # Failed handshakes (refused keys, or keys on one side only) are otherwise
        # silent: the engine would just seem absent.
        self._handshake_events = self._socket.get_monitor_socket(_HANDSHAKE_FAILED)
        self._socket.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing while no engine is connected
        self._socket.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_MS)
        self._socket.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_MAX_MS)
        self._socket.connect(address)
        self._request_ids = itertools.count(1)
        self._awaited_id: int | None = None  # the request now waiting for its reply
        self._reply: Ok | ErrorReply | None = None
        self._posted_ids: deque[int] = deque(maxlen=MAX_NOTICES)  # posted requests whose replies we keep
        self._newest_frame: ReceivedFrame | None = None
        self._notices: deque[Message] = deque(maxlen=MAX_NOTICES)
        self.last_heard: float | None = None  # time.monotonic() of the engine's last message

    def request(self, message: Message, timeout_s: float = 5.0) -> dict:
        """Send a request and return the payload of its ok reply.

        Raises RemoteError when the engine answers with an error, and TimeoutError when
        no answer comes within timeout_s (engine not running, restarting, or busy).
        Frames arriving meanwhile are kept for recv_latest_frame (the newest only).
        """
        request_id = next(self._request_ids)
        data = encode_message(dataclasses.replace(message, id=request_id))
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._socket.send(data, zmq.NOBLOCK)
                break
            except zmq.Again:  # no engine connected (yet), or the queue to it is full
                self.check_authentication()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"cannot reach the engine at {self.address}; is it running?") from None
                self._socket.poll(_ms(min(remaining, _AUTH_CHECK_S)), zmq.POLLOUT)
        self._awaited_id, self._reply = request_id, None
        try:
            while self._reply is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.check_authentication()
                    raise TimeoutError(f"no reply from the engine at {self.address} within {timeout_s} s")
                # In slices, so that a refused handshake is reported without waiting out the timeout.
                if not self._socket.poll(_ms(min(remaining, _AUTH_CHECK_S)), zmq.POLLIN):
                    self.check_authentication()
                    continue
                self._receive_available()
        finally:
            self._awaited_id = None
        reply, self._reply = self._reply, None
        if isinstance(reply, ErrorReply):
            raise RemoteError(reply.code, reply.field, reply.message)
        return dict(reply.payload)

    def post(self, message: Message) -> int | None:
        """Send a request without waiting for its reply; never blocks.

        Returns the request's id, or None when it could not go (no engine connected,
        or the queue to it is full). Its reply comes back through take_notices.
        """
        request_id = next(self._request_ids)
        try:
            self._socket.send(encode_message(dataclasses.replace(message, id=request_id)), zmq.NOBLOCK)
        except zmq.Again:
            return None
        self._posted_ids.append(request_id)
        return request_id

    def check_authentication(self) -> None:
        """Raise AuthenticationError if a handshake with the engine has failed."""
        while self._handshake_events.poll(0, zmq.POLLIN):
            event = recv_monitor_message(self._handshake_events)
            if not event["event"] & _HANDSHAKE_FAILED:
                continue
            if not self._authenticates:
                raise AuthenticationError(
                    f"the engine at {self.address} requires keys: pass server_key (its server.key) and "
                    "client_keys (this host's NAME.key_secret, made by python -m engine keys --client NAME)")
            raise AuthenticationError(
                    f"the engine at {self.address} refused our keys (CURVE handshake failed): check that its "
                    "public key is the server key you gave, and that our public key is in its authorized_clients "
                    "folder (python -m engine keys --dir DIR --client NAME adds one; restart the engine after)")

    def ping(self, timeout_s: float = 2.0) -> float:
        """Round-trip time to the engine in seconds; TimeoutError if it does not answer."""
        start = time.perf_counter()
        self.request(Ping(), timeout_s)
        return time.perf_counter() - start

    def send_frame(self, header: FrameHeader, pixels: np.ndarray) -> bool:
        """Send a frame without copying it; don't modify pixels afterwards.

        Returns False, dropping the frame, when the queue to the engine is full or no
        engine is connected (latest wins: send the next frame when it comes).
        """
        pixels = check_pixels(header, pixels)
        try:
            self._socket.send_multipart([encode_frame_header(header), pixels], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def recv_latest_frame(self, timeout_s: float) -> ReceivedFrame | None:
        """The newest frame from the engine, waiting up to timeout_s for one; None if none came.

        Older frames that arrived since the last call are discarded and counted in
        ReceivedFrame.dropped.
        """
        deadline = time.monotonic() + timeout_s
        self._receive_available()
        while self._newest_frame is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._socket.poll(_ms(remaining), zmq.POLLIN):
                break
            self._receive_available()
        frame, self._newest_frame = self._newest_frame, None
        return frame

    def take_notices(self) -> list[Message]:
        """Messages the engine sent unasked (e.g. an error about a frame) and replies to
        posted requests, oldest first, up to MAX_NOTICES of the newest.

        Everything that has arrived is taken in first (newer frames included, for
        recv_latest_frame).
        """
        self._receive_available()
        notices = list(self._notices)
        self._notices.clear()
        return notices

    def _receive_available(self) -> None:
        for _ in range(MAX_MESSAGES_PER_POLL):
            try:
                parts = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.last_heard = time.monotonic()
            try:
                self._take(parts)
            except ProtocolError as error:
                log.warning("dropped a bad message from the engine at %s: %s", self.address, error)

    def _take(self, parts: list) -> None:
        if len(parts) == 2:
            header = decode_frame_header(parts[0].bytes)
            pixels = frame_array(header, parts[1].buffer)
            older = self._newest_frame
            self._newest_frame = ReceivedFrame(header, pixels, 0 if older is None else older.dropped + 1)
        elif len(parts) == 1:
            message = decode_message(parts[0].bytes)
            if message.id is None or message.id in self._posted_ids:
                self._notices.append(message)
            elif message.id == self._awaited_id and isinstance(message, REPLY_TYPES):
                self._reply = message
            # Otherwise it answers a request we gave up on: drop it.
        else:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, None, f"expected 1 or 2 message parts, got {len(parts)}")

    def close(self) -> None:
        self._socket.disable_monitor()
        self._handshake_events.close(linger=0)
        self._socket.close(linger=0)
        if self._owns_context:
            self._context.term()

    def __enter__(self) -> HostSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _configure(socket: zmq.Socket, max_message_bytes: int = MAX_FRAME_BYTES) -> None:
    """Options both ends share."""
    socket.setsockopt(zmq.LINGER, 0)  # closing never waits on undelivered messages
    socket.setsockopt(zmq.SNDHWM, QUEUE_DEPTH)
    socket.setsockopt(zmq.RCVHWM, QUEUE_DEPTH)
    socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)  # a peer sending a bigger part is disconnected
    socket.setsockopt(zmq.TCP_KEEPALIVE, 1)
    socket.setsockopt(zmq.TCP_KEEPALIVE_IDLE, _TCP_KEEPALIVE_IDLE_S)
    socket.setsockopt(zmq.TCP_KEEPALIVE_INTVL, _TCP_KEEPALIVE_INTERVAL_S)
    socket.setsockopt(zmq.TCP_KEEPALIVE_CNT, 5)


def _ms(seconds: float) -> int:
    return max(0, math.ceil(seconds * 1000))
