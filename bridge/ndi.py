"""NDI in and out: video over the network between machines (or on one), through cyndilib.

TouchDesigner, OBS (with DistroAV), vMix, Resolume and most broadcast tools send and
receive NDI. cyndilib (`pip install cyndilib`, the project's `ndi` extra) carries the NDI
runtime itself in its wheels (libndi.so on Linux), so nothing else is installed.

    with NdiReceiver("STUDIO (TouchDesigner)") as receiver:   # a source as NDI lists it; "" for the first
        frame = receiver.receive()          # NdiFrame (pixels, t_capture_ns, seq) or None
    with NdiSender("StreamDiffusion", fps=16) as sender:
        sender.send(pixels, "rgba8", t_capture_ns=..., seq=...)

How it behaves, and the facts behind it:
- Sources are found through NDI's own discovery (mDNS: on Linux an avahi daemon on the
  system D-Bus). NDI names a source `MACHINE (NAME)`; a receiver takes that full name, or
  just NAME when one machine's source by that name is meant, or "" for the first found.
- A receiver reads through NDI's frame synchroniser (FrameSync), which always holds the
  source's newest frame: a frame is new when its NDI timestamp changed. (Capturing with
  NDIlib_recv_capture while polling missed most frames of a 30 fps source here; the
  frame synchroniser missed none.) A source that goes away leaves its last frame, and no
  new one comes; when it (or another by that name) comes back the receiver connects again.
- Size changes need nothing: each frame carries its size.
- Capture timestamps travel as NDI metadata: before each video frame the sender sends
  `<sdbridge t_capture_ns=".." seq=".." t_submit_ns=".."/>` (times since the Unix epoch,
  in ns), and a receiver pairs a frame with the newest such message submitted before the
  frame's own NDI timestamp (NDI stamps each frame when it is submitted). Frames from
  senders that send none are stamped with their NDI timestamp, when their sender
  submitted them. Latencies between machines assume their clocks agree (NTP or PTP).
- Frames are top-left origin, RGBA or BGRA 8-bit.

cyndilib is imported only when a receiver, sender or list_sources needs it, so this module
loads anywhere; where it is missing they raise NdiUnavailable saying why and what to do.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from .protocol import FORMATS, ErrorCode, ProtocolError, check_frame_array

METADATA_TAG = "sdbridge"
# A frame is paired with a stamp submitted at most this long before it: the sender sends
# the stamp just before the frame, so anything older belongs to another frame.
STAMP_WINDOW_NS = 20_000_000
_STAMPS_KEPT = 64
RECONNECT_AFTER_S = 2.0  # a source not connected this long is looked for again (it may be back elsewhere)
_EPOCH_MINUS_MONOTONIC_NS = time.time_ns() - time.monotonic_ns()  # fixed, so conversions round-trip exactly


def epoch_to_monotonic_ns(epoch_ns: int) -> int:
    return epoch_ns - _EPOCH_MINUS_MONOTONIC_NS


def monotonic_to_epoch_ns(monotonic_ns: int) -> int:
    return monotonic_ns + _EPOCH_MINUS_MONOTONIC_NS


class NdiUnavailable(RuntimeError):
    """NDI cannot be used on this machine: `reason` says why, `fix` what to do."""

    def __init__(self, reason: str, fix: str):
        self.reason = reason
        self.fix = fix
        super().__init__(f"{reason}. {fix}")


@dataclass(frozen=True)
class NdiFrame:
    pixels: np.ndarray  # [height, width, channels] uint8 in the receiver's format
    t_capture_ns: int  # since the Unix epoch: the stamp its sender carried, else when it was submitted
    seq: int | None  # the sender's own count, when it sent one
    stamped: bool  # whether t_capture_ns came from the sender's metadata


def load_cyndilib() -> Any:
    """Import cyndilib, or raise NdiUnavailable saying why and what to do."""
    try:
        import cyndilib
    except ImportError as error:
        raise NdiUnavailable(f"cyndilib (the NDI binding, which carries the NDI runtime) is not installed ({error})",
                             "pip install cyndilib, or install this project with its ndi extra") from None
    except OSError as error:  # the runtime library itself failed to load
        raise NdiUnavailable(f"the NDI runtime did not load ({error})",
                             "reinstall cyndilib (pip install --force-reinstall cyndilib)") from None
    return cyndilib


def list_sources(timeout_s: float = 1.0) -> list[str]:
    """The NDI sources found within timeout_s, as NDI names them (`MACHINE (NAME)`)."""
    cyndilib = load_cyndilib()
    finder = cyndilib.Finder()
    finder.open()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            finder.wait_for_sources(min(0.2, max(0.0, deadline - time.monotonic())))
            finder.update_sources()
        return sorted(finder.get_source_names())
    finally:
        finder.close()


def matches(listed: str, wanted: str) -> bool:
    """Whether the NDI source `listed` (`MACHINE (NAME)`) is the one `wanted` names."""
    if not wanted or listed == wanted:
        return True
    return listed.endswith(f"({wanted})")


class NdiReceiver:
    """Receives an NDI source's frames; see the module doc."""

    def __init__(self, source_name: str = "", *, format: str = "rgba8", receiver_name: str = "sdbridge"):
        if format not in ("rgba8", "bgra8", "rgb8"):
            raise ProtocolError(ErrorCode.BAD_VALUE, "format", f"format must be one of {', '.join(FORMATS)}")
        self.source_name = source_name
        self.format = format
        lib = load_cyndilib()
        from cyndilib.receiver import ReceiveFrameType
        from cyndilib.wrapper.ndi_recv import RecvBandwidth, RecvColorFormat

        self._recv_metadata = ReceiveFrameType.recv_metadata
        color = RecvColorFormat.BGRX_BGRA if format == "bgra8" else RecvColorFormat.RGBX_RGBA
        self._finder = lib.Finder()
        self._finder.open()
        self._receiver = lib.Receiver(color_format=color, bandwidth=RecvBandwidth.highest, recv_name=receiver_name)
        self._video = lib.VideoFrameSync()
        self._receiver.frame_sync.set_video_frame(self._video)
        self._metadata = lib.MetadataRecvFrame()
        self._receiver.set_metadata_frame(self._metadata)
        self._connected: str | None = None  # the listed name of the source connected to
        self._last_timestamp: float | None = None
        self._last_stamp: tuple[int, int, int | None] | None = None
        self._stamps: deque[tuple[int, int, int | None]] = deque(maxlen=_STAMPS_KEPT)  # (t_submit, t_capture, seq)
        self._next_look = 0.0
        self._connected_until = 0.0

    @property
    def connected(self) -> str | None:
        """The source connected to (as NDI lists it), None while there is none."""
        return self._connected

    def receive(self) -> NdiFrame | None:
        """The source's newest frame if new since the last call, else None (also while the
        source is not there). Never waits."""
        if self._connected is None and not self._connect():
            return None
        if not self._receiver.is_connected():
            if time.monotonic() > self._connected_until:  # gone, or never answered: look for it again
                self._connected = None
            return None
        self._connected_until = time.monotonic() + RECONNECT_AFTER_S
        self._take_metadata()
        self._receiver.frame_sync.capture_video()
        video = self._video
        if video.xres == 0:
            return None
        timestamp = video.get_timestamp_posix()
        if timestamp == self._last_timestamp:
            return None
        self._last_timestamp = timestamp
        width, height = video.get_resolution()
        rgba = video.get_array().reshape(height, width, 4)
        pixels = rgba[..., :3].copy() if self.format == "rgb8" else rgba
        submitted_ns = round(timestamp * 1e9)
        stamp = self._stamp_for(submitted_ns)
        if stamp is None:  # its stamp may be just behind it
            self._take_metadata()
            stamp = self._stamp_for(submitted_ns)
        if stamp is not None:
            if stamp == self._last_stamp:  # the synchroniser repeats a frame whose source stopped sending
                return None
            self._last_stamp = stamp
            return NdiFrame(pixels, stamp[1], stamp[2], True)
        return NdiFrame(pixels, submitted_ns, None, False)

    def close(self) -> None:
        self._receiver.disconnect()
        self._finder.close()

    def __enter__(self) -> NdiReceiver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _connect(self) -> bool:
        now = time.monotonic()
        if now < self._next_look:  # at most a few looks a second
            return False
        self._next_look = now + 0.25
        self._finder.update_sources()
        for name in self._finder.get_source_names():
            if matches(name, self.source_name):
                source = self._finder.get_source(name)
                self._receiver.set_source(source)
                self._connected = name
                self._connected_until = now + RECONNECT_AFTER_S
                self._last_timestamp = None
                return True
        return False

    def _take_metadata(self) -> None:
        for _ in range(_STAMPS_KEPT):
            received = self._receiver.receive(self._recv_metadata, 0)
            if not received & self._recv_metadata:
                return
            if self._metadata.tag != METADATA_TAG:
                continue
            attrs = self._metadata.attrs
            try:
                seq = int(attrs["seq"]) if "seq" in attrs else None
                self._stamps.append((int(attrs["t_submit_ns"]), int(attrs["t_capture_ns"]), seq))
            except (KeyError, ValueError):
                continue

    def _stamp_for(self, submitted_ns: int) -> tuple[int, int, int | None] | None:
        best = None
        for stamp in self._stamps:
            # NDI's timestamps have 100 ns steps, and arrive here as float seconds: allow 1 µs.
            if stamp[0] <= submitted_ns + 1000 and submitted_ns - stamp[0] < STAMP_WINDOW_NS:
                if best is None or stamp[0] > best[0]:
                    best = stamp
        return best


class NdiSender:
    """Publishes frames as an NDI source named `name` (NDI lists it as `MACHINE (name)`)."""

    def __init__(self, name: str, *, fps: float = 30.0):
        if not name:
            raise ValueError("an NDI source needs a name")
        self.name = name
        lib = load_cyndilib()
        from cyndilib.wrapper.ndi_structs import FourCC

        self._fourccs = {"rgba8": FourCC.RGBA, "bgra8": FourCC.BGRA}
        self._lib = lib
        self._sender = lib.Sender(name, clock_video=False)  # the caller paces its frames
        self._frame = lib.VideoSendFrame()
        self._fps = Fraction(fps).limit_denominator(1001)
        self._shape: tuple[int, int, str] | None = None
        self.frames_sent = 0

    def send(self, pixels: np.ndarray, format: str = "rgba8", *, t_capture_ns: int | None = None,
             seq: int | None = None) -> bool:
        """Publish one [height, width, channels] uint8 frame, with its capture time (ns since
        the Unix epoch) carried as metadata. Any size; a new size reopens the source."""
        height, width = check_frame_array(pixels, format)
        if format == "rgb8":
            pixels = np.concatenate([pixels, np.full((height, width, 1), 255, np.uint8)], axis=2)
            format = "rgba8"
        if self._shape != (width, height, format):
            self._reopen(width, height, format)
        now_ns = time.time_ns()
        attrs = {"t_submit_ns": str(now_ns), "t_capture_ns": str(now_ns if t_capture_ns is None else t_capture_ns)}
        if seq is not None:
            attrs["seq"] = str(seq)
        self._sender.send_metadata(METADATA_TAG, attrs)
        sent = self._sender.write_video(np.ascontiguousarray(pixels).reshape(-1))
        self.frames_sent += bool(sent)
        return bool(sent)

    def connections(self) -> int:
        return self._sender.get_num_connections(0)

    def close(self) -> None:
        if self._shape is not None:
            self._sender.close()
            self._shape = None

    def __enter__(self) -> NdiSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _reopen(self, width: int, height: int, format: str) -> None:
        if self._shape is not None:
            self._sender.close()
            self._sender = self._lib.Sender(self.name, clock_video=False)
            self._frame = self._lib.VideoSendFrame()
        self._frame.set_resolution(width, height)
        self._frame.set_frame_rate(self._fps)
        self._frame.set_fourcc(self._fourccs[format])
        self._sender.set_video_frame(self._frame)
        self._sender.open()
        self._shape = (width, height, format)
