"""The wire protocol: what encodes, what decodes, and what is refused with which error."""

import subprocess
import sys

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.protocol import (
    PARAM_SPECS,
    MAX_MESSAGE_BYTES,
    MAX_PROMPT_CHARS,
    PROTOCOL_VERSION,
    Bye,
    ErrorCode,
    ErrorReply,
    FrameHeader,
    Hello,
    Ok,
    ParamsUpdate,
    Ping,
    ProtocolError,
    StatsRequest,
    ValueSpec,
    check_params,
    check_pixels,
    decode_frame_header,
    decode_message,
    encode_frame_header,
    encode_message,
    frame_array,
    validate_frame,
)

pytestmark = pytest.mark.timeout(60)

HELLO = {"type": "hello", "version": PROTOCOL_VERSION, "model": "wan", "width": 512, "height": 512, "prompt": "a cat"}
FRAME = {"session": "s1", "seq": 7, "t_capture_ns": 123, "width": 4, "height": 3, "format": "rgba8"}


def raw(**fields) -> bytes:
    """msgpack bytes for a message map, bypassing our encoder so any content can be sent."""
    return msgpack.packb(fields, use_bin_type=True)


def params_message(**params) -> bytes:
    return raw(type="params", session="s", params=params)


def without(fields: dict, name: str) -> dict:
    return {key: value for key, value in fields.items() if key != name}


def rejection(decode, data) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        decode(data)
    return caught.value


def test_the_transport_modules_load_without_torch_or_the_engine():
    # Hosts such as TouchDesigner and OBS import these; torch must never come along.
    code = "import sys, bridge.protocol, bridge.shm, bridge.zmq_io; print(sorted({'torch', 'engine'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


MESSAGES = [
    Hello(model="wan2.1-1.3b", width=832, height=480, prompt="a cat", transport="shm", id=1, params={
        "strength": 0.6, "steps": 2, "seed": 42, "target_fps": 24.0, "latency_ms": 250.0, "fit": "crop"}),
    Hello(model="tiny", width=64, height=64, prompt=""),
    ParamsUpdate(session="abc-1", params={"prompt": "a dog", "strength": 0.3}, id=2),
    StatsRequest(session="abc-1", id=3),
    Ping(id=4),
    Ping(),
    Bye(session="abc-1", id=5),
    Ok({"session": "abc-1", "nested": {"fps": [24.0, 23.5]}}, id=6),
    Ok(),
    ErrorReply(code="unknown_session", field="session", message="no session abc-2", id=7),
    ErrorReply(code="bad_message", field=None, message="not msgpack"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_type_survives_a_round_trip(message):
    assert decode_message(encode_message(message)) == message


def test_hello_defaults_to_this_protocol_version_and_zmq():
    hello = decode_message(raw(**HELLO))
    assert (hello.version, hello.transport, hello.params, hello.id) == (PROTOCOL_VERSION, "zmq", {}, None)


def test_unknown_fields_are_ignored():
    assert decode_message(raw(**HELLO, added_in_v9={"x": 1})) == decode_message(raw(**HELLO))


def test_numbers_convert_only_without_loss():
    hello = decode_message(raw(**{**HELLO, "width": 640.0}, params={"strength": 1, "steps": 2.0}))
    assert hello.width == 640 and type(hello.width) is int
    assert hello.params == {"strength": 1.0, "steps": 2}
    assert type(hello.params["strength"]) is float
    assert rejection(decode_message, raw(**{**HELLO, "width": 640.5})).field == "width"


def test_a_value_spec_describes_itself_as_plain_data_for_host_uis():
    assert PARAM_SPECS["strength"].describe() == {"type": "float", "minimum": 0.1, "maximum": 1.0}
    assert PARAM_SPECS["fit"].describe() == {"type": "str", "choices": ["letterbox", "crop", "stretch"]}
    assert PARAM_SPECS["prompts"].describe() == {"type": "prompts", "maximum": 8, "number_minimum": 0.0}
    assert PARAM_SPECS["loras"].describe() == {"type": "loras", "maximum": 4, "number_minimum": -2.0,
                                               "number_maximum": 2.0}
    assert msgpack.unpackb(msgpack.packb({k: v.describe() for k, v in PARAM_SPECS.items()}))  # travels as is


def test_weighted_prompts_are_text_weight_pairs_with_a_weight_above_zero():
    assert check_params({"prompts": [["a fox", 1], ("a cat", 0.5)]}, PARAM_SPECS) == {
        "prompts": (("a fox", 1.0), ("a cat", 0.5))}
    for bad, field in ((["a fox", 1.0], "params.prompts[0]"), ([["a fox", "x"]], "params.prompts[0] weight"),
                       ([["a fox", -1]], "params.prompts[0] weight"), ([["a", 0], ["b", 0]], "params.prompts"),
                       ([["a", 1]] * 9, "params.prompts"), ("a fox", "params.prompts")):
        with pytest.raises(ProtocolError) as caught:
            check_params({"prompts": bad}, PARAM_SPECS)
        assert caught.value.field == field, bad


def test_loras_are_name_scale_pairs_with_scales_from_minus_2_to_2():
    assert check_params({"loras": [["ink", 0.5], ("/styles/grain.safetensors", -2)]}, PARAM_SPECS) == {
        "loras": (("ink", 0.5), ("/styles/grain.safetensors", -2.0))}
    assert check_params({"loras": [["ink", 0]]}, PARAM_SPECS) == {"loras": (("ink", 0.0),)}  # scale 0: off
    for bad, field in (([["ink", 2.5]], "params.loras[0] scale"), ([["", 1.0]], "params.loras[0] name"),
                       ([["ink", 1.0]] * 5, "params.loras"), ([["ink"]], "params.loras[0]")):
        with pytest.raises(ProtocolError) as caught:
            check_params({"loras": bad}, PARAM_SPECS)
        assert caught.value.field == field, bad


def test_a_host_checks_the_tables_parameters_before_sending():
    with pytest.raises(ProtocolError) as caught:
        ParamsUpdate(session="s", params={"strength": 0.05})
    assert (caught.value.code, caught.value.field) == (ErrorCode.OUT_OF_RANGE, "params.strength")
    assert "0.1" in caught.value.message
    assert ParamsUpdate(session="s", params={"other_engines_param": 3}).params == {"other_engines_param": 3}


def test_the_engine_can_extend_the_parameter_table():
    schema = {**PARAM_SPECS, "noise_scale": ValueSpec(float, 0.0, 2.0)}
    update = params_message(noise_scale=1.5)
    assert decode_message(update, schema).params == {"noise_scale": 1.5}
    error = rejection(decode_message, update)  # the default table does not have it
    assert (error.code, error.field) == (ErrorCode.UNKNOWN_PARAM, "params.noise_scale")
    error = rejection(lambda data: decode_message(data, schema), params_message(noise_scale=3))
    assert (error.code, error.field) == (ErrorCode.OUT_OF_RANGE, "params.noise_scale")


BAD_MESSAGES = {
    "random bytes": (b"\xc1\x9f\xff\x00\x13", ErrorCode.BAD_MESSAGE, None),
    "truncated msgpack": (encode_message(MESSAGES[0])[:-7], ErrorCode.BAD_MESSAGE, None),
    "not a map": (msgpack.packb([1, 2, 3]), ErrorCode.BAD_MESSAGE, None),
    "trailing bytes": (raw(type="ping") + b"\x00", ErrorCode.BAD_MESSAGE, None),
    "too large": (raw(type="ping", padding="x" * MAX_MESSAGE_BYTES), ErrorCode.TOO_LARGE, None),
    "no type": (raw(id=1), ErrorCode.MISSING_FIELD, "type"),
    "type not a string": (raw(type=3), ErrorCode.BAD_TYPE, "type"),
    "unknown type": (raw(type="reboot"), ErrorCode.UNKNOWN_TYPE, "type"),
    "wrong protocol version": (raw(**{**HELLO, "version": 2}), ErrorCode.PROTOCOL_VERSION, "version"),
    "no protocol version": (raw(**without(HELLO, "version")), ErrorCode.PROTOCOL_VERSION, "version"),
    "missing model": (raw(**without(HELLO, "model")), ErrorCode.MISSING_FIELD, "model"),
    "huge width": (raw(**{**HELLO, "width": 100_000}), ErrorCode.OUT_OF_RANGE, "width"),
    "zero height": (raw(**{**HELLO, "height": 0}), ErrorCode.OUT_OF_RANGE, "height"),
    "bool as width": (raw(**{**HELLO, "width": True}), ErrorCode.BAD_TYPE, "width"),
    "unknown transport": (raw(**HELLO, transport="carrier-pigeon"), ErrorCode.BAD_VALUE, "transport"),
    "prompt too long": (raw(**{**HELLO, "prompt": "x" * (MAX_PROMPT_CHARS + 1)}), ErrorCode.OUT_OF_RANGE, "prompt"),
    "prompt twice": (raw(**HELLO, params={"prompt": "b"}), ErrorCode.BAD_VALUE, "params.prompt"),
    "params not a map": (raw(type="params", session="s", params=[1]), ErrorCode.BAD_TYPE, "params"),
    "params missing": (raw(type="params", session="s"), ErrorCode.MISSING_FIELD, "params"),
    "param of wrong type": (params_message(strength="high"), ErrorCode.BAD_TYPE, "params.strength"),
    "param out of range": (params_message(strength=1.5), ErrorCode.OUT_OF_RANGE, "params.strength"),
    "param not a choice": (params_message(fit="zoom"), ErrorCode.BAD_VALUE, "params.fit"),
    "param not finite": (params_message(strength=float("nan")), ErrorCode.OUT_OF_RANGE, "params.strength"),
    "misspelt param": (params_message(strenght=0.5), ErrorCode.UNKNOWN_PARAM, "params.strenght"),
    "session with odd characters": (raw(type="bye", session="../etc"), ErrorCode.BAD_VALUE, "session"),
    "negative id": (raw(type="ping", id=-1), ErrorCode.OUT_OF_RANGE, "id"),
}


@pytest.mark.parametrize("data, code, field", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_bad_messages_are_refused_naming_the_field(data, code, field):
    error = rejection(decode_message, data)
    assert (error.code, error.field) == (code, field)
    assert error.message


def test_a_refused_request_keeps_its_id_so_the_reply_can_find_the_host():
    error = rejection(decode_message, raw(type="params", session="s", params={"strength": "x"}, id=41))
    assert error.request_id == 41
    reply = decode_message(encode_message(ErrorReply.from_error(error, error.request_id)))
    assert (reply.code, reply.field, reply.id) == ("bad_type", "params.strength", 41)


def test_messages_are_validated_when_made_so_bad_ones_are_never_sent():
    with pytest.raises(ProtocolError) as caught:
        Hello(model="m", width=100_000, height=10, prompt="")
    assert caught.value.field == "width"
    with pytest.raises(ProtocolError) as caught:
        ParamsUpdate(session="s", params={"strength": object()})
    assert caught.value.field == "params.strength"
    with pytest.raises(ProtocolError) as caught:
        encode_message(Ok({"blob": "x" * MAX_MESSAGE_BYTES}))
    assert caught.value.code == ErrorCode.TOO_LARGE


def test_numpy_numbers_are_accepted_when_building_messages():
    pixels = np.zeros((3, 5, 4), np.uint8)
    hello = Hello(model="m", width=np.int64(pixels.shape[1]), height=pixels.shape[0], prompt="",
                  params={"strength": np.float32(0.5)})
    assert decode_message(encode_message(hello)) == hello


# ------------------------------------------------------------------------ frames


def test_frame_header_round_trip_and_packed_stride():
    header = decode_frame_header(raw(**FRAME))
    assert header == FrameHeader(session="s1", seq=7, t_capture_ns=123, width=4, height=3, format="rgba8", stride=16)
    assert decode_frame_header(encode_frame_header(header)) == header
    assert header.frame_bytes == 48


@pytest.mark.parametrize("format, channels", [("rgba8", 4), ("rgb8", 3), ("bgra8", 4)])
def test_frame_array_is_a_no_copy_view_of_shape_h_w_c(format, channels):
    header = FrameHeader(session="s", seq=0, t_capture_ns=0, width=5, height=3, format=format)
    buffer = bytearray(range(header.frame_bytes))
    view = frame_array(header, buffer)
    assert view.shape == (3, 5, channels) and view.dtype == np.uint8
    assert np.shares_memory(view, np.frombuffer(buffer, np.uint8))
    assert view[2, 4, channels - 1] == header.frame_bytes - 1


def test_frame_array_skips_row_padding():
    header = FrameHeader(session="s", seq=0, t_capture_ns=0, width=2, height=2, format="rgb8", stride=8)
    buffer = bytes([1, 2, 3, 4, 5, 6, 0, 0, 7, 8, 9, 10, 11, 12, 0, 0])
    assert frame_array(header, buffer).tolist() == [[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [10, 11, 12]]]


def test_read_only_buffers_give_read_only_views():
    header = FrameHeader(session="s", seq=0, t_capture_ns=0, width=1, height=1)
    assert not frame_array(header, bytes(4)).flags.writeable


def test_pixels_that_disagree_with_the_header_are_refused_before_use():
    header = decode_frame_header(raw(**FRAME))
    for size in (0, header.frame_bytes - 1, header.frame_bytes + 1):
        error = rejection(lambda n: validate_frame(header, n), size)
        assert (error.code, error.field) == (ErrorCode.SIZE_MISMATCH, "pixels")
        error = rejection(lambda data: frame_array(header, data), bytes(size))
        assert error.field == "pixels"


BAD_HEADERS = {
    "random bytes": (b"\xc1\xc1\xc1", ErrorCode.BAD_MESSAGE, None),
    "100000x100000": (raw(**{**FRAME, "width": 100_000, "height": 100_000}), ErrorCode.OUT_OF_RANGE, "width"),
    "unknown format": (raw(**{**FRAME, "format": "yuv420"}), ErrorCode.BAD_VALUE, "format"),
    "format not a string": (raw(**{**FRAME, "format": 4}), ErrorCode.BAD_TYPE, "format"),
    "stride shorter than a row": (raw(**FRAME, stride=15), ErrorCode.OUT_OF_RANGE, "stride"),
    "stride overflowing the frame limit": (raw(**FRAME, stride=2**40), ErrorCode.OUT_OF_RANGE, "stride"),
    "negative seq": (raw(**{**FRAME, "seq": -1}), ErrorCode.OUT_OF_RANGE, "seq"),
    "timestamp as a string": (raw(**{**FRAME, "t_capture_ns": "now"}), ErrorCode.BAD_TYPE, "t_capture_ns"),
    "missing session": (raw(**without(FRAME, "session")), ErrorCode.MISSING_FIELD, "session"),
}


@pytest.mark.parametrize("data, code, field", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_bad_frame_headers_are_refused_naming_the_field(data, code, field):
    error = rejection(decode_frame_header, data)
    assert (error.code, error.field) == (code, field)


def test_header_for_an_array_and_pixel_checks():
    pixels = np.zeros((3, 5, 3), np.uint8)
    header = FrameHeader.for_array(pixels, session="s", seq=1, t_capture_ns=2, format="rgb8")
    assert (header.width, header.height, header.stride) == (5, 3, 15)
    with pytest.raises(ProtocolError) as caught:
        FrameHeader.for_array(pixels, session="s", seq=1, t_capture_ns=2, format="rgba8")  # 3 channels, not 4
    assert caught.value.field == "pixels"
    strided = np.zeros((3, 10, 3), np.uint8)[:, ::2]
    assert check_pixels(header, strided).flags.c_contiguous
    with pytest.raises(ProtocolError) as caught:
        check_pixels(header, pixels.astype(np.float32))
    assert caught.value.field == "pixels"


# -------------------------------------------------------------------------- fuzz

FUZZ = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats() | st.text(max_size=20)
msgpack_values = st.recursive(
    scalars | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(sorted({*HELLO, *FRAME, "params", "session", "id", "payload", "code", "field",
                                      "message", "stride", "transport", *PARAM_SPECS}))
valid_maps = st.sampled_from([HELLO, FRAME, {"type": "params", "session": "s", "params": {"strength": 0.5}},
                              {"type": "ok", "payload": {}, "id": 1},
                              {"type": "error", "code": "x", "field": None, "message": "m"}])


@st.composite
def mutated_maps(draw):
    """A valid message or header with some fields replaced, removed or added."""
    fields = dict(draw(valid_maps))
    for _ in range(draw(st.integers(1, 4))):
        name = draw(field_names)
        if draw(st.booleans()):
            fields[name] = draw(msgpack_values)
        else:
            fields.pop(name, None)
    if draw(st.booleans()) and isinstance(fields.get("params"), dict):
        fields["params"] = {**fields["params"], draw(st.sampled_from(sorted(PARAM_SPECS))): draw(msgpack_values)}
    return fields


def packable(value) -> bytes | None:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return None


def only_protocol_errors(decode, data):
    """Decode must succeed with a valid object that encodes again, or raise ProtocolError."""
    try:
        decoded = decode(data)
    except ProtocolError as error:
        # What the engine does with the error must work too.
        encode_message(ErrorReply.from_error(error, error.request_id))
        return
    encoded = encode_frame_header(decoded) if isinstance(decoded, FrameHeader) else encode_message(decoded)
    assert decode(encoded) == decoded


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_give_only_protocol_errors(data):
    only_protocol_errors(decode_message, data)
    only_protocol_errors(decode_frame_header, data)


@FUZZ
@given(mutated_maps())
def test_fuzz_mutated_messages_give_only_protocol_errors(fields):
    data = packable(fields)
    if data is not None:
        only_protocol_errors(decode_message, data)
        only_protocol_errors(decode_frame_header, data)


@FUZZ
@given(mutated_maps(), st.integers(0, 200))
def test_fuzz_truncated_messages_give_only_protocol_errors(fields, cut):
    data = packable(fields)
    if data is not None:
        only_protocol_errors(decode_message, data[: max(0, len(data) - cut)])
