"""The script's settings as plain values, and what a change to each one restarts.

OBS keeps settings in an obs_data object; the script reads them into ScriptSettings
once per script_update, and everything else works with these plain values.

The session parameters (prompt, strength, target FPS, ...) are the bridge's parameter
table's (bridge/params.py): their names, kinds and defaults come from there, as do the
properties that show them, and a change to one is sent to the engine, which applies it
at its next step or, for a `reload` one (steps), starts the stream over. The script's
own settings are written here; a change to the engine address, output size or
transport closes the session and opens a new one. The model is the one a local engine
is started with: attached to a running engine, the script uses the model it serves.

Standard library and the table only, so the script can show its properties before the
Python environment with numpy and pyzmq is found.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from bridge import controls
from bridge import params as table

TRANSPORTS = {
    "shm": "Shared memory (fastest on one machine)",
    "zmq": "ZeroMQ",
    "spout": "Spout (Windows, Spout2 plugin: GPU textures, no copies)",
}

# The sources the script makes to show the engine's output.
OUTPUT_SOURCE_NAME = "StreamDiffusion output"  # a Media Source with no media, fed by the script
SPOUT_OUTPUT_SOURCE_NAME = "StreamDiffusion output (Spout)"  # the Spout2 plugin's capture source

SESSION_PARAMS = controls.host_params()  # the session parameters the script shows
SESSION_FIELDS = ("address", "width", "height", "transport")  # a change opens a new session


@dataclass(frozen=True)
class ScriptSettings:
    address: str = "tcp://127.0.0.1:5555"
    environment: str = ""  # folder of the Python environment (a venv); "" for the default
    model: str = table.DEFAULT_MODEL  # what a local engine serves
    input_source: str = ""
    width: int = 512
    height: int = 512
    transport: str = "shm"
    # The session parameters by their protocol names; one that could not be read is left out.
    params: Mapping[str, Any] = field(default_factory=dict)
    problem: str = ""  # why a session parameter could not be read; "" when all could

    def changed_params(self, before: ScriptSettings) -> dict:
        """Session parameters whose values differ from `before`."""
        return {name: value for name, value in self.params.items() if before.params.get(name) != value}


DEFAULTS = ScriptSettings()
HOST_SETTINGS = tuple(f.name for f in fields(ScriptSettings) if f.name not in ("params", "problem"))
