"""Loading any bridge module loads no platform binding, no torch and no engine code.

TouchDesigner and OBS load bridge/ in their own Python, where SpoutGL, pyvirtualcam or
syphon may be missing or broken; those are imported only when a Spout, Syphon or
virtual-camera object is made.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
NOT_AT_IMPORT = ("SpoutGL", "OpenGL", "pyvirtualcam", "syphon", "objc", "Metal", "torch", "engine")

CHECK = """
import importlib, json, pkgutil, sys
import bridge
modules = [info.name for info in pkgutil.iter_modules(bridge.__path__, "bridge.")]
for name in modules:
    importlib.import_module(name)
print(json.dumps({"modules": modules, "loaded": sorted(set(sys.argv[1:]) & set(sys.modules))}))
"""


def test_no_bridge_module_imports_a_platform_binding_torch_or_the_engine():
    result = subprocess.run(
        [sys.executable, "-c", CHECK, *NOT_AT_IMPORT], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"bridge.spout", "bridge.virtualcam", "bridge.syphon"} <= set(report["modules"])
    assert report["loaded"] == []
