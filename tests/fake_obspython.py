"""A fake `obspython` module for unit tests of obs_scripts/, following OBS's scripting API.

Install it as sys.modules["obspython"] before the script is imported, and call
reset() before each test. It keeps the parts of OBS Studio 29 a script sees, as OBS's
documentation (docs.obsproject.com: Python scripting, obs_data, properties, sources,
scenes, frontend, graphics) describes them, and the enum values of libobs's headers:

- obs_data: a value set by the user wins over a default; get_* of an unset name gives
  the type's zero. Data objects are reference counted (obs_data_create gives one).
- Properties: obs_properties_create and obs_properties_add_*; lists hold (label,
  value) items, which can be disabled; an OBS_TEXT_INFO property shows its long
  description beside its label; a group holds properties of its own, and
  obs_properties_get finds a property inside groups too. A button's callback is called
  with the topmost properties and the button, and returns whether the properties view
  should be redrawn (click() here).
- A script's life (load_script, update_script, unload_script here): OBS calls
  script_defaults, script_load, then script_update; on unload it removes the script's
  timers itself, then calls script_unload.
- Timers: timer_add(callback, ms) runs callback on OBS's graphics thread (tick()
  here runs each timer once); timer_remove(callback) removes the timers of that very
  callback object.
- References: obs_get_source_by_name, obs_frontend_get_current_scene,
  obs_enum_sources, obs_source_get_ref and obs_source_create return references the
  caller must release. OBS itself holds one on each source a user made and one per
  scene item. leaks() lists what the script still holds, which the real OBS reports
  at exit as "Number of memory leaks".
- Graphics: gs_* calls are only allowed between obs_enter_graphics() and
  obs_leave_graphics(), and every texrender and stage surface made must be destroyed.
  Rendering is modelled: obs_source_video_render draws the source's pixels through
  the current gs_ortho projection into the texrender begun, nearest-pixel, and
  gs_stage_texture copies a texture into a stage surface whose rows are padded, as
  GPU drivers pad them.
- FakeLibObs stands in for streamdiffusion_obs.libobs.LibObs (the calls made through
  ctypes): mapping a stage surface gives its padded rows, and pushing a frame into an
  async source makes it the frame the source shows and its size.
"""

from __future__ import annotations

import itertools
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

# -- enum values of libobs's headers ----------------------------------------------------------
LOG_ERROR, LOG_WARNING, LOG_INFO, LOG_DEBUG = 100, 200, 300, 400
OBS_TEXT_DEFAULT, OBS_TEXT_PASSWORD, OBS_TEXT_MULTILINE, OBS_TEXT_INFO = 0, 1, 2, 3
OBS_COMBO_TYPE_INVALID, OBS_COMBO_TYPE_EDITABLE, OBS_COMBO_TYPE_LIST = 0, 1, 2
OBS_COMBO_FORMAT_INVALID, OBS_COMBO_FORMAT_INT, OBS_COMBO_FORMAT_FLOAT, OBS_COMBO_FORMAT_STRING = 0, 1, 2, 3
OBS_PATH_FILE, OBS_PATH_FILE_SAVE, OBS_PATH_DIRECTORY = 0, 1, 2
OBS_GROUP_NORMAL, OBS_GROUP_CHECKABLE = 1, 2
OBS_SOURCE_VIDEO, OBS_SOURCE_AUDIO, OBS_SOURCE_ASYNC = 1 << 0, 1 << 1, 1 << 2
OBS_SOURCE_ASYNC_VIDEO = OBS_SOURCE_ASYNC | OBS_SOURCE_VIDEO
GS_UNKNOWN, GS_A8, GS_R8, GS_RGBA, GS_BGRX, GS_BGRA = 0, 1, 2, 3, 4, 5
GS_ZS_NONE = 0
GS_CLEAR_COLOR = 1 << 0
GS_BLEND_ZERO, GS_BLEND_ONE = 0, 1

STAGE_ROW_PADDING = 64  # bytes a fake GPU driver adds to each row of a stage surface

# Source types the fake OBS has, as obs_source_get_display_name names them, and their output flags.
BUILTIN_TYPES = {
    "scene": ("Scene", OBS_SOURCE_VIDEO),
    "color_source_v3": ("Color Source", OBS_SOURCE_VIDEO),
    "image_source": ("Image", OBS_SOURCE_VIDEO),
    "ffmpeg_source": ("Media Source", OBS_SOURCE_ASYNC_VIDEO | OBS_SOURCE_AUDIO),
    "wasapi_output_capture": ("Audio Output Capture", OBS_SOURCE_AUDIO),
}

_addresses = itertools.count(0x10000, 0x100)


class _Pointer:
    """What obspython hands out: an opaque object; int() of it is the C address."""

    def __init__(self):
        self._address = next(_addresses)

    def __int__(self) -> int:
        return self._address


# -- state of the fake OBS ------------------------------------------------------------------------
@dataclass
class _State:
    types: dict[str, tuple[str, int]] = field(default_factory=lambda: dict(BUILTIN_TYPES))
    sources: dict[str, Source] = field(default_factory=dict)  # by name: the sources OBS lists
    every_source: list[Source] = field(default_factory=list)  # all ever made, filters and removed ones too
    current_scene: Source | None = None
    timers: list[tuple[Callable[[], None], int]] = field(default_factory=list)
    log: list[tuple[int, str]] = field(default_factory=list)
    data: list[Data] = field(default_factory=list)  # every obs_data made by the script
    graphics_depth: dict[int, int] = field(default_factory=dict)  # thread id -> obs_enter_graphics nesting
    graphics_objects: set = field(default_factory=set)  # texrenders and stage surfaces alive
    graphics_lock: threading.RLock = field(default_factory=threading.RLock)
    lagged_frames: int = 0
    total_frames: int = 0


_state = _State()


def reset() -> None:
    global _state
    _state = _State()


def register_type(kind: str, display_name: str, flags: int = OBS_SOURCE_VIDEO) -> None:
    """Make a source type known, as installing a plugin would (Spout2's, say)."""
    _state.types[kind] = (display_name, flags)


def log_lines() -> list[str]:
    return [message for _, message in log_records()]


def log_records() -> list[tuple[int, str]]:
    """What scripts wrote to the script log: (level, message), oldest first."""
    return list(_state.log)


# -- obs_data -----------------------------------------------------------------------------------------
class Data(_Pointer):
    def __init__(self, values: dict | None = None):
        super().__init__()
        self.values: dict[str, Any] = dict(values or {})
        self.defaults: dict[str, Any] = {}
        self.refs = 1

    def get(self, name: str, zero: Any) -> Any:
        return self.values.get(name, self.defaults.get(name, zero))


def settings(values: dict | None = None) -> Data:
    """Settings as OBS hands them to script_load/script_update: owned by OBS, not counted as the script's."""
    return Data(values)


def obs_data_create() -> Data:
    data = Data()
    _state.data.append(data)
    return data



def obs_data_release(data: Data | None) -> None:
    if data is not None:
        data.refs -= 1
        assert data.refs >= 0, "obs_data released more often than referenced"


def obs_data_get_string(data: Data, name: str) -> str:
    return data.get(name, "")


def obs_data_get_int(data: Data, name: str) -> int:
    return int(data.get(name, 0))


def obs_data_get_double(data: Data, name: str) -> float:
    return float(data.get(name, 0.0))


def obs_data_get_bool(data: Data, name: str) -> bool:
    return bool(data.get(name, False))



def _setter(store: str, kind: type) -> Callable[[Data, str, Any], None]:
    def set_value(data: Data, name: str, value: Any) -> None:
        getattr(data, store)[name] = kind(value)

    return set_value


obs_data_set_string, obs_data_set_default_string = _setter("values", str), _setter("defaults", str)
obs_data_set_default_int, obs_data_set_default_double = _setter("defaults", int), _setter("defaults", float)
obs_data_set_default_bool = _setter("defaults", bool)


# -- properties -------------------------------------------------------------------------------------
@dataclass
class Property:
    name: str
    description: str
    kind: str  # text, path, list, button, bool, int, float, group
    text_type: int | None = None
    long_description: str | None = None
    items: list[list] = field(default_factory=list)  # [label, value, disabled] for lists
    callback: Callable | None = None
    bounds: tuple = ()  # (minimum, maximum, step) for numbers
    slider: bool = False  # a number shown as a slider (else a spin box)
    group: Properties | None = None  # a group's content

    def item_values(self) -> list:
        return [value for _, value, _ in self.items]


class Properties(_Pointer):
    def __init__(self):
        super().__init__()
        self.by_name: dict[str, Property] = {}
        self.parent: Properties | None = None

    def add(self, prop: Property) -> Property:
        assert obs_properties_get(_topmost(self), prop.name) is None, f"two properties named {prop.name}"
        self.by_name[prop.name] = prop
        return prop

    def all(self) -> dict[str, Property]:
        """Every property, those in groups included, by name."""
        found = {}
        for name, prop in self.by_name.items():
            found[name] = prop
            if prop.group is not None:
                found.update(prop.group.all())
        return found


def _topmost(props: Properties) -> Properties:
    while props.parent is not None:
        props = props.parent
    return props


def obs_properties_create() -> Properties:
    return Properties()


def obs_properties_get(props: Properties, name: str) -> Property | None:
    return props.all().get(name)


def obs_properties_add_group(props: Properties, name: str, description: str, group_type: int,
                             group: Properties) -> Property:
    for inner in group.all():
        assert obs_properties_get(_topmost(props), inner) is None, f"two properties named {inner}"
    group.parent = props
    return props.add(Property(name, description, "group", group=group))


def obs_properties_add_text(props: Properties, name: str, description: str, text_type: int) -> Property:
    return props.add(Property(name, description, "text", text_type=text_type))


def obs_properties_add_path(props, name, description, path_type, filter, default_path) -> Property:
    return props.add(Property(name, description, "path"))


def obs_properties_add_list(props, name, description, combo_type, combo_format) -> Property:
    return props.add(Property(name, description, "list"))


def obs_properties_add_button(props, name, text, callback) -> Property:
    return props.add(Property(name, text, "button", callback=callback))


def obs_properties_add_bool(props, name, description) -> Property:
    return props.add(Property(name, description, "bool"))


def obs_properties_add_int(props, name, description, minimum, maximum, step) -> Property:
    return props.add(Property(name, description, "int", bounds=(minimum, maximum, step)))


def obs_properties_add_int_slider(props, name, description, minimum, maximum, step) -> Property:
    return props.add(Property(name, description, "int", bounds=(minimum, maximum, step), slider=True))


def obs_properties_add_float(props, name, description, minimum, maximum, step) -> Property:
    return props.add(Property(name, description, "float", bounds=(minimum, maximum, step)))


def obs_properties_add_float_slider(props, name, description, minimum, maximum, step) -> Property:
    return props.add(Property(name, description, "float", bounds=(minimum, maximum, step), slider=True))



def obs_property_list_add_string(prop: Property, label: str, value: str) -> int:
    prop.items.append([label, value, False])
    return len(prop.items) - 1


def obs_property_list_clear(prop: Property) -> None:
    prop.items.clear()


def obs_property_list_item_disable(prop: Property, index: int, disabled: bool) -> None:
    prop.items[index][2] = disabled


def obs_property_set_long_description(prop: Property, text: str) -> None:
    prop.long_description = text




def click(props: Properties, name: str) -> bool:
    """Press a button in the properties view, as a user would."""
    top = _topmost(props)
    prop = obs_properties_get(top, name)
    return prop.callback(top, prop)


# -- timers and logging ---------------------------------------------------------------------------
def timer_add(callback: Callable[[], None], milliseconds: int) -> None:
    _state.timers.append((callback, milliseconds))


def timer_remove(callback: Callable[[], None]) -> None:
    _state.timers = [(cb, ms) for cb, ms in _state.timers if cb is not callback]


def timers() -> list[tuple[Callable[[], None], int]]:
    return list(_state.timers)


def tick() -> None:
    """One video frame: each timer runs once (as OBS does when its interval is a frame or shorter)."""
    _state.total_frames += 1
    for callback, _ in list(_state.timers):
        callback()


def script_log(level: int, message: str) -> None:
    _state.log.append((level, message))


# -- a script's life, as OBS runs it -----------------------------------------------------------------
def load_script(script: Any, settings: Data) -> None:
    script.script_defaults(settings)
    script.script_load(settings)
    script.script_update(settings)


def update_script(script: Any, settings: Data, **changes: Any) -> None:
    """The user changes settings in the script's properties."""
    settings.values.update(changes)
    script.script_update(settings)


def unload_script(script: Any) -> None:
    _state.timers.clear()  # OBS removes the script's timers before calling script_unload
    script.script_unload()


# -- sources and scenes ------------------------------------------------------------------------------
class Source(_Pointer):
    def __init__(self, kind: str, name: str, settings: Data | None, pixels: np.ndarray | None = None):
        super().__init__()
        self.kind, self.name = kind, name
        self.settings = dict(settings.values) if settings is not None else {}
        self.refs = 1
        self.held_by_obs = 0  # references OBS itself holds: the frontend's, scene items', a filtered source's
        self.removed = False
        self.showing = 0
        self.async_unbuffered = False
        self.filters: list[Source] = []
        self.items: list[Source] = []  # a scene's sources
        self.pixels = pixels  # [h, w, 4] RGBA the source renders: its image, or the last async frame
        self.frames_pushed = 0
        self._lock = threading.Lock()
        _state.every_source.append(self)

    @property
    def script_refs(self) -> int:
        return self.refs - self.held_by_obs

    def push(self, rgba: np.ndarray) -> None:
        with self._lock:
            self.pixels = rgba.copy()
            self.frames_pushed += 1


def add_source(kind: str, name: str, pixels: np.ndarray | None = None, in_scene: bool = True) -> Source:
    """A source the user made, shown in the current scene (whose item then holds the only reference
    to it), or, with in_scene False or no scene yet, held by OBS's frontend (as scenes are)."""
    source = Source(kind, name, None, pixels)
    _state.sources[name] = source
    if in_scene and _state.current_scene is not None:
        obs_scene_add(_state.current_scene, source)
        source.refs -= 1  # the frontend lets go of the reference it made the source with
    else:
        source.held_by_obs = 1
    return source


def make_current_scene(name: str = "Scene") -> Source:
    """The scene OBS shows; until this is called there is none, as while OBS is starting."""
    scene = add_source("scene", name, in_scene=False)
    _state.current_scene = scene
    return scene


def remove_source(name: str) -> None:
    """The user deletes a source: OBS drops its own references and marks it removed."""
    source = _state.sources.pop(name)
    source.removed = True
    for scene in [s for s in _state.sources.values() if source in s.items]:
        scene.items.remove(source)
    source.refs -= source.held_by_obs
    source.held_by_obs = 0


def source(name: str) -> Source | None:
    return _state.sources.get(name)


def leaks() -> list[str]:
    """What the script still holds: references, obs_data, graphics objects, showing counts."""
    found = [f"source {s.name!r}: {s.script_refs} reference(s)" for s in _state.every_source if s.script_refs > 0]
    found += [f"source {s.name!r}: showing {s.showing}" for s in _state.every_source if s.showing]
    found += [f"obs_data {d.values}" for d in _state.data if d.refs > 0]
    found += [f"graphics object {type(o).__name__}" for o in _state.graphics_objects]
    return found


def obs_get_source_by_name(name: str) -> Source | None:
    found = _state.sources.get(name)
    if found is not None:
        found.refs += 1
    return found


def obs_source_get_ref(src: Source) -> Source:
    src.refs += 1
    return src


def obs_source_release(src: Source | None) -> None:
    if src is None:
        return
    src.refs -= 1
    assert src.refs >= 0, f"source {src.name!r} released more often than referenced"


def obs_enum_sources() -> list[Source]:
    """Every input source (no scenes), each with a new reference."""
    found = [s for s in _state.sources.values() if s.kind != "scene"]
    for s in found:
        s.refs += 1
    return found


def source_list_release(sources: list[Source] | None) -> None:
    for s in sources or []:
        obs_source_release(s)


def obs_source_create(kind: str, name: str, settings: Data | None, hotkeys: Data | None) -> Source:
    created = Source(kind, name, settings)
    _state.sources[name] = created
    return created


def obs_source_create_private(kind: str, name: str, settings: Data | None) -> Source:
    return Source(kind, name, settings)


def obs_source_get_name(src: Source) -> str:
    return src.name



def obs_source_get_unversioned_id(src: Source) -> str:
    return re.sub(r"_v\d+$", "", src.kind)


def obs_source_get_display_name(kind: str) -> str | None:
    entry = _state.types.get(kind)
    return None if entry is None else entry[0]


def obs_source_get_output_flags(src: Source) -> int:
    return _state.types.get(src.kind, ("", 0))[1]


def obs_source_get_width(src: Source) -> int:
    return 0 if src.pixels is None else src.pixels.shape[1]


def obs_source_get_height(src: Source) -> int:
    return 0 if src.pixels is None else src.pixels.shape[0]


def obs_source_removed(src: Source) -> bool:
    return src.removed


def obs_source_inc_showing(src: Source) -> None:
    src.showing += 1


def obs_source_dec_showing(src: Source) -> None:
    src.showing -= 1
    assert src.showing >= 0, f"source {src.name!r}: showing decremented below zero"


def obs_source_set_async_unbuffered(src: Source, unbuffered: bool) -> None:
    src.async_unbuffered = unbuffered


def obs_source_filter_add(src: Source, filter_source: Source) -> None:
    src.filters.append(filter_source)
    filter_source.refs += 1
    filter_source.held_by_obs += 1


def obs_source_filter_remove(src: Source, filter_source: Source) -> None:
    src.filters.remove(filter_source)
    filter_source.refs -= 1
    filter_source.held_by_obs -= 1


def obs_frontend_get_current_scene() -> Source | None:
    scene = _state.current_scene
    if scene is not None:
        scene.refs += 1
    return scene


def obs_scene_from_source(src: Source) -> Source:
    assert src.kind == "scene", f"{src.name!r} is not a scene"
    return src  # the scene and its source are one object here; OBS adds no reference


def obs_scene_add(scene: Source, src: Source) -> object:
    scene.items.append(src)
    src.refs += 1
    src.held_by_obs += 1
    return object()  # the scene item; the scene holds it


def obs_get_lagged_frames() -> int:
    return _state.lagged_frames


def obs_get_total_frames() -> int:
    return _state.total_frames


# -- graphics -------------------------------------------------------------------------------------------
class vec4:  # noqa: N801 - obspython's name
    def __init__(self):
        self.x = self.y = self.z = self.w = 0.0


def vec4_zero(v: vec4) -> None:
    v.x = v.y = v.z = v.w = 0.0


class TexRender(_Pointer):
    def __init__(self):
        super().__init__()
        self.pixels: np.ndarray | None = None
        self.projection: tuple[float, float, float, float] | None = None


class Texture(_Pointer):
    def __init__(self, pixels: np.ndarray):
        super().__init__()
        self.pixels = pixels


class StageSurface(_Pointer):
    def __init__(self, width: int, height: int):
        super().__init__()
        self.width, self.height = width, height
        self.linesize = width * 4 + STAGE_ROW_PADDING
        self.rows = np.zeros((height, self.linesize), np.uint8)
        self.staged = False
        self.mapped = False


_render_target: TexRender | None = None


def obs_enter_graphics() -> None:
    _state.graphics_lock.acquire()
    thread = threading.get_ident()
    _state.graphics_depth[thread] = _state.graphics_depth.get(thread, 0) + 1


def obs_leave_graphics() -> None:
    thread = threading.get_ident()
    assert _state.graphics_depth.get(thread, 0) > 0, "obs_leave_graphics without obs_enter_graphics"
    _state.graphics_depth[thread] -= 1
    _state.graphics_lock.release()


def _in_graphics() -> None:
    if _state.graphics_depth.get(threading.get_ident(), 0) == 0:
        raise RuntimeError("a gs_* call outside obs_enter_graphics()")


def gs_texrender_create(color_format: int, zstencil_format: int) -> TexRender:
    _in_graphics()
    texrender = TexRender()
    _state.graphics_objects.add(texrender)
    return texrender


def gs_texrender_destroy(texrender: TexRender) -> None:
    _in_graphics()
    _state.graphics_objects.remove(texrender)


def gs_texrender_reset(texrender: TexRender) -> None:
    _in_graphics()
    texrender.pixels = None


def gs_texrender_begin(texrender: TexRender, width: int, height: int) -> bool:
    global _render_target
    _in_graphics()
    texrender.pixels = np.zeros((height, width, 4), np.uint8)
    _render_target = texrender
    return True


def gs_texrender_end(texrender: TexRender) -> None:
    global _render_target
    _in_graphics()
    _render_target = None


def gs_texrender_get_texture(texrender: TexRender) -> Texture:
    _in_graphics()
    return Texture(texrender.pixels)


def gs_clear(flags: int, color: vec4, depth: float, stencil: int) -> None:
    _in_graphics()
    if flags & GS_CLEAR_COLOR:
        _render_target.pixels[:] = np.array([color.x, color.y, color.z, color.w]) * 255


def gs_ortho(left: float, right: float, top: float, bottom: float, znear: float, zfar: float) -> None:
    _in_graphics()
    _render_target.projection = (left, right, top, bottom)


def gs_blend_state_push() -> None:
    _in_graphics()


def gs_blend_state_pop() -> None:
    _in_graphics()


def gs_blend_function(source_blend: int, destination_blend: int) -> None:
    _in_graphics()


def obs_source_video_render(src: Source) -> None:
    """Draw the source into the texrender begun: each target pixel shows the source pixel
    the projection puts there (nearest), where that lies inside the source."""
    _in_graphics()
    target = _render_target
    if src.pixels is None or target is None:
        return
    with src._lock:
        pixels = src.pixels
    height, width = target.pixels.shape[:2]
    left, right, top, bottom = target.projection
    xs = np.floor(left + (np.arange(width) + 0.5) * (right - left) / width).astype(int)
    ys = np.floor(top + (np.arange(height) + 0.5) * (bottom - top) / height).astype(int)
    inside_x = (xs >= 0) & (xs < pixels.shape[1])
    inside_y = (ys >= 0) & (ys < pixels.shape[0])
    target.pixels[np.ix_(inside_y, inside_x)] = pixels[np.ix_(ys[inside_y], xs[inside_x])]


def gs_stagesurface_create(width: int, height: int, color_format: int) -> StageSurface:
    _in_graphics()
    stage = StageSurface(width, height)
    _state.graphics_objects.add(stage)
    return stage


def gs_stagesurface_destroy(stage: StageSurface) -> None:
    _in_graphics()
    _state.graphics_objects.remove(stage)


def gs_stage_texture(stage: StageSurface, texture: Texture) -> None:
    _in_graphics()
    stage.rows[:, : stage.width * 4] = texture.pixels.reshape(stage.height, stage.width * 4)
    stage.staged = True


class FakeLibObs:
    """Stands in for streamdiffusion_obs.libobs.LibObs (the libobs calls made through ctypes)."""

    def map_stage_surface(self, stage: StageSurface) -> tuple[int, int] | None:
        _in_graphics()
        assert not stage.mapped, "stage surface mapped twice"
        if not stage.staged:
            return None
        stage.mapped = True
        return stage.rows.ctypes.data, stage.linesize

    def unmap_stage_surface(self, stage: StageSurface) -> None:
        _in_graphics()
        assert stage.mapped, "unmap of a stage surface not mapped"
        stage.mapped = False

    def output_video(self, src: Source, rgba: np.ndarray, timestamp_ns: int) -> None:
        assert rgba.flags.c_contiguous and rgba.dtype == np.uint8 and rgba.shape[2] == 4
        assert obs_source_get_output_flags(src) & OBS_SOURCE_ASYNC, f"{src.name!r} is not an async source"
        assert src.refs > 0, "a frame pushed into a destroyed source"
        src.push(rgba)  # libobs copies the frame
