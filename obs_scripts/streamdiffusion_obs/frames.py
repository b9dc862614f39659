"""Pixels out of OBS and back in: reading a source back from the GPU, pushing frames into a source.

SourceReader renders a source into a texture of the output size and reads it back.
The read-back is asynchronous so that it does not stall OBS's render loop: copying a
texture into a stage surface (gs_stage_texture) only queues the copy on the GPU, and
mapping the surface waits until the copy is done. So each capture stages this frame
in one of two stage surfaces and maps the other one, staged at the previous capture,
whose copy finished long ago. A frame therefore reaches the engine one capture after
it was rendered; its capture time is taken when it is rendered, so the latency the
script reports includes that wait.

OutputFeeder shows the engine's frames in an asynchronous video source. A Python
script cannot register a source type of its own (OBS allows that to Lua only), so the
output source is a Media Source with no media, and frames are pushed into it with
obs_source_output_video2: libobs copies each frame, uploads it with the next rendered
frame, and with the source unbuffered always shows the newest one. It is the shortest
way from Python into OBS: the frame goes from the link's thread straight into the
source, without waiting for a timer tick, a file or a decoder.
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import obspython as obs

from .libobs import LibObs


@dataclass(frozen=True)
class CapturedFrame:
    pixels: np.ndarray  # [height, width, 4] uint8 RGBA, top row first
    t_capture_ns: int  # time.monotonic_ns() when the source was rendered


def cover_crop(source_width: int, source_height: int, width: int, height: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the largest centred part of the source with the
    output's aspect ratio: the source fills the output without being stretched."""
    scale = max(width / source_width, height / source_height)
    crop_width, crop_height = width / scale, height / scale
    left, top = (source_width - crop_width) / 2, (source_height - crop_height) / 2
    return left, top, left + crop_width, top + crop_height


class SourceReader:
    """Reads a source's pixels at width x height. Use inside obs_enter_graphics(), on one thread."""

    STAGES = 2

    def __init__(self, libobs: LibObs, width: int, height: int):
        self.width, self.height = width, height
        self._libobs = libobs
        self._texrender = obs.gs_texrender_create(obs.GS_RGBA, obs.GS_ZS_NONE)
        self._stages = [obs.gs_stagesurface_create(width, height, obs.GS_RGBA) for _ in range(self.STAGES)]
        self._next_stage = 0
        self._staged: tuple[int, int] | None = None  # (stage index, capture time) of the frame waiting to be mapped

    def read(self, source: Any) -> CapturedFrame | None:
        """Stage the source's current frame; return the one staged by the previous call, if any."""
        ready = self._map_staged()
        if self._render(source):
            stage = self._next_stage
            obs.gs_stage_texture(self._stages[stage], obs.gs_texrender_get_texture(self._texrender))
            self._staged = (stage, time.monotonic_ns())
            self._next_stage = (stage + 1) % self.STAGES
        return ready

    def destroy(self) -> None:
        for stage in self._stages:
            obs.gs_stagesurface_destroy(stage)
        obs.gs_texrender_destroy(self._texrender)
        self._stages, self._texrender, self._staged = [], None, None

    def _render(self, source: Any) -> bool:
        source_width, source_height = obs.obs_source_get_width(source), obs.obs_source_get_height(source)
        if not source_width or not source_height:  # nothing to show yet (a camera starting, say)
            return False
        obs.gs_texrender_reset(self._texrender)
        if not obs.gs_texrender_begin(self._texrender, self.width, self.height):
            return False
        black = obs.vec4()
        obs.vec4_zero(black)
        obs.gs_clear(obs.GS_CLEAR_COLOR, black, 0.0, 0)
        left, top, right, bottom = cover_crop(source_width, source_height, self.width, self.height)
        obs.gs_ortho(left, right, top, bottom, -100.0, 100.0)
        obs.gs_blend_state_push()
        obs.gs_blend_function(obs.GS_BLEND_ONE, obs.GS_BLEND_ZERO)  # copy the source's pixels, alpha included
        obs.obs_source_video_render(source)
        obs.gs_blend_state_pop()
        obs.gs_texrender_end(self._texrender)
        return True

    def _map_staged(self) -> CapturedFrame | None:
        if self._staged is None:
            return None
        (stage_index, t_capture_ns), self._staged = self._staged, None
        stage = self._stages[stage_index]
        mapped = self._libobs.map_stage_surface(stage)
        if mapped is None:
            return None
        address, linesize = mapped
        try:
            rows = np.empty((self.height, linesize), np.uint8)
            ctypes.memmove(rows.ctypes.data, address, rows.nbytes)
        finally:
            self._libobs.unmap_stage_surface(stage)
        pixels = rows[:, : self.width * 4].reshape(self.height, self.width, 4)
        return CapturedFrame(np.ascontiguousarray(pixels), t_capture_ns)  # copies only padded rows


class OutputFeeder:
    """Pushes RGBA frames into an async video source (see the module doc). Thread-safe."""

    def __init__(self, libobs: LibObs):
        self._libobs = libobs
        self._lock = threading.Lock()  # a frame is never pushed into a source being swapped out
        self._source: Any = None
        self.frames_shown = 0
        self.last_size: tuple[int, int] | None = None  # (width, height) of the last frame shown

    def attach(self, source: Any) -> None:
        """Feed `source` from now on (None: feed nothing). The caller keeps its reference."""
        with self._lock:
            self._source = source

    def show(self, rgba: np.ndarray) -> None:
        with self._lock:
            if self._source is None:
                return
            self._libobs.output_video(self._source, np.ascontiguousarray(rgba), time.monotonic_ns())
            self.frames_shown += 1
            self.last_size = (rgba.shape[1], rgba.shape[0])
