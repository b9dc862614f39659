"""Decode + validate time of the protocol's hot messages: ours against msgspec's.

    python bench/validation.py        (msgspec is not a dependency: pip install msgspec to compare)

A frame header is decoded for every frame of every session and a params message for
every control change; this prints how long each takes with the hand-written checks in
bridge/protocol.py and with msgspec Structs carrying the same constraints (bounds from
the same table, bridge/params.py), in one run. It informs whether the protocol's
validation should move to msgspec; it never passes or fails.
"""

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgpack  # noqa: E402

from bridge.params import MAX_SEED, PARAMS  # noqa: E402
from bridge.protocol import (MAX_HEIGHT, MAX_INT, MAX_WIDTH, FrameHeader, ParamsUpdate,  # noqa: E402
                             decode_frame_header, decode_message, encode_frame_header, encode_message)

HEADER = FrameHeader(session="0123456789abcdef", seq=12345, t_capture_ns=1_700_000_000_000_000_000, width=1920,
                     height=1080, format="rgba8")
PARAMS_MESSAGE = ParamsUpdate(session="0123456789abcdef", params={"prompt": "a charcoal drawing of a harbour",
                                                                  "strength": 0.65, "seed": 42, "fit": "crop"}, id=7)


def per_call_us(function, data: bytes, repeat: int = 7, number: int = 20_000) -> float:
    return min(timeit.repeat(lambda: function(data), repeat=repeat, number=number)) / number * 1e6


def msgspec_decoders():
    """msgspec Structs with the same constraints as our header and params message."""
    from typing import Annotated, Literal, Optional

    import msgspec

    def bounded(kind, param):
        if kind is str:
            return Annotated[str, msgspec.Meta(min_length=param.minimum, max_length=param.maximum)]
        return Annotated[kind, msgspec.Meta(ge=param.minimum, le=param.maximum)]

    Session = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]

    class Header(msgspec.Struct, forbid_unknown_fields=False):
        session: Session
        seq: Count
        t_capture_ns: Count
        width: Annotated[int, msgspec.Meta(ge=1, le=MAX_WIDTH)]
        height: Annotated[int, msgspec.Meta(ge=1, le=MAX_HEIGHT)]
        format: Literal["rgba8", "rgb8", "bgra8"]
        stride: Optional[int] = None

    class Params(msgspec.Struct, omit_defaults=True):
        prompt: Optional[bounded(str, PARAMS["prompt"])] = None
        strength: Optional[bounded(float, PARAMS["strength"])] = None
        seed: Optional[Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)]] = None
        fit: Optional[Literal[PARAMS["fit"].choices]] = None

    class Update(msgspec.Struct, tag_field="type", tag="params"):
        session: Session
        params: Params
        id: Optional[Count] = None

    return msgspec.msgpack.Decoder(Header).decode, msgspec.msgpack.Decoder(Update).decode


def main() -> None:
    header_bytes = encode_frame_header(HEADER)
    params_bytes = encode_message(PARAMS_MESSAGE)
    rows = [("frame header", "ours (bridge/protocol.py)", per_call_us(decode_frame_header, header_bytes)),
            ("params message", "ours (bridge/protocol.py)", per_call_us(decode_message, params_bytes)),
            ("frame header", "msgpack.unpackb alone", per_call_us(msgpack.unpackb, header_bytes)),
            ("params message", "msgpack.unpackb alone", per_call_us(msgpack.unpackb, params_bytes))]
    try:
        header_decoder, params_decoder = msgspec_decoders()
    except ImportError:
        print("msgspec is not installed (pip install msgspec): only our own figures follow\n")
    else:
        rows += [("frame header", "msgspec Struct", per_call_us(header_decoder, header_bytes)),
                 ("params message", "msgspec Struct", per_call_us(params_decoder, params_bytes))]
    print(f"{'message':<16}{'decoder':<28}{'us per decode+validate':>24}")
    for message, decoder, us in sorted(rows):
        print(f"{message:<16}{decoder:<28}{us:>24.2f}")
    print("\nA frame header is decoded once per frame: at 30 fps and 8 sessions, 240 a second.")


if __name__ == "__main__":
    main()
