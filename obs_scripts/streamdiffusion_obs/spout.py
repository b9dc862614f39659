"""The Spout path (Windows): frames stay on the GPU between OBS and the engine.

With the Spout2 plugin for OBS (Off-World-Live/obs-spout2-plugin) installed:
- the plugin's Spout filter (win_spout_filter) on the input source publishes it as the
  Spout sender SENDER_FROM_OBS;
- the session opens with transport "spout": the engine reads that sender and
  publishes its stylised frames as the sender SENDER_FROM_ENGINE (the session
  parameters spout_input and spout_output name them);
- the plugin's Spout capture source (spout_capture) shows SENDER_FROM_ENGINE.
Frames then never pass through the script or the CPU: no read-back, no copies.

Where any part is missing (another OS, the plugin, or a bridge/ that opens Spout
sessions), unavailable_reason() says which, and the script uses the frame path.
"""

from __future__ import annotations

import sys
from typing import Any, Collection

import obspython as obs

PLATFORM = sys.platform  # a name of its own, so that tests can stand in for Windows
FILTER_ID = "win_spout_filter"
CAPTURE_ID = "spout_capture"
FILTER_NAME = "StreamDiffusion Spout sender"
SENDER_FROM_OBS = "StreamDiffusion OBS input"
SENDER_FROM_ENGINE = "StreamDiffusion OBS output"
SESSION_PARAMS = {"spout_input": SENDER_FROM_OBS, "spout_output": SENDER_FROM_ENGINE}


def unavailable_reason(client_transports: Collection[str]) -> str | None:
    """Why the Spout path cannot be used here, or None when it can."""
    if PLATFORM != "win32":
        return "Spout shares DirectX textures and needs Windows"
    missing = [kind for kind in (FILTER_ID, CAPTURE_ID) if obs.obs_source_get_display_name(kind) is None]
    if missing:
        return ("the Spout2 plugin for OBS is not installed (no source type "
                f"{' or '.join(missing)}): get it from github.com/Off-World-Live/obs-spout2-plugin")
    if "spout" not in client_transports:
        return "the bridge/ this script loads is too old to open Spout sessions: update it"
    return None


class SpoutFilter:
    """The Spout filter this script put on the input source; remove() takes it off again."""

    def __init__(self, source: Any):
        settings = obs.obs_data_create()
        obs.obs_data_set_string(settings, "spout_filter_name", SENDER_FROM_OBS)
        self._filter = obs.obs_source_create_private(FILTER_ID, FILTER_NAME, settings)
        obs.obs_data_release(settings)
        self._source = obs.obs_source_get_ref(source)
        obs.obs_source_filter_add(self._source, self._filter)

    def remove(self) -> None:
        obs.obs_source_filter_remove(self._source, self._filter)
        obs.obs_source_release(self._filter)
        obs.obs_source_release(self._source)


def capture_settings() -> Any:
    """Settings for the Spout capture source that shows the engine's output (release them)."""
    settings = obs.obs_data_create()
    obs.obs_data_set_string(settings, "spoutsenders", SENDER_FROM_ENGINE)
    return settings
