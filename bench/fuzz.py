"""Fuzz the engine's protocol while a healthy session streams through it.

    .venv/bin/python bench/fuzz.py [--inputs 100000] [--seconds 1800] [--rate 300] [--seed 0] [--fps 4]

Starts `python -m engine serve --model tiny --size 32x32` (bridge/launcher.py) and opens a
healthy session: an EngineClient over shared memory streaming a test pattern at --fps. A
second engine with a session of its own streams alike and is never fuzzed: the control,
which shows what this machine drops meanwhile. Then it sends generated inputs (seeded), at
up to --rate a second (--rate 0: a flood, as fast as the engine takes them), to the first:

  zmq   over plain DEALER sockets, one per kind of input, so that each reply counts
        against the kind that caused it:
        random bytes       single parts of random bytes
        malformed msgpack  truncated, bit-flipped or padded requests; length claims up to
                           4 GiB (str, bin, array, map, ext); deep nesting; maps with
                           non-string keys; top levels that are not maps
        wrong types        requests whose fields or parameters hold values of the wrong
                           type or range
        unknown types      unknown message types, replies sent as requests, fields missing
        other sessions     requests and frames naming the healthy session or none at all
        oversized          messages over 64 KiB, params over 64 entries, prompts over the
                           limit, and (every HUGE_PART_EVERY-th) a part over the engine's
                           largest frame, on a connection of its own, which the engine drops
        lying frames       frame headers that lie about width, height, stride or format
                           against the pixel bytes, huge size claims, wrong part counts,
                           honest frames of another size than the session's
  shm   a session whose input ring lies (forged after bridge/shm.py's layout): frames with
        negative or backward seq and times, slots left locked, write and publish counts
        that lie, frame blocks whose header lies about magic, generation, width, height,
        format, stride or slots or that are shorter than they claim, generations that
        point nowhere, control blocks of another layout version; each forged state is one
        input, and a session the engine gives up on is opened again.

No input is a shutdown request: any host on this machine may stop the engine that way.

Figures: inputs sent and error replies received, per kind; the error codes; engine
crashes (its process died, or it did not answer a ping within PING_PATIENCE_S; target 0);
the healthy session's frames lost: frames it sent during the fuzz that never came back
(once its stream has moved past them), beyond those of the control session meanwhile,
which are this machine's normal drops (stale frames, frames replaced in a ring: latest
wins; a busy machine has more); target 0. And outputs it got of frames it never sent
(another session's; target 0).

Loopback only; bounded by --inputs and --seconds. A measurement, never a pass/fail test.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import threading
import time
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import msgpack
import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from bridge.client import EngineClient  # noqa: E402
from bridge.launcher import EngineProcess, EngineStartError  # noqa: E402
from bridge.params import PARAMS  # noqa: E402
from bridge.protocol import (MAX_MESSAGE_BYTES, PROTOCOL_VERSION, ErrorReply, Ok,  # noqa: E402
                             decode_message)
from bridge.shm import RING_VERSION, session_ring_names  # noqa: E402
# The ring's own layout, to forge rings that lie in any field.
from bridge.shm import _CONTROL, _CONTROL_MAGIC, _FRAMES_HEADER, _FRAMES_MAGIC, _SLOT, _frame_block_layout  # noqa: E402
from bridge.zmq_io import HostSocket  # noqa: E402
from engine.cli import test_pattern  # noqa: E402

HOST_SIZE = 32
ENGINE_ARGS = ["--size", f"{HOST_SIZE}x{HOST_SIZE}", "--max-sessions", "16"]
LARGEST_FRAME_BYTES = 3840 * 2160 * 4  # the engine's default --max-frame-size, in its widest format
HEALTHY_LATENCY_MS = 10_000.0  # a budget the healthy stream keeps on a busy machine: drops would be load, not fuzz
PATIENCE_S = 60.0  # generous, for a busy machine: a reply, a session opening, the stream settling
PING_EVERY_S = 1.0
PING_PATIENCE_S = 15.0  # an engine that does not answer a ping for this long has hung: a crash
SETTLE_S = 5.0  # after the first outputs, before the fuzz: a stream's start drops frames by design
HUGE_PART_EVERY = 500  # of the oversized inputs
KEEPALIVE_S = 1.0  # the fuzzing peers keep their sessions open (the engine closes silent ones)
HONEST_SHARE = 0.05  # of the lying ring's inputs: more would load the engine with steps, which is not the test
LIES_PER_SESSION = 200  # then the lying ring's session is replaced: a ring the engine never attaches stays useless
OWN_REQUEST_IDS = 2**62  # and up: the peers' own requests (hello, keep-alive, bye), whose replies are not counted
FOREIGN_SEQ = 10**15  # seqs of frames the fuzz sends in the healthy session's name: far past any it sends

ZMQ_KINDS = {  # kind: share of the inputs
    "random bytes": 0.12,
    "malformed msgpack": 0.20,
    "wrong types": 0.20,
    "unknown types": 0.08,
    "other sessions": 0.05,
    "oversized": 0.05,
    "lying frames": 0.20,
}
SHM_KIND = "lying ring"
KINDS = {**ZMQ_KINDS, SHM_KIND: 0.10}


# ------------------------------------------------------------------------ generated values


class Generator:
    """Seeded inputs: valid requests to start from, and values of every wrong kind."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.ids = iter(range(1, OWN_REQUEST_IDS))

    def pick(self, options):
        return options[self.rng.integers(len(options))]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def integer(self, low: int, high: int) -> int:
        return int(self.rng.integers(low, high, endpoint=True))

    def bytes(self, low: int, high: int) -> bytes:
        return self.rng.bytes(self.integer(low, high))

    def text(self, low: int, high: int) -> str:
        alphabet = "abcXYZ019 _-/.\u00e9\u4e2d\U0001f600\x00"
        return "".join(self.pick(alphabet) for _ in range(self.integer(low, high)))

    def wrong_value(self):
        """A value of any type, mostly not the one a field wants."""
        return self.pick([
            lambda: None, lambda: True, lambda: False, lambda: -1, lambda: 0, lambda: 2**63, lambda: 2**64 - 1,
            lambda: -2**63, lambda: self.integer(-2**31, 2**31), lambda: 0.5, lambda: math.nan, lambda: math.inf,
            lambda: -math.inf, lambda: -1e300, lambda: "", lambda: self.text(1, 40),
            lambda: "x" * self.integer(1, 5000),
            lambda: self.bytes(0, 64), lambda: [], lambda: [self.integer(0, 9)] * self.integer(1, 9),
            lambda: {"a": 1}, lambda: {"nested": {"deeper": [None, {"x": []}]}},
            lambda: msgpack.ExtType(self.integer(0, 127), self.bytes(0, 16)),
            lambda: msgpack.Timestamp(self.integer(0, 2**33), 0),
        ])()

    def params(self) -> dict:
        """Session parameters: real names with any value, and names the engine does not have."""
        names = list(PARAMS) + ["no_such_param", "", "x" * 70]
        params = {}
        for name in (self.pick(names) for _ in range(self.integer(1, 4))):
            params[name] = PARAMS[name].default if name in PARAMS and self.chance(0.3) else self.wrong_value()
        return params

    def request(self, session: str) -> dict:
        """A valid request (never shutdown) to mutate."""
        kind = self.pick(["hello", "params", "stats", "ping", "bye"])
        base = {"type": kind, "id": next(self.ids)}
        if kind == "hello":
            return {**base, "version": PROTOCOL_VERSION, "model": "default", "width": HOST_SIZE, "height": HOST_SIZE,
                    "prompt": "fuzz", "transport": self.pick(["zmq", "shm"]), "params": {"strength": 0.5}}
        if kind == "params":
            return {**base, "session": session, "params": {"strength": 0.5}}
        return base if kind == "ping" else {**base, "session": session}

    def header(self, session: str, width: int = HOST_SIZE, height: int = HOST_SIZE, format: str = "rgba8") -> dict:
        return {"session": session, "seq": next(self.ids), "t_capture_ns": time.monotonic_ns(), "width": width,
                "height": height, "format": format}


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def is_shutdown(parts: list[bytes]) -> bool:
    """Whether a generated message would stop the engine (which any local host may ask for)."""
    try:
        message = msgpack.unpackb(parts[0], raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - not decodable: not a shutdown
        return False
    return isinstance(message, dict) and message.get("type") == "shutdown"


# ------------------------------------------------------------------------ inputs over ZeroMQ


def random_bytes(gen: Generator, own: str, healthy: str) -> list[bytes]:
    return [gen.bytes(0, 300)]


def malformed_msgpack(gen: Generator, own: str, healthy: str) -> list[bytes]:
    data = pack(gen.request(own))
    length_claims = [b"\xdb", b"\xc6", b"\xdd", b"\xdf", b"\xc9\x00"]  # str32, bin32, array32, map32, ext32
    return [gen.pick([
        lambda: data[:gen.integer(0, len(data) - 1)],  # truncated
        lambda: bytes(b ^ (1 << gen.integer(0, 7)) if gen.chance(0.1) else b for b in data),  # bits flipped
        lambda: data + gen.bytes(1, 16),  # trailing bytes
        lambda: gen.pick(length_claims) + gen.integer(2**16, 2**32 - 1).to_bytes(4, "big") + gen.bytes(0, 32),
        lambda: b"\x91" * gen.integer(100, 60_000) + b"\xc0",  # arrays nested deeper than any parser's stack
        lambda: b"\x81" * gen.integer(100, 30_000) + b"\xc0",  # maps nested likewise (keys that are maps)
        lambda: pack(gen.pick([[1, 2], 7, "hello", None, 1.5, b"\x00"])),  # not a map
        lambda: pack({1: 2, "type": "ping"}) if gen.chance(0.5) else b"\x82\xa4type\xa4ping\xa4type\xa5stats",
        lambda: b"\xd4" + bytes([gen.integer(0, 255)]) + gen.bytes(1, 1),  # fixext
        lambda: b"\xc7\x05\xff" + gen.bytes(5, 5),  # a timestamp of an impossible length
        lambda: b"\xc1" + data,  # the one byte msgpack never uses
    ])()]


def wrong_types(gen: Generator, own: str, healthy: str) -> list[bytes]:
    message = gen.request(own)
    for name in gen.rng.permutation(list(message))[:gen.integer(1, 2)]:
        if name != "type":
            message[name] = gen.wrong_value()
    if gen.chance(0.3) and message["type"] in ("hello", "params"):
        message["params"] = gen.params()
    return [pack(message)]


def unknown_types(gen: Generator, own: str, healthy: str) -> list[bytes]:
    message = gen.request(own)
    choice = gen.integer(0, 3)
    if choice == 0:
        message["type"] = gen.pick(["", "HELLO", "Ping", "frame", "hello ", "x" * 40, gen.text(1, 20)])
    elif choice == 1:
        message = gen.pick([{"type": "ok", "payload": {"session": healthy}, "id": next(gen.ids)},
                            {"type": "error", "code": "internal", "field": None, "message": "", "id": None}])
    elif choice == 2:
        del message["type"]
    else:
        for name in [name for name in message if name != "type"][:gen.integer(1, 3)]:
            del message[name]
    return [pack(message)]


def other_sessions(gen: Generator, own: str, healthy: str) -> list[bytes]:
    session = gen.pick([healthy, healthy, "no-such-session", gen.text(1, 64)])
    if gen.chance(0.5):
        request = gen.pick(["params", "stats", "bye"])
        body = {"params": {"prompt": "taken over", "strength": 0.1}} if request == "params" else {}
        return [pack({"type": request, "session": session, "id": next(gen.ids), **body})]
    header = gen.header(session)
    header["seq"] = FOREIGN_SEQ + header["seq"]  # recognisable, should it ever come back to the healthy host
    return [pack(header), np.full(HOST_SIZE * HOST_SIZE * 4, 255, np.uint8).tobytes()]


def oversized(gen: Generator, own: str, healthy: str, count: int) -> list[bytes]:
    if count % HUGE_PART_EVERY == HUGE_PART_EVERY - 1:
        return [HUGE_PART] if gen.chance(0.5) else [pack(gen.header(own)), HUGE_PART]
    return [gen.pick([
        lambda: gen.bytes(MAX_MESSAGE_BYTES + 1, 4 * MAX_MESSAGE_BYTES),
        lambda: pack({**gen.request(own), "padding": "x" * gen.integer(MAX_MESSAGE_BYTES, 2 * MAX_MESSAGE_BYTES)}),
        lambda: pack({"type": "params", "session": own, "id": next(gen.ids),
                      "params": {f"p{i}": i for i in range(gen.integer(65, 2000))}}),
        lambda: pack({"type": "params", "session": own, "id": next(gen.ids),
                      "params": {"prompt": "y" * gen.integer(1001, 60_000)}}),
        lambda: pack({**gen.request(own), "type": "hello", "version": PROTOCOL_VERSION, "model": "default",
                      "width": gen.integer(8193, 2**40), "height": gen.integer(1, 2**40), "prompt": ""}),
        lambda: pack({**gen.header(own), "session": "s" * gen.integer(65, MAX_MESSAGE_BYTES)}),
    ])()]


def lying_frames(gen: Generator, own: str, healthy: str) -> list[bytes]:
    header = gen.header(own)
    honest = HOST_SIZE * HOST_SIZE * 4
    pixels = honest
    lie = gen.integer(0, 9)
    if lie == 0:  # width and height against the bytes
        header.update(width=gen.integer(0, 9000), height=gen.integer(0, 9000))
    elif lie == 1:  # a huge frame claimed, a few bytes sent
        header.update(width=8192, height=8192, format="rgba8")
        pixels = gen.integer(0, 4096)
    elif lie == 2:  # strides that cannot hold a row, or run past the frame
        header["stride"] = gen.pick([0, 1, HOST_SIZE * 4 - 1, HOST_SIZE * 4 + 1, 2**40, -4, gen.integer(0, 10**6)])
    elif lie == 3:  # formats
        header["format"] = gen.pick(["rgb8", "bgra8", "yuv420", "", "RGBA8", gen.text(1, 10)])
    elif lie == 4:  # bytes against an honest header
        pixels = gen.pick([0, 1, honest - 1, honest + 1, 2 * honest, honest // 2])
    elif lie == 5:  # an honest frame of another size than the session's
        header.update(width=2 * HOST_SIZE, height=HOST_SIZE)
        pixels = 2 * honest
    elif lie == 6:  # seq and time out of range
        header[gen.pick(["seq", "t_capture_ns"])] = gen.pick([-1, 2**63, 2**64 - 1, 1.5, "0"])
    elif lie == 7:  # header fields of the wrong type
        header[gen.pick(list(header))] = gen.wrong_value()
    elif lie == 8:  # part counts
        return gen.pick([[pack(header)] * 3, [pack(header), b"", b""], [pack(header), b"\x00" * honest, b"x", b"y"]])
    else:  # a header that is not msgpack, with honest pixels
        return [gen.bytes(0, 64), bytes(honest)]
    return [pack(header), bytes(pixels)]


HUGE_PART = bytes(LARGEST_FRAME_BYTES + 1)
ZMQ_INPUTS = {"random bytes": random_bytes, "malformed msgpack": malformed_msgpack, "wrong types": wrong_types,
              "unknown types": unknown_types, "other sessions": other_sessions, "lying frames": lying_frames}


class Peer:
    """A plain DEALER socket speaking the protocol by hand, with a session of its own; it
    counts what it sent and what came back, and closes any session a fuzzed hello opened."""

    def __init__(self, context: zmq.Context, address: str, kind: str, transport: str = "zmq"):
        self.kind, self.address = kind, address
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.sent = self.not_sent = self.errors = self.oks = 0
        self.codes: collections.Counter[str] = collections.Counter()
        self.session_failed = False  # the engine gave up on our own session
        self.last_keepalive = time.monotonic()
        self.own_ids = iter(range(OWN_REQUEST_IDS, 2**63))
        self.session = self.open_session({"type": "hello", "version": PROTOCOL_VERSION, "model": "default",
                                          "width": HOST_SIZE, "height": HOST_SIZE, "prompt": "fuzz",
                                          "transport": transport, "id": next(self.own_ids)})

    def open_session(self, message: dict) -> str:
        """Send hello (not counted as an input); returns the session's id."""
        self.socket.send(pack(message))
        deadline = time.monotonic() + PATIENCE_S
        while time.monotonic() < deadline:
            if self.socket.poll(100, zmq.POLLIN):
                parts = self.socket.recv_multipart()
                reply = decode_message(parts[0]) if len(parts) == 1 else None
                if isinstance(reply, Ok) and reply.id == message["id"]:
                    return reply.payload["session"]
                if isinstance(reply, ErrorReply) and reply.id == message["id"]:
                    raise RuntimeError(f"the engine refused a session to the {self.kind} peer: {reply.message}")
        raise TimeoutError(f"no session for the {self.kind} peer within {PATIENCE_S:g} s")

    def send(self, parts: list[bytes]) -> None:
        """Send one input, waiting for room (the engine's queue for us is two messages deep)."""
        deadline = time.monotonic() + PATIENCE_S
        while True:
            try:
                self.socket.send_multipart(parts, zmq.NOBLOCK)
                self.sent += 1
                return
            except zmq.Again:
                self.take_replies()
                if time.monotonic() > deadline:
                    self.not_sent += 1
                    return
                self.socket.poll(10, zmq.POLLOUT)

    def send_alone(self, parts: list[bytes]) -> None:
        """Send one input on a connection of its own, for one the engine drops the connection for
        (a part over its limit): the messages queued behind it on ours would go with it."""
        socket = self.socket.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, int(PATIENCE_S * 1000))  # it goes out after close(), in the background
        socket.connect(self.address)
        socket.send_multipart(parts)
        socket.close()
        self.sent += 1

    def take_replies(self) -> None:
        while self.socket.poll(0, zmq.POLLIN):
            parts = self.socket.recv_multipart(zmq.NOBLOCK)
            if len(parts) != 1:
                continue  # an output of our own session, from an honest frame
            reply = decode_message(parts[0])
            if reply.id is not None and reply.id >= OWN_REQUEST_IDS:
                continue  # to a request of our own
            if isinstance(reply, ErrorReply):
                self.errors += 1
                self.codes[reply.code] += 1
                self.session_failed |= reply.code == "session_failed"
            else:
                self.oks += 1
                opened = reply.payload.get("session")
                if opened is not None and opened != self.session and "schema" in reply.payload:
                    self.post({"type": "bye", "session": opened})  # a fuzzed hello was valid

    def keep_alive(self) -> None:
        if time.monotonic() - self.last_keepalive >= KEEPALIVE_S:
            self.last_keepalive = time.monotonic()
            self.post({"type": "stats", "session": self.session})

    def post(self, message: dict) -> None:
        """A request of our own, not an input: sent if there is room, its reply counted with the rest."""
        try:
            self.socket.send(pack({**message, "id": next(self.own_ids)}), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        self.socket.close()


# ------------------------------------------------------------------------ inputs over shared memory


class LyingRing:
    """A shm session's input ring, made by hand after bridge/shm.py's layout so that any
    field can lie. Each lie() forges one state of it for the engine to read."""

    FRAME_BYTES = HOST_SIZE * HOST_SIZE * 4
    SLOTS = 3

    def __init__(self, name: str, gen: Generator, control_lie: str | None = None):
        self.name, self.gen = name, gen
        self.segments: dict[str, shared_memory.SharedMemory] = {}
        self.control = self._segment(name, _CONTROL.itemsize)
        self._control()["version"] = RING_VERSION + (control_lie == "version")
        self._control()["owner_pid"] = os.getpid()
        self._control()["magic"] = _CONTROL_MAGIC if control_lie != "magic" else b"NOTARING"
        self.generation = 0
        self.short = False  # the current frame block is shorter than a frame's slots need
        self.seq = 0
        self.lies = 0
        self.honest_block()

    def _segment(self, name: str, size: int) -> shared_memory.SharedMemory:
        segment = shared_memory.SharedMemory(name, create=True, size=size)
        self.segments[name] = segment
        return segment

    def _control(self) -> np.ndarray:
        return np.ndarray((), _CONTROL, buffer=self.control.buf)

    def _block(self):
        """Views of the current frame block: header, slots, pixels (honest geometry)."""
        buffer = self.segments[f"{self.name}_{self.generation}"].buf
        offset, pitch, _ = _frame_block_layout(self.SLOTS, self.FRAME_BYTES)
        pixels = np.ndarray((self.SLOTS, self.FRAME_BYTES), np.uint8, buffer=buffer, offset=offset,
                            strides=(pitch, 1))
        return (np.ndarray((), _FRAMES_HEADER, buffer=buffer),
                np.ndarray((self.SLOTS,), _SLOT, buffer=buffer, offset=_FRAMES_HEADER.itemsize), pixels)

    def new_block(self, size: int, **fields) -> None:
        """A frame block of the next generation with these header fields, made current."""
        self.generation += 1
        self.short = size < _frame_block_layout(self.SLOTS, self.FRAME_BYTES)[2]
        buffer = self._segment(f"{self.name}_{self.generation}", size).buf
        header = np.ndarray((), _FRAMES_HEADER, buffer=buffer)
        values = {"generation": self.generation, "width": HOST_SIZE, "height": HOST_SIZE, "format": b"rgba8",
                  "stride": HOST_SIZE * 4, "slots": self.SLOTS, "magic": _FRAMES_MAGIC, **fields}
        for name, value in values.items():
            header[name] = value
        del header, buffer
        self._retire(self.generation - 2)  # the engine may still be following the one before
        self._control()["generation"] = self.generation

    def honest_block(self, width: int = HOST_SIZE, height: int = HOST_SIZE) -> None:
        size = _frame_block_layout(self.SLOTS, width * height * 4)[2]
        self.new_block(size, width=width, height=height, stride=width * 4)

    def _retire(self, generation: int) -> None:
        segment = self.segments.pop(f"{self.name}_{generation}", None)
        if segment is not None:
            _remove(segment)

    def write(self, seq: int, t_capture_ns: int, publish: int | None = None) -> None:
        """A frame through the seqlock, as RingWriter.write does, with whatever seq and time."""
        header, slots, pixels = self._block()
        count = int(header["write_count"])
        slot = count % self.SLOTS
        lock = int(slots["lock"][slot])
        slots["lock"][slot] = (lock + 1) % 2**64
        pixels[slot] = self.gen.integer(0, 255)
        slots["seq"][slot], slots["t_capture_ns"][slot] = seq, t_capture_ns
        slots["publish"][slot] = (count + 1) % 2**64 if publish is None else publish  # counts may lie at the top
        slots["lock"][slot] = (lock + 2) % 2**64
        header["write_count"] = (count + 1) % 2**64

    def lie(self) -> None:
        gen = self.gen
        self.lies += 1
        self._control()["generation"] = self.generation  # undo a generation that pointed nowhere
        if self.short:
            self.honest_block()  # the lies below write into the block
        choice = gen.integer(3, 11) if gen.chance(1 - HONEST_SHARE) else 0
        if choice == 0:  # an honest frame now and then, so that the lies land among real traffic
            self.seq += 1
            self.write(self.seq, time.monotonic_ns())
        elif choice == 3:  # seq and time out of range or backwards
            self.write(gen.pick([-1, -2**63, 0, self.seq - 5, 2**63 - 1]),
                       gen.pick([-1, -2**63, 0, 2**63 - 1, time.monotonic_ns()]))
        elif choice == 4:  # a slot left locked, as by a writer that died mid-frame
            header, slots, _ = self._block()
            slots["lock"][int(header["write_count"]) % self.SLOTS] |= 1
        elif choice == 5:  # write and publish counts that lie
            header, slots, _ = self._block()
            if gen.chance(0.5):
                header["write_count"] = gen.pick([0, 1, 2**63, 2**64 - 1, gen.integer(0, 2**40)])
            else:
                slots["publish"][gen.integer(0, self.SLOTS - 1)] = gen.pick([0, 2**63, 2**64 - 1])
        elif choice == 6:  # geometry changed in the block the engine already maps
            header, _, _ = self._block()
            header[gen.pick(["width", "height", "stride", "slots"])] = gen.pick([0, 1, 2**63, 2**64 - 1])
        elif choice == 7:  # a new frame block whose header lies
            field, value = gen.pick([("magic", b"SDBFRMS0"), ("generation", 2**63), ("width", 0), ("width", 9000),
                                     ("height", 2**64 - 1), ("format", gen.bytes(8, 8)), ("format", b"yuv420"),
                                     ("stride", 1), ("stride", 2**62), ("slots", 0), ("slots", 1), ("slots", 2**63)])
            self.new_block(_frame_block_layout(self.SLOTS, self.FRAME_BYTES)[2], **{field: value})
        elif choice == 8:  # a frame block shorter than its header claims
            honest_size = _frame_block_layout(self.SLOTS, self.FRAME_BYTES)[2]
            self.new_block(gen.integer(_FRAMES_HEADER.itemsize, honest_size - 1))
        elif choice == 9:  # a generation with no block behind it
            self._control()["generation"] = gen.pick([self.generation + 1000, 2**64 - 1, 0])
        elif choice == 10:  # an honest ring of another size than the session's
            self.honest_block(2 * HOST_SIZE, HOST_SIZE // 2)
        else:  # control fields the engine must not trust: owner, heartbeat, shutdown, version
            field = gen.pick(["owner_pid", "heartbeat_ns", "shutdown", "version"])
            limits = np.iinfo(_CONTROL[field])
            self._control()[field] = gen.pick([0, 1, limits.min, limits.max])

    def close(self) -> None:
        for segment in self.segments.values():
            _remove(segment)
        self.segments.clear()


def _remove(segment: shared_memory.SharedMemory) -> None:
    segment.close()
    try:
        segment.unlink()
    except FileNotFoundError:  # the engine reclaimed it: a ring whose owner pid lies looks abandoned
        resource_tracker.unregister("/" + segment.name, "shared_memory")  # or ours would try again at exit


class ShmPeer:
    """A peer whose session's input ring lies; opens a new session when the engine ends one."""

    def __init__(self, context: zmq.Context, address: str, gen: Generator):
        self.context, self.address, self.gen = context, address, gen
        self.peer: Peer | None = None
        self.ring: LyingRing | None = None
        self.sessions = 0
        self.sent = self.not_sent = self.errors = self.oks = 0
        self.codes: collections.Counter[str] = collections.Counter()

    def lie(self) -> None:
        if self.peer is None or self.peer.session_failed or self.ring.lies >= LIES_PER_SESSION:
            self._reopen()
        self.ring.lie()
        self.sent += 1
        self.peer.take_replies()
        self.peer.keep_alive()

    def _reopen(self) -> None:
        self._close_session()
        self.peer = Peer(self.context, self.address, SHM_KIND, transport="shm")
        self.sessions += 1
        control_lie = self.gen.pick([None] * 8 + ["version", "magic"])
        self.ring = LyingRing(session_ring_names(self.peer.session)[0], self.gen, control_lie)

    def _close_session(self) -> None:
        if self.peer is None:
            return
        self.peer.take_replies()
        if not self.peer.session_failed:
            self.peer.post({"type": "bye", "session": self.peer.session})
        self.errors += self.peer.errors
        self.oks += self.peer.oks
        self.codes.update(self.peer.codes)
        self.peer.close()
        self.ring.close()
        self.peer = self.ring = None

    def take_replies(self) -> None:
        if self.peer is not None:
            self.peer.take_replies()

    def close(self) -> None:
        self._close_session()


# ------------------------------------------------------------------------ the healthy host


class HealthyHost:
    """An EngineClient over shared memory streaming a test pattern at a steady rate on a
    thread of its own; it notes which of its frames came back."""

    def __init__(self, address: str, fps: float):
        self.client = EngineClient(address, transport="shm", width=HOST_SIZE, height=HOST_SIZE, timeout_s=PATIENCE_S,
                                   prompt="a healthy stream", target_fps=fps, latency_ms=HEALTHY_LATENCY_MS).open()
        self.session = self.client.session
        self.sessions = {self.session}  # a second one would mean the client lost the first
        self.fps = fps
        self.frames = test_pattern(32, HOST_SIZE, HOST_SIZE)
        self.sent = 0  # frames sent: seqs 0 .. sent - 1
        self.foreign = 0  # outputs whose seq it never sent
        self.failure: BaseException | None = None
        self.drops: dict[str, int] = {}  # where frames were dropped over the whole run, counted as it ends
        self._returned: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._stream, name="healthy-host", daemon=True)
        self._thread.start()

    def _stream(self) -> None:
        next_send = time.monotonic()
        try:
            while not self._stop.is_set():
                if time.monotonic() >= next_send:
                    self.sent = self.client.send(self.frames[self.sent % len(self.frames)]) + 1
                    next_send += 1 / self.fps
                output = self.client.receive(min(max(next_send - time.monotonic(), 0.0), 0.01))
                if output is not None:
                    with self._lock:
                        if output.seq < self.sent:
                            self._returned.add(output.seq)
                        else:
                            self.foreign += 1
                if self.client.session is not None:
                    self.sessions.add(self.client.session)
            stats = self.client.stats()
            counters = self.client.counters
            self.drops = {"stale, by the engine": stats["frames_dropped"] + stats["outputs_dropped"],
                          "replaced in the input ring": counters.sent - counters.not_sent - stats["frames_in"],
                          "replaced in the output ring": counters.skipped}
        except BaseException as error:  # noqa: BLE001 - reported by the run
            self.failure = error

    def missing(self, first: int, end: int) -> int:
        """How many of frames first .. end - 1 never came back."""
        with self._lock:
            return sum(seq not in self._returned for seq in range(first, end))

    def wait_past(self, seq: int) -> bool:
        """Wait until an output of a frame sent after seq comes back: outputs come in order,
        so every frame up to seq has then come back or never will."""
        deadline = time.monotonic() + PATIENCE_S
        while time.monotonic() < deadline and self.failure is None:
            with self._lock:
                if self._returned and max(self._returned) > seq:
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(PATIENCE_S)
        self.client.close()


# ------------------------------------------------------------------------ the run


class Watch:
    """Whether the engine lives and answers: its process, and a ping every PING_EVERY_S."""

    def __init__(self, engine: EngineProcess, address: str):
        self.engine = engine
        self.socket = HostSocket(address)
        self.next_ping = time.monotonic()
        self.crash: str | None = None

    def look(self) -> bool:
        """False once the engine has died or hung (crash says which)."""
        if self.crash is None and self.engine.returncode is not None:
            self.crash = f"the engine exited with {self.engine.returncode}"
        if self.crash is None and time.monotonic() >= self.next_ping:
            try:
                self.socket.ping(PING_PATIENCE_S)
            except TimeoutError:
                self.crash = f"the engine did not answer a ping within {PING_PATIENCE_S:g} s"
            self.next_ping = time.monotonic() + PING_EVERY_S
        return self.crash is None


def fuzz(address: str, healthy: HealthyHost, watch: Watch, inputs: int, seconds: float, rate: float,
         seed: int) -> dict:
    gen = Generator(seed)
    context = zmq.Context()
    peers = {kind: Peer(context, address, kind) for kind in ZMQ_KINDS}
    shm = ShmPeer(context, address, gen)
    kinds = list(KINDS)
    shares = np.array(list(KINDS.values()))
    choices = gen.rng.choice(len(kinds), size=inputs, p=shares / shares.sum())
    oversized_count = 0
    started = time.monotonic()
    try:
        for number, index in enumerate(choices):
            kind = kinds[index]
            if kind == SHM_KIND:
                shm.lie()
            else:
                peer = peers[kind]
                if kind == "oversized":
                    parts = oversized(gen, peer.session, healthy.session, oversized_count)
                    oversized_count += 1
                else:
                    parts = ZMQ_INPUTS[kind](gen, peer.session, healthy.session)
                if HUGE_PART in parts:
                    peer.send_alone(parts)
                elif not is_shutdown(parts):
                    peer.send(parts)
                    peer.take_replies()
            if number % 64 == 0:
                for peer in peers.values():
                    peer.take_replies()
                    peer.keep_alive()
                if not watch.look() or time.monotonic() - started > seconds or healthy.failure is not None:
                    break
                if rate:
                    time.sleep(max(0.0, started + number / rate - time.monotonic()))
        time.sleep(1.0)  # the last replies
        for peer in [*peers.values(), shm]:
            peer.take_replies()
    finally:
        elapsed = time.monotonic() - started
        shm.close()
        for peer in peers.values():
            peer.close()
        context.term()
    rows = {kind: peers[kind] for kind in ZMQ_KINDS} | {SHM_KIND: shm}
    return {"elapsed_s": elapsed, "shm_sessions": shm.sessions,
            "rows": {kind: {"transport": "shm" if kind == SHM_KIND else "zmq", "sent": row.sent,
                            "not_sent": row.not_sent, "errors": row.errors, "oks": row.oks, "codes": row.codes}
                     for kind, row in rows.items()}}


def start_engine(log_path: Path) -> tuple[EngineProcess, str]:
    engine = EngineProcess.start(model="tiny", bind="tcp://127.0.0.1:*", args=ENGINE_ARGS, cwd=REPO,
                                 log_file=log_path)
    try:
        return engine, engine.wait_until_ready()
    except EngineStartError as error:
        raise SystemExit(f"the engine did not start: {error}") from None


def run(inputs: int, seconds: float, rate: float, seed: int, fps: float, log_path: Path) -> dict:
    engine, address = start_engine(log_path)
    control_engine, control_address = start_engine(log_path.with_name(f"{log_path.stem}-control{log_path.suffix}"))
    watch = Watch(engine, address)
    healthy, control = HealthyHost(address, fps), HealthyHost(control_address, fps)
    try:
        for host in (healthy, control):
            if not host.wait_past(0):
                raise SystemExit(f"a session got no output within {PATIENCE_S:g} s; see {log_path}")
        time.sleep(SETTLE_S)
        starts = healthy.sent, control.sent
        cpu_before = (time.process_time(), cpu_seconds(engine.pid))
        result = fuzz(address, healthy, watch, inputs, seconds, rate, seed)
        result["cpu_s"] = {"fuzzer": time.process_time() - cpu_before[0],
                           "engine": cpu_seconds(engine.pid) - cpu_before[1]}
        ends = healthy.sent, control.sent
        settled = watch.look() and healthy.wait_past(ends[0]) and control.wait_past(ends[1])
        for name, host, start, end in zip(("healthy", "control"), (healthy, control), starts, ends):
            result[name] = {"sent": end - start, "missing": host.missing(start, end)}
        result["settled"] = settled
    finally:
        for host in (healthy, control):
            host.close()
        exit_code = engine.stop(PATIENCE_S) if watch.look() else engine.returncode
        control_engine.stop(PATIENCE_S)
        watch.socket.close()
    result.update(exit_code=exit_code, crash=watch.crash, healthy_sessions=len(healthy.sessions),
                  foreign=healthy.foreign, healthy_failure=healthy.failure, healthy_drops=healthy.drops)
    return result


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far (Linux; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def report(result: dict, inputs: int, rate: float, seed: int, fps: float, log_path: Path) -> None:
    rows = result["rows"]
    sent = sum(row["sent"] for row in rows.values())
    pace = f"at up to {rate:g} a second" if rate else "as fast as the engine took them"
    print(f"Fuzz: {sent:,} of {inputs:,} inputs (seed {seed}), {pace}, in {result['elapsed_s']:.0f} s, to "
          f"python -m engine serve --model tiny {' '.join(ENGINE_ARGS)}, while a healthy session streamed over "
          f"shared memory at {fps:g} fps")
    print()
    print(f"{'input kind':<18} {'via':<4} {'sent':>8} {'not sent':>8} {'errors answered':>15} {'ok':>6}")
    for kind, row in rows.items():
        print(f"{kind:<18} {row['transport']:<4} {row['sent']:>8,} {row['not_sent']:>8,} {row['errors']:>15,} "
              f"{row['oks']:>6,}")
    print(f"{'all':<18} {'':<4} {sent:>8,} {sum(r['not_sent'] for r in rows.values()):>8,} "
          f"{sum(r['errors'] for r in rows.values()):>15,} {sum(r['oks'] for r in rows.values()):>6,}")
    codes = sum((row["codes"] for row in rows.values()), collections.Counter())
    print("errors by code: " + ", ".join(f"{code} {count:,}" for code, count in codes.most_common()))
    print(f"sessions the lying ring went through: {result['shm_sessions']:,} (a new one every {LIES_PER_SESSION} "
          "lies, or when the engine ends one)")
    print(f"CPU time meanwhile: the engine {result['cpu_s']['engine']:.0f} s, this process (fuzzer and healthy "
          f"host) {result['cpu_s']['fuzzer']:.0f} s, in {result['elapsed_s']:.0f} s on {os.cpu_count()} cores")
    print()
    crashes = 0 if result["crash"] is None else 1
    healthy, control = result["healthy"], result["control"]
    lost = max(0, healthy["missing"] - control["missing"])
    print(f"{'':<52} {'measured':>9} {'target':>7}")
    print(f"{'engine crashes (died, or stopped answering pings)':<52} {crashes:>9} {0:>7}  {verdict(crashes == 0)}")
    print(f"{'healthy session: frames lost during the fuzz':<52} {lost:>9} {0:>7}  "
          f"{verdict(lost == 0 and result['settled'])}")
    print(f"{'healthy session: outputs of frames it never sent':<52} {result['foreign']:>9} {0:>7}  "
          f"{verdict(result['foreign'] == 0)}")
    print(f"{'errors answered as internal (faults of the engine)':<52} {codes['internal']:>9,}")
    print(f"  during the fuzz {healthy['missing']} of the healthy session's {healthy['sent']:,} frames never came "
          f"back, and {control['missing']} of the control's {control['sent']:,} (stale or replaced frames, latest "
          f"wins: this machine's drops meanwhile); the healthy host needed {result['healthy_sessions']} session(s)")
    if result["healthy_drops"]:
        print("  its drops over the whole run: " + ", ".join(f"{count} {where}"
                                                           for where, count in result["healthy_drops"].items()))
    if not result["settled"]:
        print("  a stream never moved past the fuzz: its last frames count as lost")
    if result["crash"] is not None:
        print(f"  crash: {result['crash']}")
    if result["healthy_failure"] is not None:
        print(f"  the healthy host failed: {result['healthy_failure']!r}")
    print(f"  engine exit code on shutdown: {result['exit_code']}; its log: {log_path}")


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=100_000, help="generated inputs to send")
    parser.add_argument("--seconds", type=float, default=1800.0, help="stop sending after this long")
    parser.add_argument("--rate", type=float, default=300.0,
                        help="inputs a second at most; 0 sends them as fast as the engine takes them (a flood)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=float, default=4.0, help="the healthy session's frame rate")
    parser.add_argument("--log", default="out/fuzz-engine.log", help="the engine's log")
    args = parser.parse_args()
    log_path = REPO / args.log
    result = run(args.inputs, args.seconds, args.rate, args.seed, args.fps, log_path)
    report(result, args.inputs, args.rate, args.seed, args.fps, log_path)


if __name__ == "__main__":
    main()
