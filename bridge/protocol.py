"""The wire protocol between host applications and the engine.

Everything on the wire is msgpack (never pickle), so hosts in any language can speak it.

Control messages are msgpack maps with a "type" key. Hosts send requests:

    hello    open a session: protocol version, transport, model, size, prompt, params
    params   change session parameters while it streams
    stats    ask for a session's statistics
    ping     liveness check
    bye      close a session
    shutdown stop the engine cleanly (its sessions closed, its shared memory unlinked)

and the engine answers each with a reply that echoes the request's "id":

    ok       success, with a payload map
    error    failure: code, field (the field at fault, None for the message as a whole)
             and a human-readable message

A frame travels as a header map {session, seq, t_capture_ns, width, height, format,
stride} beside its pixel bytes: rows top to bottom, `stride` bytes apart, each row
`width * channels` bytes of uint8.

Every message object in this module is validated when it is made, so a message that
exists is a valid one; decoding builds the same objects and therefore runs the same
checks. Any problem raises ProtocolError, whose code, field and message go straight
into an error reply. Unknown fields are ignored so that newer peers can add fields.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import msgpack
import numpy as np

from .params import MAX_PROMPT_CHARS, PAIR_KINDS, PARAMS, PairKind, Param

PROTOCOL_VERSION = 1

# Limits: everything a peer sends is bounded before we act on it.
MAX_WIDTH = 8192
MAX_HEIGHT = 8192
MAX_MESSAGE_BYTES = 64 * 1024  # one encoded control message or frame header
MAX_PARAMS = 64  # entries in one params map
MAX_INT = 2**63 - 1  # ids, sequence numbers, timestamps and seeds fit in int64

FORMATS: Mapping[str, int] = {"rgba8": 4, "rgb8": 3, "bgra8": 4}  # bytes per pixel
MAX_FRAME_BYTES = MAX_WIDTH * MAX_HEIGHT * max(FORMATS.values())
TRANSPORTS = ("shm", "zmq", "spout", "ndi", "syphon")
# Transports whose frames the engine itself reads and publishes (engine/endpoints.py): no frames pass the host.
ENGINE_SIDE_TRANSPORTS = ("spout", "ndi", "syphon")


class ErrorCode(str, enum.Enum):
    """The `code` of an error reply. The values are what travels on the wire."""

    BAD_MESSAGE = "bad_message"  # not decodable msgpack, or not a map
    TOO_LARGE = "too_large"  # over a size limit
    UNKNOWN_TYPE = "unknown_type"  # a "type" this side does not accept
    PROTOCOL_VERSION = "protocol_version"  # hello from a different protocol version
    MISSING_FIELD = "missing_field"
    BAD_TYPE = "bad_type"  # e.g. a string where a number belongs
    OUT_OF_RANGE = "out_of_range"  # a number, or a string's length, outside its bounds
    BAD_VALUE = "bad_value"  # not one of the allowed choices, or malformed
    UNKNOWN_PARAM = "unknown_param"  # a parameter name the engine does not have
    SIZE_MISMATCH = "size_mismatch"  # pixel bytes disagree with the frame header
    UNKNOWN_SESSION = "unknown_session"  # for the engine: no such session
    MODEL_UNAVAILABLE = "model_unavailable"  # the engine does not serve that model, or could not load it
    SESSION_FAILED = "session_failed"  # a step failed (out of memory, say); the engine closed the session
    # An output the session asked for besides its host (a virtual camera) cannot be opened
    # on the engine's machine; the message says why and the fix, and the session goes on.
    OUTPUT_UNAVAILABLE = "output_unavailable"
    # The engine failed to handle a valid request (a fault of the engine's, in its log); it
    # goes on serving, this session included.
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A message or frame was rejected. The attributes are the fields of an error reply.

    request_id is the id of the request at fault when decode_message could read one,
    so that the error reply reaches the host waiting for it.
    """

    def __init__(self, code: str, field: str | None, message: str):
        # Plain strings, so that a code from a newer peer that is not in ErrorCode still works.
        self.code = code.value if isinstance(code, ErrorCode) else str(code)
        self.field = field
        self.message = message
        self.request_id: int | None = None
        super().__init__(f"{self.code} ({field or 'message'}): {message}")


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class ValueSpec:
    """What one field or parameter may hold.

    kind is bool, int, float or str. For numbers, minimum and maximum bound the value;
    for strings they bound the length in characters. choices, when given, lists the
    allowed strings; pattern, when given, is a regular expression the whole string must
    match. Numbers convert between int and float only where nothing is lost (14.0 is
    an acceptable int, 14 an acceptable float); booleans are never numbers.
    """

    kind: type
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    allow_none: bool = False

    def check(self, name: str, value: Any) -> Any:
        """Return value, converted to kind, or raise ProtocolError naming `name`."""
        if value is _MISSING:
            raise ProtocolError(ErrorCode.MISSING_FIELD, name, f"{name} is required")
        if value is None and self.allow_none:
            return None
        value = self._convert(name, value)
        size = len(value) if self.kind is str else value
        too_small = self.minimum is not None and size < self.minimum
        too_large = self.maximum is not None and size > self.maximum
        if too_small or too_large:
            what = f"{name} length" if self.kind is str else name
            raise ProtocolError(
                ErrorCode.OUT_OF_RANGE, name, f"{what} must be {_bounds_text(self.minimum, self.maximum)}, got {size}"
            )
        if self.choices and value not in self.choices:
            raise ProtocolError(
                ErrorCode.BAD_VALUE, name, f"{name} must be one of {', '.join(self.choices)}; got {value!r:.80}"
            )
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise ProtocolError(ErrorCode.BAD_VALUE, name, f"{name} must match {self.pattern}; got {value!r:.80}")
        return value

    def describe(self) -> dict:
        """This spec as plain data, for a peer to build a UI from: type, and bounds and
        choices where it has them."""
        described: dict[str, Any] = {"type": _KIND_WORDS[self.kind]}
        for name in ("minimum", "maximum", "pattern"):
            if getattr(self, name) is not None:
                described[name] = getattr(self, name)
        if self.choices:
            described["choices"] = list(self.choices)
        return described

    def _convert(self, name: str, value: Any) -> Any:
        kind = self.kind
        if kind is bool and isinstance(value, bool):
            return value
        is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if kind is int and is_number and (isinstance(value, numbers.Integral) or float(value).is_integer()):
            return int(value)
        if kind is float and is_number:
            try:
                number = float(value)
            except OverflowError:  # an int too large for a float
                number = math.inf
            if not math.isfinite(number):
                raise ProtocolError(ErrorCode.OUT_OF_RANGE, name, f"{name} must be a finite number")
            return number
        if kind is str and isinstance(value, str):
            return value
        raise ProtocolError(ErrorCode.BAD_TYPE, name, f"{name} must be {_KIND_NAMES[kind]}, got {type(value).__name__}")


_KIND_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_KIND_WORDS = {bool: "bool", int: "int", float: "float", str: "str"}


# Which ValueSpec kind a plain value is; bool comes first because True is also an int.
_PLAIN_KINDS = ((bool, bool), (numbers.Integral, int), (numbers.Real, float), (str, str))


def _bounds_text(minimum: float | None, maximum: float | None) -> str:
    def number(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    if minimum is None:
        return f"at most {number(maximum)}"
    if maximum is None:
        return f"at least {number(minimum)}"
    return f"from {number(minimum)} to {number(maximum)}"


class _Missing:
    """Stands in for a field the peer left out, so the field's check can say it is missing."""

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


@dataclass(frozen=True)
class PairListSpec(ValueSpec):
    """A list of at most `maximum` [text, number] pairs of a pair kind of the table
    (bridge/params.py PAIR_KINDS: weighted prompts [text, weight], LoRA adapters [name,
    scale]): texts of the kind's length but at most max_chars characters, finite numbers
    within the kind's bounds, and where the kind needs it one number above 0."""

    kind: type = list
    pairs: PairKind = PAIR_KINDS["prompts"]
    max_chars: int = MAX_PROMPT_CHARS

    def check(self, name: str, value: Any) -> Any:
        pairs = self.pairs
        if value is _MISSING:
            raise ProtocolError(ErrorCode.MISSING_FIELD, name, f"{name} is required")
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(ErrorCode.BAD_TYPE, name, f"{name} must be a list of [{pairs.text}, {pairs.number}] "
                                                          f"pairs, got {type(value).__name__}")
        if len(value) > self.maximum:
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, name,
                                f"{name} may hold at most {self.maximum:g} pairs, got {len(value)}")
        checked = []
        for index, pair in enumerate(value):
            entry = f"{name}[{index}]"
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ProtocolError(ErrorCode.BAD_TYPE, entry, f"{entry} must be a [{pairs.text}, {pairs.number}] pair")
            text = ValueSpec(str, pairs.min_chars, self.max_chars).check(f"{entry} {pairs.text}", pair[0])
            number = ValueSpec(float, pairs.number_minimum, pairs.number_maximum).check(f"{entry} {pairs.number}",
                                                                                        pair[1])
            checked.append((text, number))
        if pairs.needs_positive and checked and not any(number > 0 for _, number in checked):
            raise ProtocolError(ErrorCode.BAD_VALUE, name, f"{name} needs a {pairs.number} above 0")
        return tuple(checked)

    def describe(self) -> dict:
        described = {"type": self.pairs.name, "maximum": self.maximum}
        for bound in ("number_minimum", "number_maximum"):
            if getattr(self.pairs, bound) is not None:
                described[bound] = getattr(self.pairs, bound)
        return described


def param_spec(param: Param) -> ValueSpec:
    """The check for a parameter of the table (bridge/params.py)."""
    if param.kind in PAIR_KINDS:
        pairs = PAIR_KINDS[param.kind]
        return PairListSpec(minimum=param.minimum, maximum=param.maximum, pairs=pairs, max_chars=pairs.max_chars)
    kind = {"bool": bool, "int": int, "float": float, "str": str}[param.kind]
    return ValueSpec(kind, param.minimum, param.maximum, param.choices)


# The parameters a session understands, checked as the table says. The engine extends
# it with its own narrower bounds (serve --max-prompt-chars, say) when it decodes.
PARAM_SPECS: Mapping[str, ValueSpec] = {name: param_spec(param) for name, param in PARAMS.items()}

_TYPE = ValueSpec(str, 1, 32)
_ID = ValueSpec(int, 0, MAX_INT, allow_none=True)
_SESSION = ValueSpec(str, 1, 64, pattern=r"[A-Za-z0-9_-]+")
_NON_NEGATIVE = ValueSpec(int, 0, MAX_INT)  # sequence numbers and timestamps
_PARAM_NAME = ValueSpec(str, 1, 64)
_WIDTH = ValueSpec(int, 1, MAX_WIDTH)
_HEIGHT = ValueSpec(int, 1, MAX_HEIGHT)
_FORMAT = ValueSpec(str, choices=tuple(FORMATS))


def check_params(params: Any, schema: Mapping[str, ValueSpec] | None) -> dict:
    """Validate a params map and return it with converted values.

    With a schema, every name must be in it and every value must satisfy its spec.
    Without one (the sending side, which may talk to an engine with more parameters)
    the table's parameters are checked as it says, and other values only to be plain
    booleans, numbers or strings.
    """
    if params is _MISSING:
        raise ProtocolError(ErrorCode.MISSING_FIELD, "params", "params is required")
    if not isinstance(params, Mapping):
        raise ProtocolError(ErrorCode.BAD_TYPE, "params", "params must be a map of name to value")
    if len(params) > MAX_PARAMS:
        raise ProtocolError(ErrorCode.TOO_LARGE, "params", f"params may hold at most {MAX_PARAMS} entries")
    checked = {}
    for key, value in params.items():
        _PARAM_NAME.check("params", key)  # bounded before it goes into error messages
        path = f"params.{key}"
        if schema is None and key in PARAM_SPECS:
            checked[key] = PARAM_SPECS[key].check(path, value)
        elif schema is None:
            kind = next((kind for abc, kind in _PLAIN_KINDS if isinstance(value, abc)), None)
            if kind is None:
                raise ProtocolError(
                    ErrorCode.BAD_TYPE, path, f"{path} must be a boolean, number or string, got {type(value).__name__}"
                )
            checked[key] = ValueSpec(kind, maximum=MAX_PROMPT_CHARS if kind is str else None).check(path, value)
        elif key not in schema:
            raise ProtocolError(
                ErrorCode.UNKNOWN_PARAM, path, f"unknown parameter {key!r:.80}; known: {', '.join(sorted(schema))}"
            )
        else:
            checked[key] = schema[key].check(path, value)
    return checked


# ----------------------------------------------------------------- message types


@dataclass(frozen=True)
class _Validated:
    """Base for wire objects: checks every field in _SPECS when the object is made."""

    _SPECS: ClassVar[Mapping[str, ValueSpec]] = {}

    def __post_init__(self) -> None:
        for name, spec in self._SPECS.items():
            object.__setattr__(self, name, spec.check(name, getattr(self, name)))

    @classmethod
    def _from_wire(cls, wire: Mapping) -> Any:
        """Build from a decoded map. Unknown keys are ignored; an absent field takes its
        default, or _MISSING when it has none, which its check then reports."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in wire:
                values[f.name] = wire[f.name]
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                values[f.name] = _MISSING
        return cls(**values)

    def _to_wire(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Hello(_Validated):
    """Open a session. The engine answers ok with at least {"session": <id>}.

    model names a preset, or is "default" for whichever model the engine serves;
    width and height are the size of the frames the host will send.
    """

    TYPE: ClassVar[str] = "hello"
    _SPECS: ClassVar[Mapping[str, ValueSpec]] = {
        "transport": ValueSpec(str, choices=TRANSPORTS),
        "model": ValueSpec(str, 1, 128),
        "width": _WIDTH,
        "height": _HEIGHT,
        "prompt": PARAM_SPECS["prompt"],
        "id": _ID,
    }

    model: str
    width: int
    height: int
    prompt: str
    transport: str = "zmq"
    params: Mapping[str, Any] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION
    id: int | None = None

    def __post_init__(self) -> None:
        # Checked first: a peer on another version may not share our other fields.
        if isinstance(self.version, bool) or self.version != PROTOCOL_VERSION:
            got = "none" if self.version is _MISSING else repr(self.version)
            raise ProtocolError(
                ErrorCode.PROTOCOL_VERSION,
                "version",
                f"this side speaks protocol version {PROTOCOL_VERSION}, the peer sent {got:.40}; "
                "install matching versions of the host bridge and the engine",
            )
        object.__setattr__(self, "version", PROTOCOL_VERSION)  # 1.0 on the wire is stored as 1
        super().__post_init__()
        params = check_params(self.params, None)
        if "prompt" in params:
            raise ProtocolError(ErrorCode.BAD_VALUE, "params.prompt", "put the prompt in hello's prompt field")
        object.__setattr__(self, "params", params)

    @classmethod
    def _from_wire(cls, wire: Mapping) -> Hello:
        # On the wire the version is required: a hello without one is from an unknown version.
        return super()._from_wire({"version": _MISSING, **wire})


@dataclass(frozen=True)
class ParamsUpdate(_Validated):
    """Change parameters of a running session."""

    TYPE: ClassVar[str] = "params"
    _SPECS: ClassVar[Mapping[str, ValueSpec]] = {"session": _SESSION, "id": _ID}

    session: str
    params: Mapping[str, Any]
    id: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "params", check_params(self.params, None))


@dataclass(frozen=True)
class StatsRequest(_Validated):
    """Ask for a session's statistics; they come back as the ok payload."""

    TYPE: ClassVar[str] = "stats"
    _SPECS: ClassVar[Mapping[str, ValueSpec]] = {"session": _SESSION, "id": _ID}

    session: str
    id: int | None = None


@dataclass(frozen=True)
class Ping(_Validated):
    """Liveness check; answered with ok."""

    TYPE: ClassVar[str] = "ping"
    _SPECS: ClassVar[Mapping[str, ValueSpec]] = {"id": _ID}

    id: int | None = None


@dataclass(frozen=True)
class Bye(_Validated):
    """Close a session."""

    TYPE: ClassVar[str] = "bye"
    _SPECS: ClassVar[Mapping[str, ValueSpec]] = {"session": _SESSION, "id": _ID}

    session: str
    id: int | None = None


@dataclass(frozen=True)
class Shutdown(_Validated):
    """Stop the engine cleanly, as SIGTERM does (its sessions closed, its shared memory
    unlinked); answered with ok before it stops. Whoever may send requests may send it:
    hosts on this machine, or hosts holding a listed key (bridge/launcher.py sends it)."""

    TYPE: ClassVar[str] = "shutdown"
    _SPECS: ClassVar[Mapping[str, ValueSpec]] = {"id": _ID}

    id: int | None = None


@dataclass(frozen=True)
class Ok(_Validated):
    """Success reply to the request with the same id."""

    TYPE: ClassVar[str] = "ok"
    _SPECS: ClassVar[Mapping[str, ValueSpec]] = {"id": _ID}

    payload: Mapping[str, Any] = field(default_factory=dict)
    id: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.payload, Mapping) or not all(isinstance(k, str) for k in self.payload):
            raise ProtocolError(ErrorCode.BAD_TYPE, "payload", "payload must be a map with string keys")


@dataclass(frozen=True)
class ErrorReply(_Validated):
    """Failure reply. id is None when the failure is not about a request (e.g. a bad frame)."""

    TYPE: ClassVar[str] = "error"
    _SPECS: ClassVar[Mapping[str, ValueSpec]] = {
        "code": ValueSpec(str, 1, 64),
        "field": ValueSpec(str, 0, 256, allow_none=True),
        "message": ValueSpec(str, 0, 4096),
        "id": _ID,
    }

    code: str
    field: str | None
    message: str
    id: int | None = None

    @classmethod
    def from_error(cls, error: ProtocolError, id: int | None = None) -> ErrorReply:
        field = None if error.field is None else error.field[:256]
        return cls(code=error.code[:64], field=field, message=error.message[:4096], id=id)


Message = Union[Hello, ParamsUpdate, StatsRequest, Ping, Bye, Shutdown, Ok, ErrorReply]
REQUEST_TYPES: tuple[type, ...] = (Hello, ParamsUpdate, StatsRequest, Ping, Bye, Shutdown)
REPLY_TYPES: tuple[type, ...] = (Ok, ErrorReply)
MESSAGE_TYPES: Mapping[str, type] = {cls.TYPE: cls for cls in REQUEST_TYPES + REPLY_TYPES}


def encode_message(message: Message) -> bytes:
    """msgpack bytes for a message object (already validated when it was made)."""
    return _pack({"type": message.TYPE, **message._to_wire()})


def decode_message(data: bytes, params_schema: Mapping[str, ValueSpec] = PARAM_SPECS) -> Message:
    """Parse and validate one control message; raise ProtocolError on anything wrong.

    params_schema is the table that params of hello and params messages are checked
    against; the engine passes its own, extended one.
    """
    wire = _unpack_map(data)
    try:
        type_name = _TYPE.check("type", wire.get("type", _MISSING))
        cls = MESSAGE_TYPES.get(type_name)
        if cls is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_TYPE, "type", f"unknown message type {type_name!r}; known: {', '.join(MESSAGE_TYPES)}"
            )
        message = cls._from_wire(wire)
        if isinstance(message, (Hello, ParamsUpdate)):
            message = dataclasses.replace(message, params=check_params(message.params, params_schema))
        return message
    except ProtocolError as error:
        try:
            error.request_id = _ID.check("id", wire.get("id"))
        except ProtocolError:
            pass  # the id itself is bad: the error cannot be matched to a request
        raise


# ------------------------------------------------------------------------- frames


def check_geometry(width: Any, height: Any, format: Any, stride: Any = None) -> tuple[int, int, str, int]:
    """Validate a frame's geometry; return (width, height, format, stride), where a
    stride of None means packed rows (width * channels bytes)."""
    width = _WIDTH.check("width", width)
    height = _HEIGHT.check("height", height)
    format = _FORMAT.check("format", format)
    row_bytes = width * FORMATS[format]
    if stride is not None:
        stride = ValueSpec(int, row_bytes, MAX_FRAME_BYTES // height).check("stride", stride)
    return width, height, format, row_bytes if stride is None else stride


@dataclass(frozen=True)
class FrameHeader(_Validated):
    """What travels beside a frame's pixels. stride defaults to packed rows."""

    _SPECS: ClassVar[Mapping[str, ValueSpec]] = {
        "session": _SESSION,
        "seq": _NON_NEGATIVE,
        "t_capture_ns": _NON_NEGATIVE,
    }

    session: str
    seq: int
    t_capture_ns: int
    width: int
    height: int
    format: str = "rgba8"
    stride: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        geometry = check_geometry(self.width, self.height, self.format, self.stride)
        for name, value in zip(("width", "height", "format", "stride"), geometry):
            object.__setattr__(self, name, value)

    @property
    def channels(self) -> int:
        return FORMATS[self.format]

    @property
    def frame_bytes(self) -> int:
        """How many pixel bytes travel with this header."""
        return self.stride * self.height

    @classmethod
    def for_array(
        cls, pixels: np.ndarray, *, session: str, seq: int, t_capture_ns: int, format: str = "rgba8"
    ) -> FrameHeader:
        """The header for sending an [height, width, channels] uint8 array (packed rows)."""
        if pixels.ndim != 3:
            raise ProtocolError(
                ErrorCode.SIZE_MISMATCH, "pixels", f"expected [height, width, channels], got {pixels.shape}"
            )
        height, width, _ = pixels.shape
        header = cls(session=session, seq=seq, t_capture_ns=t_capture_ns, width=width, height=height, format=format)
        check_pixels(header, pixels)
        return header


def encode_frame_header(header: FrameHeader) -> bytes:
    return _pack(header._to_wire())


def decode_frame_header(data: bytes) -> FrameHeader:
    """Parse and validate a frame header; call validate_frame before touching pixels."""
    return FrameHeader._from_wire(_unpack_map(data))


def validate_frame(header: FrameHeader, pixel_bytes_len: int) -> None:
    """Check that a pixel buffer of this many bytes is what the header announces."""
    if pixel_bytes_len != header.frame_bytes:
        raise ProtocolError(
            ErrorCode.SIZE_MISMATCH,
            "pixels",
            f"header announces {header.width}x{header.height} {header.format} with stride {header.stride} "
            f"= {header.frame_bytes} bytes, but {pixel_bytes_len} bytes came",
        )


def frame_array(header: FrameHeader, buffer: Any) -> np.ndarray:
    """A no-copy [height, width, channels] uint8 view of a received pixel buffer.

    Row padding (stride wider than the row) stays in the buffer and out of the view.
    The view is read-only when the buffer is, and lives as long as the buffer.
    """
    flat = np.frombuffer(buffer, dtype=np.uint8)
    validate_frame(header, flat.nbytes)
    return np.ndarray(
        shape=(header.height, header.width, header.channels),
        dtype=np.uint8,
        buffer=flat,
        strides=(header.stride, header.channels, 1),
    )


def check_pixels(header: FrameHeader, pixels: np.ndarray) -> np.ndarray:
    """Check an array to send under header; return it as packed, contiguous rows."""
    expected = (header.height, header.width, header.channels)
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.shape != expected:
        got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise ProtocolError(ErrorCode.SIZE_MISMATCH, "pixels", f"expected uint8 {expected}, got {got}")
    if header.stride != header.width * header.channels:
        raise ProtocolError(ErrorCode.BAD_VALUE, "stride", "arrays are sent as packed rows; leave stride unset")
    return np.ascontiguousarray(pixels)


# ---------------------------------------------------------------------- encoding


def _pack(wire: dict) -> bytes:
    try:
        data = msgpack.packb(wire, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise ProtocolError(ErrorCode.BAD_TYPE, None, f"cannot encode as msgpack: {error}") from None
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, None, f"encoded message is {len(data)} bytes, over the {MAX_MESSAGE_BYTES} limit"
        )
    return data


def _unpack_map(data: Any) -> Mapping:
    """Decode msgpack bytes that must hold a map, within the size limit."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, None, f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, None, f"message is {len(data)} bytes, over the {MAX_MESSAGE_BYTES} limit"
        )
    try:
        # Default limits scale with len(data), so a short message cannot claim a huge array.
        wire = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, None, f"not valid msgpack: {error!s:.200}") from None
    if not isinstance(wire, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, None, f"expected a msgpack map, got {type(wire).__name__}")
    return wire


def check_frame_array(pixels: np.ndarray, format: str) -> tuple[int, int]:
    """Validate an array for `format`; return its (height, width)."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3:
        got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise ProtocolError(ErrorCode.SIZE_MISMATCH, "pixels", f"expected uint8 [height, width, channels], got {got}")
    height, width, channels = pixels.shape
    check_geometry(width, height, format)
    if channels != FORMATS[format]:
        raise ProtocolError(
            ErrorCode.SIZE_MISMATCH, "pixels", f"{format} has {FORMATS[format]} channels, the array has {channels}"
        )
    return height, width
