"""The TouchDesigner component: what build_tox.py makes, the parameter pages, the picture
while stopped, the messages that say why it cannot start, and the .tox travelling: moved
away from the repository, loaded where neither the repository nor the bridge is, installed
with its Install pulse (real pip, from local wheels) and streaming through a real engine.

TouchDesigner is the fake `td` module in fake_td.py, which follows the documented API.
"""

import base64
import csv
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fake_td
from td_harness import TD_COMPONENTS, build_component, pattern, source_top

pytestmark = pytest.mark.timeout(60)

REPO = TD_COMPONENTS.parent
CODE_DATS = [("streamdiffusion_ext", "streamdiffusion_ext"), ("streamdiffusion_params", "streamdiffusion_params"),
             ("streamdiffusion_install", "streamdiffusion_install"), ("stream_callbacks", "script_top_callbacks"),
             ("frame_start", "execute_callbacks"), ("parameter_changes", "parameter_callbacks")]


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
        "streamdiffusion_ext": "textDAT", "streamdiffusion_params": "textDAT", "streamdiffusion_install": "textDAT",
        "in1": "inTOP", "fit_input": "fitTOP", "stream": "scriptTOP",
        "stream_callbacks": "textDAT", "out1": "outTOP", "engine_log": "textDAT", "prompts": "tableDAT",
        "loras": "tableDAT", "bridge_package": "baseCOMP",
        "frame_start": "executeDAT", "parameter_changes": "parameterexecuteDAT",
    }
    # The picture's way through, in to out.
    op = component.op
    assert op("fit_input").inputs == [op("in1")]
    assert op("stream").inputs == [op("fit_input")]
    assert op("out1").inputs == [op("stream")]
    # Every piece of code is in its DAT, as the file in td_components has it, and no DAT refers to a file.
    for dat, module in CODE_DATS:
        assert op(dat).text == (TD_COMPONENTS / f"{module}.py").read_text()
        assert not op(dat).par.file.val and not op(dat).par.syncfile.val
    # The bridge travels inside, for Install: each file of the package, and what pip must add to TouchDesigner.
    package = op("bridge_package")
    manifest = {row[0].val: row[1].val for row in package.op("manifest").rows()[1:]}
    repo = TD_COMPONENTS.parent
    assert set(manifest) == {p.relative_to(repo).as_posix() for p in (repo / "bridge").rglob("*.py")}
    assert "bridge/__init__.py" in manifest and "bridge/client.py" in manifest
    for relative, dat in manifest.items():
        assert package.op(dat).text == (repo / relative).read_text()
    requirements = package.op("requirements").text.split()
    assert {r.split(">")[0].split("=")[0] for r in requirements} == {"pyzmq", "msgpack"}  # numpy: TouchDesigner's
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
                   "Bridgepath": "Folder", "Install": "Pulse", "Installpython": "File", "Installed": "Str",
                   "Start": "Pulse", "Stop": "Pulse", "Restart": "Pulse", "Processstate": "Str", "Openlog": "Pulse"},
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
    assert all(p.readOnly for p in pages["Status"].pars) and par.Processstate.readOnly and par.Installed.readOnly
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


def test_developer_mode_links_the_code_to_the_repository_files_instead(td, tmp_path):
    component = build_component(tmp_path / "StreamDiffusion.tox", develop=True)
    for dat, module in CODE_DATS:
        assert Path(component.op(dat).par.file.val) == TD_COMPONENTS / f"{module}.py"
        assert component.op(dat).par.syncfile.val and component.op(dat).text
    package = component.op("bridge_package")
    client = package.op("bridge_client_py")
    assert Path(client.par.file.val) == REPO / "bridge" / "client.py" and client.par.syncfile.val
    assert component.par.Enginestate.eval() == "stopped"


def test_installs_pip_command_targets_touchdesigners_python_even_when_pip_runs_in_another(td, tmp_path):
    install = build_component(tmp_path / "c.tox").op("streamdiffusion_install").module
    same = install.pip_command(["py"], "3.11", tmp_path / "f", tmp_path / "r.txt", target_version="3.11")
    assert same == ["py", "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--upgrade",
                    "--target", str(tmp_path / "f"), "-r", str(tmp_path / "r.txt")]
    other = install.pip_command(["python3"], "3.12", tmp_path / "f", tmp_path / "r.txt", target_version="3.11")
    assert other[-5:] == ["--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:"]
    # The default folder is the user's, one per Python version, never TouchDesigner's installation.
    folder = install.default_folder("3.11")
    assert folder.name == "touchdesigner-python3.11" and Path.home() in folder.parents


def test_install_leaves_a_bridge_it_did_not_write_alone_and_says_so(component, tmp_path):
    folder = tmp_path / "mine"
    (folder / "bridge").mkdir(parents=True)
    (folder / "bridge" / "__init__.py").write_text("# the user's own\n")
    component.par.Bridgepath = str(folder)
    component.par.Install.pulse()
    frames_until(lambda: component.par.Enginestate.eval() != "installing")
    assert component.par.Enginestate.eval() == "error"
    assert "was not installed by this component" in component.par.Message.eval()
    assert (folder / "bridge" / "__init__.py").read_text() == "# the user's own\n"
    assert "not installed in" in component.par.Installed.eval()


# ------------------------------------------------------------------- the .tox travelling


def wheel_of(distribution: str, wheelhouse: Path) -> Path:
    """The installed distribution packed back into a wheel (its files as installed, its own
    tags), so that pip can install it with no network."""
    dist = importlib.metadata.distribution(distribution)
    info = next(Path(str(f)).parts[0] for f in dist.files if str(f).endswith(".dist-info/METADATA"))
    root = Path(dist.locate_file(info)).parent
    tags = [line.split(":", 1)[1].strip() for line in (root / info / "WHEEL").read_text().splitlines()
            if line.startswith("Tag:")]
    parts = [sorted({tag.split("-")[i] for tag in tags}) for i in range(3)]
    name = dist.metadata["Name"].replace("-", "_")
    path = wheelhouse / f"{name}-{dist.version}-{'-'.join('.'.join(p) for p in parts)}.whl"
    left_out = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"}
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for file in dist.files:
            relative = Path(str(file))
            if relative.parts[0] == ".." or "__pycache__" in relative.parts or (relative.parts[0] == info and relative.name in left_out):
                continue
            data = (root / relative).read_bytes()
            wheel.writestr(relative.as_posix(), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            writer.writerow([relative.as_posix(), f"sha256={digest}", len(data)])
        writer.writerow([f"{info}/RECORD", "", ""])
        wheel.writestr(f"{info}/RECORD", record.getvalue())
    return path


TOUCHDESIGNER = """
# TouchDesigner on another machine: its Python with numpy and the td module, nothing else.
import json, sys, time
import numpy as np
import fake_td

TOX, ENGINE_PYTHON = sys.argv[1], sys.argv[2]
fake_td.install()
report = {"sys_path": list(sys.path)}

def frames_until(condition, timeout_s):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        fake_td.run_frame()
        time.sleep(1 / 60)
    return True

component = fake_td.op("/project1").loadTox(TOX)
fake_td.run_frame()
par = component.par
report["loaded"] = [par.Enginestate.eval(), par.Message.eval(), par.Installed.eval()]

par.Install.pulse()
frames_until(lambda: par.Enginestate.eval() != "installing", 240)
report["installed"] = [par.Enginestate.eval(), par.Message.eval(), par.Installed.eval()]
report["install_log"] = component.op("engine_log").text
if report["installed"][0] != "stopped":
    print(json.dumps(report))
    sys.exit(0)

# A test pattern into the component, and the tiny model started on the CPU.
source = fake_td.op("/project1").create(fake_td.scriptTOP, "source")
source.par.modoutsidecook = True
pixels = np.zeros((48, 64, 4), np.float32)
pixels[..., :3] = np.linspace(0.0, 1.0, 48, dtype=np.float32)[:, None, None]
pixels[..., 3] = 1.0
source.copyNumpyArray(pixels)
component.inputConnectors[0].connect(source)
par.Mode, par.Python, par.Model = "start", ENGINE_PYTHON, "tiny"
par.Address, par.Engineargs = "tcp://127.0.0.1:*", "--size 32x32 --session-timeout 5"
par.Start.pulse()

def stylised():
    shown = component.op("stream").copied
    return par.Enginestate.eval() == "streaming" and shown is not None and shown.dtype == np.uint8

report["streamed"] = frames_until(stylised, 150)
report["streaming"] = [par.Enginestate.eval(), par.Message.eval(), par.Outputfps.eval()]
report["shown"] = list(component.op("out1").numpyArray().shape)
par.Stop.pulse()
fake_td.run_frame()
fake_td.quit_project()
report["log"] = component.op("engine_log").text
report["modules"] = {name: getattr(module, "__file__", None) for name, module in sys.modules.items()
                     if name.split(".")[0] in ("bridge", "zmq", "msgpack", "numpy", "fake_td")}
print(json.dumps(report))
"""


@pytest.mark.timeout(420)
@pytest.mark.skipif(sys.platform == "win32", reason="links TouchDesigner's numpy into place with a symlink")
def test_the_tox_moved_to_another_machine_installs_its_bridge_and_streams(td, tmp_path):
    # Built here, from the repository...
    built = tmp_path / "build" / "StreamDiffusion.tox"
    build_component(built)
    fake_td.quit_project()
    saved = built.read_text()
    assert str(REPO) not in saved and str(TD_COMPONENTS) not in saved  # no DAT points into the repository
    (tmp_path / "elsewhere").mkdir()
    tox = shutil.move(str(built), str(tmp_path / "elsewhere" / "StreamDiffusion.tox"))
    shutil.rmtree(tmp_path / "build")

    # ...and loaded on a machine with TouchDesigner only: a Python whose path has the standard
    # library, numpy and td; no repository, no site-packages, no bridge, pyzmq or msgpack.
    touchdesigner = tmp_path / "touchdesigner"
    touchdesigner.mkdir()
    shutil.copy(Path(fake_td.__file__), touchdesigner / "fake_td.py")
    numpy_folder = Path(importlib.metadata.distribution("numpy").locate_file("numpy"))
    for name in ("numpy", "numpy.libs"):
        if (numpy_folder.parent / name).exists():
            (touchdesigner / name).symlink_to(numpy_folder.parent / name)
    (touchdesigner / "touchdesigner.py").write_text(TOUCHDESIGNER)
    # pip reaches no index: it installs from wheels of the packages installed here.
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    for distribution in ("pyzmq", "msgpack"):
        wheel_of(distribution, wheelhouse)
    home = tmp_path / "home"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PIP_", "XDG_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheelhouse), PIP_NO_CACHE_DIR="1",
               PIP_CONFIG_FILE=os.devnull)
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c",
         f"import sys; sys.path.insert(0, {str(touchdesigner)!r}); import runpy; "
         f"runpy.run_path({str(touchdesigner / 'touchdesigner.py')!r}, run_name='__main__')",
         tox, sys.executable],
        capture_output=True, text=True, timeout=400, cwd=tmp_path / "elsewhere", env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert not any(path.startswith(str(REPO)) for path in report["sys_path"])
    state, message, installed = report["loaded"]
    assert state == "error" and "cannot load the bridge (No module named" in message and "press Install" in message
    assert installed.startswith("not installed in")
    data = home / ("Library/Application Support" if sys.platform == "darwin" else ".local/share")
    folder = data / "streamdiffusion" / f"touchdesigner-python{sys.version_info.major}.{sys.version_info.minor}"
    state, message, installed = report["installed"]
    assert state == "stopped" and message == f"installed in {folder}: press Start", report["install_log"]
    assert installed.startswith("bridge 0.") and "pyzmq" in installed and "msgpack" in installed
    assert "--target" in report["install_log"] and "Successfully installed" in report["install_log"]
    # The bridge, pyzmq and msgpack came from the Bridge Path Install filled; numpy stayed TouchDesigner's.
    modules = report["modules"]
    for name in ("bridge", "bridge.client", "zmq", "msgpack"):
        assert Path(modules[name]).is_relative_to(folder), (name, modules[name])
    assert Path(modules["numpy"]).is_relative_to(touchdesigner)
    assert not any(file and Path(file).is_relative_to(REPO) for file in modules.values())
    assert not (folder / "numpy").exists()
    assert (folder / "bridge" / "client.py").read_text() == (REPO / "bridge" / "client.py").read_text()
    # And it streams: the tiny model's frames on the component's output.
    assert report["streamed"], (report["streaming"], report["log"][-3000:])
    assert report["shown"] == [48, 64, 4] and report["streaming"][2] > 0  # output FPS
