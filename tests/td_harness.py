"""What the TouchDesigner component's tests share: building it in the fake `td`, and a test pattern."""

import runpy
from pathlib import Path

import numpy as np

import fake_td

TD_COMPONENTS = Path(__file__).resolve().parents[1] / "td_components"


def build_component(tox_path, develop: bool = False):
    """Run build_tox.py as TouchDesigner's Textport would, and return the component."""
    build = runpy.run_path(str(TD_COMPONENTS / "build_tox.py"))["build"]
    component = build("/project1", tox_path, develop=develop)
    fake_td.run_frame()  # the extension's onInitTD runs at the end of its first frame
    return component


def source_top(pixels: np.ndarray):
    """A Script TOP in /project1 showing pixels (float32 RGBA, rows bottom to top)."""
    source = fake_td.op("/project1").create(fake_td.scriptTOP, "source")
    source.par.modoutsidecook = True
    source.copyNumpyArray(pixels)
    return source


def pattern(height: int = 48, width: int = 64) -> np.ndarray:
    """Rows get brighter upward (TouchDesigner's first row is the bottom one); a red square bottom left."""
    pixels = np.zeros((height, width, 4), np.float32)
    pixels[..., :3] = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    pixels[:8, :8] = (1.0, 0.0, 0.0, 1.0)
    pixels[..., 3] = 1.0
    return pixels
