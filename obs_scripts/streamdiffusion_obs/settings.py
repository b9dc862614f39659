"""The script's settings as plain values, and what a change to each one restarts.

OBS keeps settings in an obs_data object; the script reads them into ScriptSettings
once per script_update, and everything else works with these plain values.

A change takes effect in one of three ways:
- live: sent to the engine, which applies it at its next step (prompt, strength,
  seed, target FPS, latency budget);
- stream restart: sent to the engine, which starts the stream over, so the first
  frames come again after a short gap (steps);
- session restart: the script closes its session and opens a new one (engine
  address, model, output size, transport).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# Models `python -m engine serve --model` knows (engine/config.py's presets; the script
# cannot import engine/, which needs torch).
MODELS = ("wan2.1-1.3b", "wan2.1-14b", "tiny")
TRANSPORTS = {
    "shm": "Shared memory (fastest on one machine)",
    "zmq": "ZeroMQ",
    "spout": "Spout (Windows, Spout2 plugin: GPU textures, no copies)",
}

# The sources the script makes to show the engine's output.
OUTPUT_SOURCE_NAME = "StreamDiffusion output"  # a Media Source with no media, fed by the script
SPOUT_OUTPUT_SOURCE_NAME = "StreamDiffusion output (Spout)"  # the Spout2 plugin's capture source

# Parameters the engine takes, by their protocol names, and the settings holding them.
ENGINE_PARAMS = ("prompt", "strength", "steps", "seed", "target_fps", "latency_ms")
STREAM_RESTART_PARAMS = ("steps",)  # the engine's schema marks them "reload"
SESSION_FIELDS = ("address", "model", "width", "height", "transport")


@dataclass(frozen=True)
class ScriptSettings:
    address: str = "tcp://127.0.0.1:5555"
    environment: str = ""  # folder of the Python environment (a venv); "" for the default
    model: str = MODELS[0]
    input_source: str = ""
    prompt: str = "a watercolour painting"
    strength: float = 0.8
    steps: int = 2
    seed: int = 0
    target_fps: int = 30
    latency_ms: int = 500  # capture to output: the engine's scheduler holds the session's frames to it
    width: int = 512
    height: int = 512
    transport: str = "shm"

    def engine_params(self) -> dict:
        return {name: getattr(self, name) for name in ENGINE_PARAMS}

    def changed_params(self, before: ScriptSettings) -> dict:
        """Engine parameters whose values differ from `before`."""
        return {name: value for name, value in self.engine_params().items() if getattr(before, name) != value}


DEFAULTS = ScriptSettings()
SETTING_NAMES = tuple(f.name for f in fields(ScriptSettings))
