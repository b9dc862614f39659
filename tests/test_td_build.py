"""The TouchDesigner component without an engine: what build_tox.py makes, the parameter
pages, the picture while stopped, and the messages that say why it cannot start.

TouchDesigner is the fake `td` module in fake_td.py, which follows the documented API.
"""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fake_td
from td_harness import TD_COMPONENTS, build_component, pattern, source_top

pytestmark = pytest.mark.timeout(60)


def frames_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        fake_td.run_frame()
        time.sleep(0.01)


@pytest.fixture
def td():
    module = fake_td.install()
    yield module
    fake_td.quit_project()
    sys.modules.pop("td", None)


@pytest.fixture
def component(td, tmp_path):
    return build_component(tmp_path / "StreamDiffusion.tox")


def test_the_build_script_makes_the_network_it_describes_and_saves_it(td, tmp_path):
    tox = tmp_path / "out" / "StreamDiffusion.tox"
    component = build_component(tox)

    assert component.path == "/project1/streamdiffusion"
    kinds = {node.name: node.opType for node in component.children}
    assert kinds == {
        "streamdiffusion_ext": "textDAT", "streamdiffusion_params": "textDAT", "in1": "inTOP",
        "fit_input": "fitTOP", "stream": "scriptTOP",
        "stream_callbacks": "textDAT", "out1": "outTOP", "engine_log": "textDAT", "prompts": "tableDAT",
        "loras": "tableDAT",
        "frame_start": "executeDAT", "parameter_changes": "parameterexecuteDAT",
    }
    # The picture's way through, in to out.
    op = component.op
    assert op("fit_input").inputs == [op("in1")]
    assert op("stream").inputs == [op("fit_input")]
    assert op("out1").inputs == [op("stream")]
    # Every piece of code is linked to its file in td_components, and the files exist.
    for dat, module in [("streamdiffusion_ext", "streamdiffusion_ext"),
                        ("streamdiffusion_params", "streamdiffusion_params"),
                        ("stream_callbacks", "script_top_callbacks"), ("frame_start", "execute_callbacks"),
                        ("parameter_changes", "parameter_callbacks")]:
        assert Path(op(dat).par.file.val) == TD_COMPONENTS / f"{module}.py"
        assert op(dat).par.syncfile.val and op(dat).text
    assert op("stream").par.callbacks.eval() is op("stream_callbacks")
    # The callbacks are wired: every frame, on quitting, on the component's own parameters.
    assert op("frame_start").par.framestart.val and op("frame_start").par.exit.val
    changes = op("parameter_changes")
    assert changes.par.op.eval() is component
    assert changes.par.custom.val and not changes.par.builtin.val
    assert changes.par.valuechange.val and changes.par.onpulse.val
    assert set(changes.par.pars.val.split()) >= {"Prompt", "Strength", "Steps", "Start", "Stop", "Restart"}
    assert "Enginestate" not in changes.par.pars.val.split()
    # The extension is there, promoted, and initialised.
    assert type(component.ext.StreamDiffusionExt).__name__ == "StreamDiffusionExt"
    assert callable(component.Start) and callable(component.Restart)
    assert component.par.Enginestate.eval() == "stopped"
    # Saved where asked.
    assert component.saved_to == [str(tox)] and tox.is_file()


def test_the_parameter_pages_are_the_ones_the_issue_specifies(component):
    pages = {page.name: page for page in component.customPages}
    assert list(pages) == ["Engine", "Prompt", "Style", "Stream", "Targets", "Output", "Transport", "Status"]
    expected = {
        "Engine": {"Mode": "Menu", "Python": "File", "Engineargs": "Str", "Model": "Menu", "Address": "Str",
                   "Bridgepath": "Folder", "Start": "Pulse", "Stop": "Pulse", "Restart": "Pulse",
                   "Processstate": "Str", "Openlog": "Pulse"},
        "Prompt": {"Prompt": "Str", "Prompts": "DAT", "Blend": "Menu", "Transitionframes": "Int"},
        "Style": {"Loras": "DAT"},
        "Stream": {"Strength": "Float", "Steps": "Int", "Seed": "Int", "Fit": "Menu", "Lowlatencystart": "Toggle"},
        "Targets": {"Targetfps": "Float", "Latencyms": "Float"},
        "Output": {"Virtualcam": "Toggle"},
        "Transport": {"Transport": "Menu", "Spoutinput": "Str", "Spoutoutput": "Str", "Outputsize": "Menu",
                      "Resolution1": "Int", "Resolution2": "Int"},
        "Status": {"Enginestate": "Str", "Message": "Str", "Enginemodel": "Str", "Outputfps": "Float",
                   "Latency": "Float", "Droppedframes": "Int", "Firstframe": "Float", "Scheduler": "Str"},
    }
    for name, styles in expected.items():
        assert {par.name: par.style for par in pages[name].pars} == styles, name

    par = component.par
    assert par.Mode.menuNames == ["start", "attach"]
    assert par.Transport.menuNames == ["shm", "spout"]
    assert "Shared Memory" in par.Transport.menuLabels[0] and "Windows" in par.Transport.menuLabels[1]
    assert par.Blend.menuNames == ["linear", "slerp"]
    assert set(par.Fit.menuNames) == {"letterbox", "crop", "stretch"}
    assert "tiny" in par.Model.menuNames
    assert par.Prompts.eval() is component.op("prompts") and par.Loras.eval() is component.op("loras")
    # The user reads Status and the process state; only the component writes them.
    assert all(p.readOnly for p in pages["Status"].pars) and par.Processstate.readOnly
    assert not any(p.readOnly for page in ("Prompt", "Style", "Stream", "Targets", "Output", "Transport")
                   for p in pages[page].pars)
    # Reload-type parameters say so before they are touched.
    assert "restarts the stream" in par.Steps.help and "restarts the stream" in par.Lowlatencystart.help
    assert par.Resolution1.normMax == 1280 and "1280" in par.Resolution1.help


def test_stopped_it_shows_its_input_as_it_is_and_resizes_it_when_asked(component):
    pixels = pattern()
    component.inputConnectors[0].connect(source_top(pixels))
    for _ in range(3):  # the first delayed download is empty
        fake_td.run_frame()
    np.testing.assert_array_equal(component.op("stream").copied, pixels)
    assert component.op("out1").numpyArray().shape == (48, 64, 4)

    component.par.Outputsize = "custom"
    component.par.Resolution1, component.par.Resolution2 = 32, 32
    for _ in range(3):
        fake_td.run_frame()
    resized = component.op("stream").copied
    assert resized.shape == (32, 32, 4)
    assert resized[0, 0, 0] > resized[-1, 0, 0]  # still red at the bottom, brighter at the top
    assert resized[-1, 16, 1] > resized[0, 16, 1]


@pytest.mark.parametrize("setting, message", [
    ({"Mode": "start", "Python": ""}, "set Python Executable"),
    ({"Mode": "start", "Python": "/nowhere/bin/python"}, "does not exist"),
    ({"Mode": "start", "Engineargs": "--weights 'unclosed"}, "cannot start the engine"),
])
def test_a_start_that_cannot_work_says_why_and_what_to_do(component, setting, message):
    component.par.Python = sys.executable
    for name, value in setting.items():
        component.par[name].val = value
    component.par.Start.pulse()
    frames_until(lambda: component.par.Enginestate.eval() == "error")
    assert message in component.par.Message.eval()
    assert message in component.op("engine_log").text


def test_attached_to_an_address_where_no_engine_listens_it_keeps_trying_and_says_so(component):
    component.inputConnectors[0].connect(source_top(pattern()))
    component.par.Mode = "attach"
    component.par.Address = "tcp://127.0.0.1:9"  # discard: nothing answers there
    component.par.Start.pulse()
    frames_until(lambda: "no engine answers" in component.par.Message.eval())
    assert component.par.Enginestate.eval() == "unreachable"
    assert component.par.Processstate.eval() == "attached to the engine at tcp://127.0.0.1:9"
    component.par.Stop.pulse()
    fake_td.run_frame()
    assert component.par.Enginestate.eval() == "stopped"


def test_parameter_changes_go_to_the_host_layer_which_debounces_them(component):
    component.par.Mode = "attach"
    component.par.Address = "tcp://127.0.0.1:9"  # no engine needed: the changes are caught on their way
    component.par.Start.pulse()
    client = component.ext.StreamDiffusionExt._client
    handed = []
    set_params = client.set
    client.set = lambda **params: (handed.append(params), set_params(**params))

    for strength in (0.3, 0.4, 0.5):
        component.par.Strength = strength
        fake_td.run_frame()
    component.par.Prompt = "ink on paper"
    component.op("prompts").appendRow(["ink on paper", "0.7"])
    fake_td.run_frame()
    # Each change as it comes (bridge.background sends them once they are still: tests/test_background.py);
    # the Weighted Prompts table once it changed, read each frame.
    assert handed == [{"strength": 0.3}, {"strength": 0.4}, {"strength": 0.5}, {"prompt": "ink on paper"},
                      {"prompts": [["ink on paper", 0.7]]}]


def test_open_log_shows_the_log_and_a_bad_weighted_prompts_row_is_said_once(component):
    component.par.Openlog.pulse()
    assert component.op("engine_log").viewer_opened

    component.op("prompts").appendRow(["ink on paper", "lots"])
    for _ in range(5):
        fake_td.run_frame()
    said = component.op("engine_log").text.count("the weight 'lots' of 'ink on paper' is not a number")
    assert said == 1 and "the weight 'lots' of 'ink on paper' is not a number" in component.par.Message.eval()


def test_inside_touchdesigner_only_the_standard_library_numpy_and_the_bridge_load(tmp_path):
    # A fresh interpreter: build the component, start it (which loads the link and the bridge).
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import fake_td
from td_harness import build_component
fake_td.install()
component = build_component({str(tmp_path / "c.tox")!r})
component.par.Mode, component.par.Address = "attach", "tcp://127.0.0.1:9"
component.par.Start.pulse()
assert component.ext.StreamDiffusionExt._client is not None
fake_td.quit_project()
ours = {{"fake_td", "td", "td_harness", "bridge"}}
loaded = {{name.split(".")[0] for name in sys.modules}} - set(sys.stdlib_module_names) - ours
# Less the interpreter's own: private modules (import hooks, __main__) and Cython's runtime.
print(sorted(name for name in loaded if not name.startswith("_") and name != "cython_runtime"))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['msgpack', 'numpy', 'zmq']"
