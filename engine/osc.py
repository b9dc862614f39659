"""OSC control: set session parameters over UDP, the way TouchDesigner and VJ software do.

    python -m engine serve --osc 9000

Every parameter a running session can change (bridge/params.py: those that apply live
or reload; not those taken only when a session opens) has two addresses:

    /sd/<param> VALUE              on every open session    /sd/prompt "a fox"   /sd/strength 0.6
    /sd/<session>/<param> VALUE    on one session, by id    /sd/3f2a9c0d41b7e865/seed 7

and /sd/prompts takes its [text, weight] pairs as alternating arguments, a text without
a weight weighing 1: /sd/prompts "a fox" 0.7 "a wolf" 0.3 (no arguments clears them);
/sd/loras its [name, scale] pairs the same way: /sd/loras "ink" 0.8 "film-grain" -0.5.

Values are taken as OSC senders send them: an int or a numeric string for a number
(an int parameter rounds a float), 1/0, true/false or on/off for a switch, and for a
parameter with choices its name in any case or its index (a TouchDesigner menu sends
the index). Numbers outside the table's bounds are clamped, texts too long are cut.
OSC has no replies and a fader sends dozens of messages a second, so each problem (a
value clamped or refused, an address nobody has, a datagram that is not OSC) is logged
once per address and kind, and otherwise ignored.

This thread never touches a session: it hands each change to the engine's IO thread
(EngineServer.set_params), which applies it between steps as a host's params request.
Like the engine's socket, OSC listens on loopback unless told otherwise; it has no
authentication, so a wider --osc-bind needs --osc-allow-remote as well.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Sequence
from typing import Any

from pythonosc.dispatcher import Dispatcher
from pythonosc.osc_packet import OscPacket
from pythonosc.osc_server import BlockingOSCUDPServer

from bridge.params import OPEN, PARAMS, Param
from bridge.protocol import ErrorCode, PairListSpec, ProtocolError, ValueSpec

from .server import EngineServer, is_loopback_host

log = logging.getLogger(__name__)

PREFIX = "/sd"
DEFAULT_HOST = "127.0.0.1"
MAX_LOGGED_PROBLEMS = 256  # distinct problems remembered, so a flood of new ones cannot grow memory
MAX_ADDRESS_SHOWN = 100  # characters of an address in the log, and in what is remembered of it
_SESSION_ADDRESS = re.compile(re.escape(PREFIX) + r"/(?P<session>[A-Za-z0-9_-]{1,64})/(?P<param>[a-z_]+)")
_SWITCH_WORDS = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False,
                 "no": False}


def osc_params() -> tuple[Param, ...]:
    """The parameters OSC sets: those a running session can change."""
    return tuple(param for param in PARAMS.values() if param.applies != OPEN)


def osc_value(name: str, spec: ValueSpec, args: Sequence[Any]) -> tuple[Any, list[str]]:
    """The value of parameter `name` that an OSC message's arguments mean, checked by spec
    as a host's value is, and what was clamped on the way (empty when nothing was).
    Raises ProtocolError when the arguments mean no value of it."""
    if isinstance(spec, PairListSpec):
        return _pairs(name, spec, args)
    if len(args) != 1:
        raise ProtocolError(ErrorCode.BAD_TYPE, name, f"{name} takes one value, got {len(args)}")
    value, clamped = _clamped(name, spec, _as_kind(name, spec, args[0]))
    return spec.check(name, value), clamped


def check_osc_bind(host: str, allow_remote: bool) -> None:
    """Refuse a host other machines could reach unless asked to: OSC has no authentication."""
    if allow_remote or is_loopback_host(host):
        return
    raise ValueError(
        f"--osc-bind {host} lets anyone who reaches that port change every session's parameters: OSC has no "
        "authentication. On a network that is yours alone, add --osc-allow-remote; otherwise leave --osc-bind "
        f"out and OSC listens on {DEFAULT_HOST} only")


class LogOnce:
    """Logs each distinct problem once, from any thread; remembers at most `capacity` of them."""

    def __init__(self, capacity: int = MAX_LOGGED_PROBLEMS):
        self._seen: set[Any] = set()
        self._capacity = capacity
        self._lock = threading.Lock()

    def warning(self, key: Any, message: str, *args: Any) -> None:
        with self._lock:
            if key in self._seen or len(self._seen) > self._capacity:
                return
            self._seen.add(key)
            if len(self._seen) > self._capacity:  # one past: say that no more will come, in its place
                message, args = "OSC: %d different problems logged; further ones are not", (self._capacity,)
        log.warning(message, *args)


class OscControl:
    """An OSC server on a thread of its own that turns messages into the engine's parameter
    changes. Binds in the constructor (a taken port fails there); start() runs it, close()
    stops it."""

    def __init__(self, engine: EngineServer, port: int, host: str = DEFAULT_HOST, *, allow_remote: bool = False):
        check_osc_bind(host, allow_remote)
        self._engine = engine
        self._specs = engine.param_specs  # the table's, with this engine's bounds (serve --max-*)
        self._names = [param.name for param in osc_params()]
        self._problems = LogOnce()
        dispatcher = Dispatcher(strict_timing=False)  # a bundle timed for later would hold this thread until then
        for name in self._names:
            dispatcher.map(f"{PREFIX}/{name}", self._set_everywhere, name)
        dispatcher.set_default_handler(self._other_address)
        self._server = _OscUdpServer((host, port), dispatcher, self._problems)
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="engine-osc", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("OSC: listening at udp://%s:%d for %s/<param> and %s/<session>/<param>", self.host, self.port,
                 PREFIX, PREFIX)

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def _set_everywhere(self, address: str, fixed: list[str], *args: Any) -> None:
        self._set(address, None, fixed[0], args)

    def _other_address(self, address: str, *args: Any) -> None:
        """/sd/<session>/<param>, or an address nobody has."""
        match = _SESSION_ADDRESS.fullmatch(address)
        if match is None or match["param"] not in self._names:
            self._problems.warning(("address", address[:MAX_ADDRESS_SHOWN]), "OSC: ignored %s: no such address; the "
                                   "addresses are %s/<param> and %s/<session>/<param>, <param> one of %s",
                                   address[:MAX_ADDRESS_SHOWN], PREFIX, PREFIX, ", ".join(self._names))
            return
        self._set(address, match["session"], match["param"], args)

    def _set(self, address: str, session: str | None, name: str, args: Sequence[Any]) -> None:
        # address is short here: a parameter's, with at most a session id (64 characters) in it
        try:
            value, clamped = osc_value(name, self._specs[name], args)
        except ProtocolError as error:
            self._problems.warning((address, error.code), "OSC: ignored %s: %s", address, error.message)
            return
        if clamped:
            self._problems.warning((address, "clamped"), "OSC: %s: %s", address, "; ".join(clamped))
        self._engine.set_params(session, {name: value}, self._refused)

    def _refused(self, session: str, error: ProtocolError) -> None:
        """A session did not take a change (it is not open, or its pipeline refused the value);
        called on the engine's IO thread."""
        self._problems.warning((session, error.field, error.code), "OSC: session %.80s did not take the change "
                               "(%s): %s", session, error.field, error.message)


class _OscUdpServer(BlockingOSCUDPServer):
    """python-osc's UDP server, one datagram at a time (in order, no thread per message),
    that logs a datagram which is not OSC rather than dropping it in silence."""

    def __init__(self, address: tuple[str, int], dispatcher: Dispatcher, problems: LogOnce):
        super().__init__(address, dispatcher)
        self._problems = problems

    def verify_request(self, request, client_address) -> bool:
        try:
            OscPacket(request[0])
        except Exception as error:  # noqa: BLE001 - whatever a random datagram makes the parser raise
            self._problems.warning("not OSC", "OSC: ignored a datagram from %s that is not an OSC message or "
                                   "bundle (%s)", client_address[0], error)
            return False
        return True


# --------------------------------------------------------------------------- values


def _as_kind(name: str, spec: ValueSpec, value: Any) -> Any:
    """value, as sent, converted to the kind of spec."""
    if spec.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _SWITCH_WORDS:
            return _SWITCH_WORDS[value.strip().lower()]
        if isinstance(value, (int, float)):
            return value != 0
        raise ProtocolError(ErrorCode.BAD_TYPE, name, f"{name} takes 1/0, true/false or on/off, got {value!r:.40}")
    if spec.kind is int:
        return round(_number(name, value))  # a fader sends 41.7 for 42
    if spec.kind is float:
        return float(_number(name, value))
    if spec.choices:
        return _choice(name, spec.choices, value)
    if isinstance(value, str):
        return value
    raise ProtocolError(ErrorCode.BAD_TYPE, name, f"{name} takes a string, got {type(value).__name__}")


def _number(name: str, value: Any) -> float:
    """A finite number from an OSC int, float or numeric string."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ProtocolError(ErrorCode.BAD_TYPE, name, f"{name} takes a number, got {value!r:.40}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(ErrorCode.BAD_TYPE, name, f"{name} takes a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ProtocolError(ErrorCode.BAD_VALUE, name, f"{name} takes a finite number, got {value}")
    return value


def _choice(name: str, choices: tuple[str, ...], value: Any) -> str:
    """One of choices, by its name in any case or by its index."""
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    if not isinstance(value, str):
        index = _number(name, value)
        if float(index).is_integer() and 0 <= index < len(choices):
            return choices[int(index)]
    raise ProtocolError(ErrorCode.BAD_VALUE, name, f"{name} takes one of {', '.join(choices)} or its index "
                                                   f"0 to {len(choices) - 1}, got {value!r:.40}")


def _clamped(name: str, spec: ValueSpec, value: Any) -> tuple[Any, list[str]]:
    """value within spec's bounds: a number clamped, a text cut; and what was done."""
    if spec.kind is str:
        if spec.maximum is not None and len(value) > spec.maximum:
            return value[:int(spec.maximum)], [f"{name} cut to {spec.maximum:g} characters"]
        return value, []
    if spec.kind not in (int, float):
        return value, []
    bounded = value
    if spec.minimum is not None:
        bounded = max(bounded, spec.kind(spec.minimum))
    if spec.maximum is not None:
        bounded = min(bounded, spec.kind(spec.maximum))
    return bounded, [] if bounded == value else [f"{name} {_number_text(value)} clamped to {_number_text(bounded)}"]


def _number_text(number: float) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"


def _pairs(name: str, spec: PairListSpec, args: Sequence[Any]) -> tuple[Any, list[str]]:
    """[text, number] pairs (weighted prompts, LoRA adapters) from alternating arguments,
    text first; a last text alone has the number 1."""
    pairs_kind, clamped = spec.pairs, []
    if len(args) > 2 * spec.maximum:
        clamped.append(f"{name}: only the first {spec.maximum:g} {name} taken")
        args = args[:2 * int(spec.maximum)]
    pairs = []
    for index in range(0, len(args), 2):
        entry = f"{name}[{index // 2}]"
        text, number = args[index], args[index + 1] if index + 1 < len(args) else 1.0
        if not isinstance(text, str):
            raise ProtocolError(ErrorCode.BAD_TYPE, name, f"{name} takes {pairs_kind.text}, {pairs_kind.number}, "
                                                          f"{pairs_kind.text}, {pairs_kind.number} ...; "
                                                          f"argument {index + 1} is {type(text).__name__}")
        text, text_clamped = _clamped(f"{entry} {pairs_kind.text}", ValueSpec(str, 0, spec.max_chars), text)
        number, number_clamped = _clamped(
            f"{entry} {pairs_kind.number}", ValueSpec(float, pairs_kind.number_minimum, pairs_kind.number_maximum),
            float(_number(f"{entry} {pairs_kind.number}", number)))
        pairs.append((text, number))
        clamped += text_clamped + number_clamped
    return spec.check(name, pairs), clamped
