"""The session parameter table: every parameter a host can set, once.

Each entry says its name, type, default, bounds, unit, when a change takes effect
(at the next step, by restarting the stream, or only when a session opens), a line
of help, and the group a host shows it in. Everything else derives from it: the
protocol's validation (bridge/protocol.py), the engine's sessions and stream
settings, the `run`/`serve` flags that set session defaults, the schema in the
engine's hello reply, OSC addresses, and the controls TouchDesigner and OBS build.

Standard library only, so a host can import it before anything else is on its path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# When a change to a parameter takes effect.
LIVE = "live"  # at the next step; caches kept
RELOAD = "reload"  # the stream starts over (caches emptied, the stream batch fills again)
OPEN = "open"  # taken only when a session opens (in its hello)

MAX_PROMPT_CHARS = 4096  # the protocol's bound; an engine may take fewer (serve --max-prompt-chars)
MAX_WEIGHTED_PROMPTS = 8
MAX_LORAS = 4  # LoRA adapters a session mixes at once
MAX_LORA_NAME_CHARS = 1024  # a name in the engine's LoRA folder, or a path


@dataclass(frozen=True)
class PairKind:
    """A kind of value that is a list of [text, number] pairs: what a host calls the two, and their bounds."""

    name: str  # the kind's name in KINDS
    text: str  # what the text of a pair is, e.g. "text" of a weighted prompt
    number: str  # what its number is, e.g. "weight"
    min_chars: int
    max_chars: int
    number_minimum: float | None
    number_maximum: float | None
    needs_positive: bool  # at least one number above 0 (weights mix by their share of the sum)


PAIR_KINDS = {
    "prompts": PairKind("prompts", "text", "weight", 0, MAX_PROMPT_CHARS, 0.0, None, True),
    "loras": PairKind("loras", "name", "scale", 1, MAX_LORA_NAME_CHARS, -2.0, 2.0, False),
}
# Kinds of value: single values, and lists of pairs (PAIR_KINDS).
KINDS = ("bool", "int", "float", "str", *PAIR_KINDS)
MAX_SEED = 2**31 - 1  # what a 32-bit integer control (OBS, TouchDesigner) can hold
MAX_MODEL_SIZE = 2048  # the protocol's bound; an engine may take less (serve --max-model-size)
MAX_SPOUT_NAME_CHARS = 255  # Spout keeps sender names in 256-byte buffers
MAX_ENDPOINT_NAME_CHARS = 255  # NDI source and Syphon server names, bounded as Spout's
DEFAULT_MODEL = "wan2.1-1.3b"  # the model `serve`, TouchDesigner and OBS use unless told otherwise


@dataclass(frozen=True)
class Param:
    name: str  # the protocol name (snake_case)
    kind: str  # one of KINDS
    default: Any
    applies: str  # LIVE, RELOAD or OPEN
    group: str  # the page or section a host shows it in
    label: str  # what a host's control is called
    help: str  # one line
    minimum: float | None = None  # numbers: the smallest value; strings: the fewest characters; pairs: entries
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    unit: str = ""
    slider: tuple[float, float] | None = None  # the range a slider spans when the bounds are too wide for one

    @property
    def slider_range(self) -> tuple[float, float]:
        """Where a host's slider runs: `slider`, else the bounds."""
        return self.slider or (self.minimum, self.maximum)

    def describe(self) -> dict[str, Any]:
        """This entry as plain data (msgpack, JSON), as the engine's hello reply carries it."""
        default = [list(pair) for pair in self.default] if self.kind in PAIR_KINDS else self.default
        described: dict[str, Any] = {"type": self.kind, "default": default}
        for name in ("minimum", "maximum", "unit"):
            if getattr(self, name) not in (None, ""):
                described[name] = getattr(self, name)
        if self.choices:
            described["choices"] = list(self.choices)
        if self.slider:
            described["slider"] = list(self.slider)
        described.update(applies=self.applies, group=self.group, label=self.label, help=self.help)
        return described


_TABLE = (
    # -- Prompt
    Param("prompt", "str", "a watercolour painting", LIVE, "Prompt", "Prompt",
          "What the picture becomes; used when Weighted Prompts is empty.", 0, MAX_PROMPT_CHARS),
    Param("prompts", "prompts", (), LIVE, "Prompt", "Weighted Prompts",
          "Prompts blended by weight, as [text, weight] pairs; when given they replace Prompt.",
          0, MAX_WEIGHTED_PROMPTS),
    Param("blend", "str", "linear", LIVE, "Prompt", "Blend Method",
          "How weighted prompts mix: linear, or slerp (exactly two prompts).", choices=("linear", "slerp")),
    Param("transition_frames", "int", 0, LIVE, "Prompt", "Transition Length",
          "Output frames over which a new prompt takes over from the old one; 0 cuts at once.",
          0, 256, unit="frames", slider=(0, 64)),
    # -- Style
    Param("loras", "loras", (), LIVE, "Style", "LoRA Styles",
          "Style adapters (LoRA) mixed by scale, as [name, scale] pairs: a file in the engine's LoRA folder "
          "(serve --lora-dir) or a path; a new scale applies at the next chunk.", 0, MAX_LORAS),
    # -- Stream
    Param("strength", "float", 0.8, LIVE, "Stream", "Strength",
          "How far the picture moves toward the prompt: the noise level for a still scene.", 0.1, 1.0),
    Param("steps", "int", 2, RELOAD, "Stream", "Steps",
          "Denoising steps: more is slower and cleaner. Changing it restarts the stream.", 1, 4),
    Param("seed", "int", 0, LIVE, "Stream", "Seed", "The noise's seed: the same seed gives the same stream.",
          0, MAX_SEED, slider=(0, 1000)),
    Param("fit", "str", "letterbox", LIVE, "Stream", "Fit Mode",
          "How frames are fitted to the model's size and back.", choices=("letterbox", "crop", "stretch")),
    Param("low_latency_start", "bool", False, RELOAD, "Stream", "Low-Latency Start",
          "The first output after 1 frame instead of 5. Changing it restarts the stream."),
    # -- Targets, which the engine's scheduler holds the session to
    Param("target_fps", "float", 16.0, LIVE, "Targets", "Target FPS",
          "The frame rate the host sends at and wants back.", 1.0, 240.0, unit="fps", slider=(1.0, 60.0)),
    Param("latency_ms", "float", 500.0, LIVE, "Targets", "Latency Budget",
          "From a frame's capture to its stylised output; the scheduler holds the stream to it.",
          1.0, 60_000.0, unit="ms", slider=(50.0, 5000.0)),
    # -- Model size, which frames are fitted to
    Param("model_width", "int", 512, RELOAD, "Model", "Model Width",
          "Width the model works at (a multiple of 16; default: the engine's --size). Restarts the stream.",
          16, MAX_MODEL_SIZE, unit="px", slider=(256, 1024)),
    Param("model_height", "int", 512, RELOAD, "Model", "Model Height",
          "Height the model works at (a multiple of 16; default: the engine's --size). Restarts the stream.",
          16, MAX_MODEL_SIZE, unit="px", slider=(256, 1024)),
    # -- Outputs besides the host
    Param("virtualcam", "bool", False, LIVE, "Output", "Virtual Camera",
          "Also send the output to a virtual camera that Zoom, Discord or OBS can pick."),
    # -- Spout sessions (Windows), fixed when the session opens
    Param("spout_input", "str", "", OPEN, "Spout", "Spout Input Sender",
          "The Spout sender the engine reads; empty for Spout's active sender.", 0, MAX_SPOUT_NAME_CHARS),
    Param("spout_output", "str", "StreamDiffusion", OPEN, "Spout", "Spout Output Sender",
          "The Spout sender the engine publishes the stylised frames as.", 1, MAX_SPOUT_NAME_CHARS),
    # -- NDI sessions (any platform, over the network), fixed when the session opens
    Param("ndi_input", "str", "", OPEN, "NDI", "NDI Input Source",
          "The NDI source the engine reads, as NDI lists it (MACHINE (NAME)) or just NAME; empty for the first "
          "found.", 0, MAX_ENDPOINT_NAME_CHARS),
    Param("ndi_output", "str", "StreamDiffusion", OPEN, "NDI", "NDI Output Source",
          "The NDI source the engine publishes the stylised frames as.", 1, MAX_ENDPOINT_NAME_CHARS),
    # -- Syphon sessions (macOS), fixed when the session opens
    Param("syphon_input", "str", "", OPEN, "Syphon", "Syphon Input Server",
          "The Syphon server the engine reads; empty for the first found.", 0, MAX_ENDPOINT_NAME_CHARS),
    Param("syphon_output", "str", "StreamDiffusion", OPEN, "Syphon", "Syphon Output Server",
          "The Syphon server the engine publishes the stylised frames as.", 1, MAX_ENDPOINT_NAME_CHARS),
)

PARAMS: dict[str, Param] = {param.name: param for param in _TABLE}
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(param.group for param in _TABLE))


def defaults() -> dict[str, Any]:
    """Every parameter at its default."""
    return {name: param.default for name, param in PARAMS.items()}


def in_group(*groups: str) -> tuple[Param, ...]:
    """The parameters of these groups, in the table's order."""
    return tuple(param for param in _TABLE if param.group in groups)
