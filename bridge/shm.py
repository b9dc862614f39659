"""Shared-memory frame ring: one writer process, any number of reader processes.

The writer copies each frame into the next of a few slots; a reader copies out the
newest complete frame. Nobody waits for anybody. A reader that falls behind gets the
newest frame on its next read (latest wins), and a reader never returns a torn frame:
each slot is guarded by a sequence lock (seqlock) that the reader checks before and
after its copy.

A ring is two shared-memory segments:

    <name>                 control block, fixed for the ring's life: magic, layout
                           version, generation, owner pid, heartbeat, shutdown flag
    <name>_<generation>    frame block, one per frame size: magic, generation, width,
                           height, format, stride, slot count, write count, then per
                           slot {lock, publish, seq, t_capture_ns}, then the pixel slots

Resizing creates a new frame block and bumps the generation; readers notice and map
the new block. Replacing a block, rather than growing one in place, is what works on
every OS: Windows can neither unlink nor grow a segment that is still mapped.

Portability:
- Ring names are 1-20 characters of [A-Za-z0-9_], so "<name>_<generation>" stays within
  macOS's 31-character limit on shared-memory names.
- On POSIX, Python creates segments with mode 0600 (owner only). Names the ring makes
  itself carry 64 random bits (secrets); session rings are named from the engine's
  secret session id, so another process cannot guess them either.
- Crashes: a process killed outright (and its resource tracker with it) leaves its
  segments behind. reclaim_abandoned_rings() removes the rings whose control block
  carries our magic and whose owner process is gone; the engine calls it as it starts.
- Python before 3.13 registers every segment a process attaches with that process's
  resource tracker, which unlinks it when the process exits, pulling the ring out from
  under its writer. Readers therefore opt out (track=False on 3.13+, unregister before).
- All fields are little-endian and 8-byte aligned, so hosts in other languages can
  map the same layout.
"""

from __future__ import annotations

import errno
import hashlib
import operator
import os
import re
import secrets
import shutil
import sys
import time
from multiprocessing import resource_tracker, shared_memory
from typing import Callable, NamedTuple

import numpy as np

from .protocol import FORMATS, MAX_INT, ErrorCode, ProtocolError, check_geometry

RING_VERSION = 1
MIN_SLOTS = 2  # with one slot a reader could never finish a copy while the writer runs
MAX_SLOTS = 8
MAX_NAME_CHARS = 20

_CONTROL_MAGIC = b"SDBRING1"
_FRAMES_MAGIC = b"SDBFRMS1"
_NAME_PATTERN = re.compile(rf"[A-Za-z0-9_]{{1,{MAX_NAME_CHARS}}}")
_ALIGN = 64  # pixel slots start on cache-line boundaries
_READ_ATTEMPTS = 8  # seqlock retries before a read gives up until next time
_DEV_SHM = "/dev/shm"  # where Linux keeps POSIX shared memory
_MAX_PID = 2**31 - 1  # pid_t is a 32-bit int on Linux, macOS and Windows

_CONTROL = np.dtype(
    [
        ("magic", "S8"),
        ("version", "<u8"),
        ("generation", "<u8"),  # which frame block is current
        ("owner_pid", "<u8"),  # the writer's pid, for cleaning up after a dead writer
        ("heartbeat_ns", "<i8"),  # time.monotonic_ns() of the writer's last sign of life
        ("shutdown", "<u8"),  # set when the writer closes the ring
    ]
)
_FRAMES_HEADER = np.dtype(
    [
        ("magic", "S8"),
        ("generation", "<u8"),
        ("width", "<u8"),
        ("height", "<u8"),
        ("format", "S8"),
        ("stride", "<u8"),
        ("slots", "<u8"),
        ("write_count", "<u8"),  # frames written into this block so far
    ]
)
_SLOT = np.dtype(
    [
        ("lock", "<u8"),  # seqlock: odd while the writer is copying into the slot
        ("publish", "<u8"),  # the write count that put the current frame in the slot
        ("seq", "<i8"),
        ("t_capture_ns", "<i8"),
    ]
)

# Segment names this process created. They stay registered with our resource tracker
# (it cleans them up if we die), so attaching to one of them here must not unregister it.
_created_here: set[str] = set()


class RingFrame(NamedTuple):
    pixels: np.ndarray  # [height, width, channels] uint8, the caller's own (a new array, or `out`)
    seq: int
    t_capture_ns: int


def session_ring_names(session: str) -> tuple[str, str]:
    """The (input, output) ring names for a session: host-to-engine, engine-to-host.

    A short hash of the session id keeps them within the name limit whatever the id.
    """
    digest = hashlib.blake2b(session.encode(), digest_size=6).hexdigest()
    return f"sdb_{digest}_in", f"sdb_{digest}_out"


class _MappedRing:
    """The geometry both ends read from the frame block they currently map."""

    _frames: "_FrameBlock"

    @property
    def width(self) -> int:
        return self._frames.width

    @property
    def height(self) -> int:
        return self._frames.height

    @property
    def format(self) -> str:
        return self._frames.format

    @property
    def generation(self) -> int:
        """The generation of the frame block mapped now (bumped by each resize)."""
        return self._frames.generation


class RingWriter(_MappedRing):
    """The writing end of a ring. Create with RingWriter.create(); close() removes it."""

    def __init__(self, name: str, control: shared_memory.SharedMemory, frames: _FrameBlock):
        self.name = name
        self._control_segment = control
        self._control = np.ndarray((), _CONTROL, buffer=control.buf)
        self._frames = frames

    @classmethod
    def create(
        cls, width: int, height: int, format: str = "rgba8", *, name: str | None = None, slots: int = 3
    ) -> RingWriter:
        """Create a ring for frames of this size. Without a name, an unguessable one is made."""
        name = f"sdb_{secrets.token_hex(8)}" if name is None else _checked_name(name)
        if not MIN_SLOTS <= slots <= MAX_SLOTS:
            raise ValueError(f"slots must be from {MIN_SLOTS} to {MAX_SLOTS}, got {slots}")
        frames = _FrameBlock.create(name, 1, width, height, format, slots)
        try:
            control = _create_segment(name, _CONTROL.itemsize)
        except BaseException:
            frames.close(unlink=True)
            raise
        writer = cls(name, control, frames)
        writer._control["version"] = RING_VERSION
        writer._control["generation"] = 1
        writer._control["owner_pid"] = os.getpid()
        writer.heartbeat()
        writer._control["magic"] = _CONTROL_MAGIC  # last: a reader that sees it sees the rest
        return writer

    def write(self, frame: np.ndarray, seq: int, t_capture_ns: int) -> None:
        """Copy a [height, width, channels] uint8 frame into the ring; never blocks."""
        block = self._frames
        expected = (block.height, block.width, block.channels)
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.shape != expected:
            got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ProtocolError(ErrorCode.SIZE_MISMATCH, "pixels", f"ring holds uint8 {expected}, got {got}")
        self.write_in_place(lambda slot: np.copyto(slot, frame), seq, t_capture_ns)

    def write_in_place(self, fill: Callable[[np.ndarray], None], seq: int, t_capture_ns: int) -> None:
        """Write a frame by fill(slot), which puts it straight into the ring's [height, width,
        channels] uint8 slot: a writer that converts its frames anyway (RGB to RGBA, say)
        saves a copy. Readers get the frame once fill returns; if fill raises, they never do."""
        for field_name, value in (("seq", seq), ("t_capture_ns", t_capture_ns)):
            if not 0 <= operator.index(value) <= MAX_INT:
                raise ProtocolError(ErrorCode.OUT_OF_RANGE, field_name, f"{field_name} must be from 0 to {MAX_INT}")

        # Python cannot issue memory fences. Each store below is a separate numpy call,
        # which the C compiler cannot reorder, and x86 makes stores visible in program
        # order. Weakly ordered CPUs (ARM) promise no such thing, so there a torn frame
        # is possible in principle.
        block = self._frames
        count = int(block.header["write_count"])
        slot = count % block.slot_count
        lock = int(block.slots["lock"][slot])
        block.slots["lock"][slot] = lock + 1  # odd: readers keep out of this slot
        try:
            fill(block.pixels[slot])
        except BaseException:
            block.slots["publish"][slot] = 0  # never newer than what a reader has: it returns nothing from here
            block.slots["lock"][slot] = lock + 2
            raise
        block.slots["seq"][slot] = seq
        block.slots["t_capture_ns"][slot] = t_capture_ns
        block.slots["publish"][slot] = count + 1
        block.slots["lock"][slot] = lock + 2  # even again: the slot is whole
        block.header["write_count"] = count + 1  # readers look here for the newest slot
        self.heartbeat()

    def heartbeat(self) -> None:
        """Tell readers the writer is alive; write() does this, call it when idle."""
        self._control["heartbeat_ns"] = time.monotonic_ns()

    def resize(self, width: int, height: int, format: str | None = None) -> None:
        """Switch to a new frame size (and format); readers follow on their next read."""
        old = self._frames
        self._frames = _FrameBlock.create(
            self.name, old.generation + 1, width, height, format or old.format, old.slot_count
        )
        self._control["generation"] = self._frames.generation
        old.close(unlink=True)  # readers still mapping it keep their mapping until they follow

    def close(self) -> None:
        """Tell readers the ring is gone, and remove it. Safe to call twice."""
        if self._control is None:
            return
        self._control["shutdown"] = 1
        self._frames.close(unlink=True)
        self._control = None  # drop the view before the segment can close
        _close_segment(self._control_segment, unlink=True)

    def __enter__(self) -> RingWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RingReader(_MappedRing):
    """The reading end of a ring, in any process. Attach with RingReader.attach(name)."""

    def __init__(self, name: str, control: shared_memory.SharedMemory):
        self.name = name
        self._control_segment = control
        self._control = np.ndarray((), _CONTROL, buffer=control.buf)
        self._frames: _FrameBlock | None = None
        self._last_publish = 0  # the publish count of the last frame we returned
        self.skipped = 0  # frames written but never returned to this reader (it fell behind)

    @classmethod
    def attach(cls, name: str) -> RingReader:
        """Map an existing ring; FileNotFoundError if there is none by that name."""
        control = _attach_segment(_checked_name(name))
        try:
            _check_control(control)
            reader = cls(name, control)
        except BaseException:
            _close_segment(control)
            raise
        # A resize can retire a frame block between our reading the generation and
        # opening the block; the next generation is then already there.
        for _ in range(_READ_ATTEMPTS):
            if reader._follow_generation():
                return reader
        reader.close()
        raise FileNotFoundError(f"ring {name!r} has no frame block; its writer is resizing or gone")

    @property
    def owner_pid(self) -> int:
        return int(self._control["owner_pid"])

    @property
    def writer_generation(self) -> int:
        """The generation the writer has made current: ahead of generation while this reader
        has not followed it yet, or cannot (its frame block is refused)."""
        return int(self._control["generation"])

    def writer_alive(self, timeout_s: float = 2.0) -> bool:
        """False once the writer has closed the ring or shown no sign of life for timeout_s."""
        if self._control["shutdown"]:
            return False
        return time.monotonic_ns() - int(self._control["heartbeat_ns"]) < timeout_s * 1e9

    def read_latest(self, out: np.ndarray | None = None) -> RingFrame | None:
        """A copy of the newest frame, or None when nothing new has been written since
        the last frame returned (or the writer is mid-resize or lapping this reader).

        Raises ProtocolError, naming the field, for what no RingWriter writes: a frame block
        whose header is refused (again at each read, until the writer makes a new one), or
        a frame whose seq or t_capture_ns is out of range (that frame is then skipped).

        With out, a [height, width, channels] uint8 array, the pixels are copied into it
        (a reused or pinned buffer, say) instead of into a new array. It must match the
        ring's current size: after a resize this raises ProtocolError until out is
        reallocated from width, height and format. When None is returned, out may hold
        a partial copy.
        """
        if not self._follow_generation():
            return None
        block = self._frames
        if out is not None and (out.dtype != np.uint8 or out.shape != block.pixels.shape[1:]):
            raise ProtocolError(
                ErrorCode.SIZE_MISMATCH,
                "pixels",
                f"out is {out.dtype} {out.shape}, frames are uint8 {block.pixels.shape[1:]}; reallocate it",
            )
        for _ in range(_READ_ATTEMPTS):
            count = int(block.header["write_count"])
            if count == 0:
                return None
            slot = (count - 1) % block.slot_count
            lock = int(block.slots["lock"][slot])
            if lock % 2:  # the writer has lapped us and is refilling this slot: look again
                continue
            publish = int(block.slots["publish"][slot])
            if publish <= self._last_publish:
                return None
            seq = int(block.slots["seq"][slot])
            t_capture_ns = int(block.slots["t_capture_ns"][slot])
            if out is None:
                pixels = block.pixels[slot].copy()
            else:
                pixels = out
                np.copyto(out, block.pixels[slot])
            if int(block.slots["lock"][slot]) == lock:  # nobody wrote the slot during our copy
                # Bounded: the counts are the writer's to lie about, and a lie must not overflow the stats.
                self.skipped = min(self.skipped + publish - self._last_publish - 1, MAX_INT)
                self._last_publish = publish
                for field_name, value in (("seq", seq), ("t_capture_ns", t_capture_ns)):
                    if not 0 <= value <= MAX_INT:  # only a writer other than RingWriter puts it there
                        raise ProtocolError(ErrorCode.OUT_OF_RANGE, field_name,
                                            f"a frame in ring {self.name} has {field_name} {value}; it must be "
                                            f"from 0 to {MAX_INT}")
                return RingFrame(pixels, seq, t_capture_ns)
        return None

    def _follow_generation(self) -> bool:
        """Map the current frame block if the writer has moved on; False if it is not there."""
        generation = int(self._control["generation"])
        if self._frames is not None and self._frames.generation == generation:
            return True
        try:
            block = _FrameBlock.attach(self.name, generation)
        except FileNotFoundError:  # retired by a newer resize or by close(); look again later
            return False
        if self._frames is not None:
            self._frames.close()
        self._frames = block
        self._last_publish = 0
        return True

    def close(self) -> None:
        """Unmap the ring (the writer owns it and removes it). Safe to call twice."""
        if self._control is None:
            return
        if self._frames is not None:
            self._frames.close()
            self._frames = None
        self._control = None
        _close_segment(self._control_segment)

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _FrameBlock:
    """One frame block: its geometry, and numpy views of its header, slot table and pixels."""

    def __init__(self, segment: shared_memory.SharedMemory, generation: int):
        # Validate a private copy, so that nothing points into the segment if we raise.
        header = _read_copy(segment, _FRAMES_HEADER, "frame block")
        if header["magic"].item() != _FRAMES_MAGIC or int(header["generation"]) != generation:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "magic", f"{segment.name} is not frame block {generation}")
        format = header["format"].item().decode("ascii", "replace")
        self.width, self.height, self.format, self.stride = check_geometry(
            int(header["width"]), int(header["height"]), format, int(header["stride"])
        )
        self.channels = FORMATS[self.format]
        self.slot_count = int(header["slots"])
        if not MIN_SLOTS <= self.slot_count <= MAX_SLOTS:
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, "slots", f"slot count must be from {MIN_SLOTS} to {MAX_SLOTS}")
        pixels_offset, slot_pitch, size = _frame_block_layout(self.slot_count, self.stride * self.height)
        if segment.size < size:
            raise ProtocolError(
                ErrorCode.SIZE_MISMATCH, "pixels", f"{segment.name} is {segment.size} bytes, needs {size}"
            )
        self.generation = generation
        self.segment = segment
        self.header = np.ndarray((), _FRAMES_HEADER, buffer=segment.buf)
        self.slots = np.ndarray((self.slot_count,), _SLOT, buffer=segment.buf, offset=_FRAMES_HEADER.itemsize)
        self.pixels = np.ndarray(
            (self.slot_count, self.height, self.width, self.channels),
            np.uint8,
            buffer=segment.buf,
            offset=pixels_offset,
            strides=(slot_pitch, self.stride, self.channels, 1),
        )

    @classmethod
    def create(cls, ring_name: str, generation: int, width: int, height: int, format: str, slots: int) -> _FrameBlock:
        width, height, format, stride = check_geometry(width, height, format)
        segment = _create_segment(f"{ring_name}_{generation}", _frame_block_layout(slots, stride * height)[2])
        header = np.ndarray((), _FRAMES_HEADER, buffer=segment.buf)
        header["generation"] = generation
        header["width"] = width
        header["height"] = height
        header["format"] = format.encode("ascii")
        header["stride"] = stride
        header["slots"] = slots
        header["magic"] = _FRAMES_MAGIC
        del header  # no view may outlive a failed construction
        try:
            return cls(segment, generation)
        except BaseException:
            _close_segment(segment, unlink=True)
            raise

    @classmethod
    def attach(cls, ring_name: str, generation: int) -> _FrameBlock:
        segment = _attach_segment(f"{ring_name}_{generation}")
        try:
            return cls(segment, generation)
        except BaseException:
            _close_segment(segment)
            raise

    def close(self, unlink: bool = False) -> None:
        self.header = self.slots = self.pixels = None  # views must go before the mapping
        _close_segment(self.segment, unlink)


def _frame_block_layout(slots: int, frame_bytes: int) -> tuple[int, int, int]:
    """(offset of the first pixel slot, bytes from one slot to the next, total size)."""
    pixels_offset = _round_up(_FRAMES_HEADER.itemsize + slots * _SLOT.itemsize, _ALIGN)
    slot_pitch = _round_up(frame_bytes, _ALIGN)
    return pixels_offset, slot_pitch, pixels_offset + slots * slot_pitch


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class RingSegments(NamedTuple):
    name: str  # the ring's name: its control block
    owner_pid: int  # the writer's pid, from the control block
    segments: list[str]  # the control block, then its frame blocks


def list_rings() -> list[RingSegments]:
    """The frame rings in /dev/shm (Linux) with their segments. Other users' rings,
    and segments that are not ours (no magic), are left out; empty without /dev/shm."""
    if not os.path.isdir(_DEV_SHM):
        return []
    names = set(os.listdir(_DEV_SHM))
    rings = []
    for name in sorted(names):
        owner = _owner_of_ring(name) if _NAME_PATTERN.fullmatch(name) else None
        if owner is not None:
            blocks = sorted(other for other in names if re.fullmatch(rf"{re.escape(name)}_\d+", other))
            rings.append(RingSegments(name, owner, [name, *blocks]))
    return rings


def reclaim_abandoned_rings() -> list[str]:
    """Remove the rings (control and frame blocks) whose owner process is gone; returns
    the segments removed. A ring whose owner is alive, or whose pid now belongs to
    another process, is left alone. (Processes sharing /dev/shm from another pid
    namespace, another container, would look gone: give such setups their own /dev/shm.)"""
    removed = []
    for ring in list_rings():
        if _process_exists(ring.owner_pid):
            continue
        for segment in ring.segments:
            try:
                os.unlink(os.path.join(_DEV_SHM, segment))
                removed.append(segment)
            except FileNotFoundError:
                pass  # its owner's resource tracker got there first
    return removed


def _owner_of_ring(name: str) -> int | None:
    try:
        segment = _attach_segment(name)
    except OSError:  # gone meanwhile, still being created, or another user's
        return None
    try:
        control = _read_copy(segment, _CONTROL, "ring")
        return int(control["owner_pid"]) if control["magic"].item() == _CONTROL_MAGIC else None
    except ProtocolError:
        return None
    finally:
        _close_segment(segment)


def _process_exists(pid: int) -> bool:
    if not 0 < pid <= _MAX_PID:  # a control block's owner pid is its writer's to lie about; 0 means our own group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _check_control(segment: shared_memory.SharedMemory) -> None:
    control = _read_copy(segment, _CONTROL, "ring")
    if control["magic"].item() != _CONTROL_MAGIC:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "magic", f"{segment.name} is not a frame ring")
    if int(control["version"]) != RING_VERSION:
        raise ProtocolError(
            ErrorCode.PROTOCOL_VERSION,
            "version",
            f"ring {segment.name} has layout version {int(control['version'])}, this side reads {RING_VERSION}; "
            "install matching versions of the host bridge and the engine",
        )


def _read_copy(segment: shared_memory.SharedMemory, dtype: np.dtype, what: str) -> np.ndarray:
    if segment.size < dtype.itemsize:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "magic", f"{segment.name} is too small to be a {what}")
    return np.ndarray((), dtype, buffer=segment.buf).copy()


def _checked_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ValueError(f"ring names are 1-{MAX_NAME_CHARS} characters of A-Z, a-z, 0-9 and _; got {name!r}")
    return name


def _create_segment(name: str, size: int) -> shared_memory.SharedMemory:
    _check_room(size)
    segment = shared_memory.SharedMemory(name, create=True, size=size)
    _created_here.add(name)
    return segment


def _check_room(size: int) -> None:
    """Refuse a segment that does not fit in what is free of /dev/shm (Linux). Its pages
    are handed out only when written, so an oversized segment would be created fine and
    then kill its writer with SIGBUS in the middle of a frame."""
    if os.path.isdir(_DEV_SHM):
        free = shutil.disk_usage(_DEV_SHM).free
        if size > free:
            raise OSError(
                errno.ENOSPC,
                f"shared memory is full: a {size / 1e6:.1f} MB frame block does not fit in the "
                f"{free / 1e6:.1f} MB free in {_DEV_SHM}; use smaller frames, or give it more room "
                "(docker run --shm-size=...)",
            )


def _attach_segment(name: str) -> shared_memory.SharedMemory:
    """Open an existing segment without letting this process's resource tracker own it.
    FileNotFoundError if there is none, or it is not sized yet."""
    try:
        if sys.version_info >= (3, 13):
            return shared_memory.SharedMemory(name, track=False)
        segment = shared_memory.SharedMemory(name)
    except ValueError:  # "cannot mmap an empty file": its creator is between shm_open and ftruncate
        raise FileNotFoundError(f"shared-memory segment {name} is still being created") from None
    if os.name == "posix" and name not in _created_here:
        # Python 3.10-3.12 register POSIX segments under "/<name>".
        resource_tracker.unregister("/" + name, "shared_memory")
    return segment


def _close_segment(segment: shared_memory.SharedMemory, unlink: bool = False) -> None:
    segment.close()
    if unlink:
        segment.unlink()  # no-op on Windows, where the segment goes with its last handle
        _created_here.discard(segment.name)
