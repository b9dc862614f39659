"""The parts of the OBS script obs_scripts/streamdiffusion.py (OBS loads that file; it imports these).

    settings      the script's settings as plain values, and which change restarts what
    environment   finds the Python environment with numpy, pyzmq and bridge/, puts it on sys.path
    pipeline      the running part: capture timer, the engine session, output source, Spout wiring
    frames        reading a source's pixels back from the GPU, pushing frames into a source
    libobs        the two libobs calls obspython cannot make, through ctypes
    spout         the Spout2 plugin's filter and capture source (Windows)

The engine session and the local engine are the bridge's host layer (bridge/background.py,
bridge/launcher.py). settings and environment need only the standard library (settings
with the bridge's parameter table, which is too), so the script can show its properties
and say what is missing before numpy or the rest of bridge/ can be imported.
"""
