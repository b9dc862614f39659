"""The parts of the OBS script obs_scripts/streamdiffusion.py (OBS loads that file; it imports these).

    settings      the script's settings as plain values, and which change restarts what
    environment   finds the Python environment with numpy, pyzmq and bridge/, puts it on sys.path
    local_engine  starts and stops `python -m engine serve` for the script's buttons
    pipeline      the running part: capture timer, engine link, output source, Spout wiring
    frames        reading a source's pixels back from the GPU, pushing frames into a source
    libobs        the two libobs calls obspython cannot make, through ctypes
    engine_link   the EngineClient on a thread of its own
    spout         the Spout2 plugin's filter and capture source (Windows)

settings, environment and local_engine need only the standard library, so the script
can show its properties and say what is missing before numpy or bridge/ can be imported.
"""
