"""The two libobs calls the frame path needs and obspython cannot make, through ctypes.

- gs_stagesurface_map(stage, uint8_t **data, uint32_t *linesize): obspython wraps it,
  but has no way to pass the two out-arguments, so the pixels of a staged texture
  cannot be reached from obspython. The same function of the libobs already loaded
  in the OBS process, called through ctypes, returns them.
- obs_source_output_video2(source, const struct obs_source_frame2 *frame): pushes a
  frame into an asynchronous video source. obspython cannot fill the struct's arrays
  of plane pointers from Python; ctypes can.

obspython objects are SWIG pointers: int(obj) is the address ctypes passes on.

The stage-surface calls go through ctypes.PyDLL, which keeps Python's lock (the GIL)
during the call: they run inside the script's timer, in OBS's graphics context, and a
timer that let go of the lock there would let OBS's UI thread run Python code that may
itself wait for the graphics context, a deadlock. They are quick, the copy being
finished by the time they are called. obs_source_output_video2 runs on the engine
link's thread and lets go of the lock (ctypes.CDLL), so the timer can run meanwhile.
The layout of struct obs_source_frame2 and the enum values are libobs's (obs.h and
media-io/video-io.h), unchanged since OBS 26.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

MAX_AV_PLANES = 8
VIDEO_FORMAT_RGBA = 6  # enum video_format
VIDEO_RANGE_FULL = 2  # enum video_range_type

# How libobs is named in each OS's OBS; on macOS it is a framework the OBS binary links,
# so its symbols are looked up in the process itself.
LIBRARY_NAMES = {"linux": "libobs.so.0", "win32": "obs.dll", "darwin": None}


class SourceFrame2(ctypes.Structure):
    """struct obs_source_frame2."""

    _fields_ = [
        ("data", ctypes.c_void_p * MAX_AV_PLANES),
        ("linesize", ctypes.c_uint32 * MAX_AV_PLANES),
        ("width", ctypes.c_uint32),
        ("height", ctypes.c_uint32),
        ("timestamp", ctypes.c_uint64),
        ("format", ctypes.c_int),
        ("range", ctypes.c_int),
        ("color_matrix", ctypes.c_float * 16),
        ("color_range_min", ctypes.c_float * 3),
        ("color_range_max", ctypes.c_float * 3),
        ("flip", ctypes.c_bool),
        ("flags", ctypes.c_uint8),
        ("trc", ctypes.c_uint8),
    ]


class LibObs:
    """libobs's stage-surface mapping and async video output, for obspython objects."""

    def __init__(self, name: str | None):
        holding_the_gil, releasing_the_gil = ctypes.PyDLL(name), ctypes.CDLL(name)
        self._map = holding_the_gil.gs_stagesurface_map
        self._map.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_uint32)]
        self._map.restype = ctypes.c_bool
        self._unmap = holding_the_gil.gs_stagesurface_unmap
        self._unmap.argtypes = [ctypes.c_void_p]
        self._unmap.restype = None
        self._output_video = releasing_the_gil.obs_source_output_video2
        self._output_video.argtypes = [ctypes.c_void_p, ctypes.POINTER(SourceFrame2)]
        self._output_video.restype = None

    def map_stage_surface(self, stage: Any) -> tuple[int, int] | None:
        """(address, bytes per row) of a staged texture's pixels, or None when it holds none.
        Call inside obs_enter_graphics(), and unmap_stage_surface() when done."""
        data, linesize = ctypes.c_void_p(), ctypes.c_uint32()
        if not self._map(int(stage), ctypes.byref(data), ctypes.byref(linesize)):
            return None
        return data.value, linesize.value

    def unmap_stage_surface(self, stage: Any) -> None:
        self._unmap(int(stage))

    def output_video(self, source: Any, rgba: Any, timestamp_ns: int) -> None:
        """Push a C-contiguous uint8 [height, width, 4] RGBA numpy array into an async source.
        libobs copies the pixels before returning; any thread may call this."""
        height, width = rgba.shape[:2]
        frame = SourceFrame2()
        frame.data[0] = rgba.ctypes.data
        frame.linesize[0] = width * 4
        frame.width, frame.height = width, height
        frame.timestamp = timestamp_ns
        frame.format = VIDEO_FORMAT_RGBA
        frame.range = VIDEO_RANGE_FULL
        self._output_video(int(source), ctypes.byref(frame))


def load() -> LibObs:
    """The libobs of this OBS process. Raises OSError where it cannot be found."""
    if sys.platform not in LIBRARY_NAMES:
        raise OSError(f"the script does not know how libobs is named on {sys.platform}")
    return LibObs(LIBRARY_NAMES[sys.platform])
