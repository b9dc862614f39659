"""The hosts' controls for the session parameters are the parameter table's (bridge/params.py).

Walks the table: every parameter of the groups the hosts show has one control in
TouchDesigner's component (built against the fake `td`) and in the OBS script (against
the fake `obspython`), with the table's name, label, bounds, slider, menu, default and
help, and no other control claims to be one. Then no control is dead: each one's value
reaches an engine under its protocol name (a real tiny engine for TouchDesigner, the
fake engine for OBS). The hosts take the model the engine serves, and TouchDesigner's
Spout transport opens a Spout session between the senders its parameters name.
"""

import math
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

import fake_obspython as obs

sys.modules["obspython"] = obs  # before the OBS script is imported
REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "obs_scripts"))

import fake_td  # noqa: E402
import streamdiffusion  # noqa: E402 - the OBS script
from bridge import background, controls, launcher  # noqa: E402
from bridge import params as table  # noqa: E402
from bridge.client import EngineClient  # noqa: E402
from bridge.zmq_io import RemoteError  # noqa: E402
from engine.config import PRESETS  # noqa: E402
from fake_engine_client import ENGINES, FakeEngine, FakeEngineClient  # noqa: E402
from fake_spoutgl import FakeSpoutMachine  # noqa: E402
from processes import PATIENCE_S, ServedEngine  # noqa: E402
from streamdiffusion_obs import libobs  # noqa: E402
from td_harness import build_component, pattern, source_top  # noqa: E402
from test_engine_video_paths import rgba, spout_environment  # noqa: E402
from tiny_loras import random_factors, write_lora  # noqa: E402

pytestmark = pytest.mark.timeout(240)

HOST_PARAMS = controls.host_params()
SPOUT_PARAMS = table.in_group("Spout")
TD_HOST_PAGES = {"Engine", "Transport", "Status"}  # TouchDesigner's own pages
TD_TRANSPORT_OWN = {"Transport", "Outputsize", "Resolution1", "Resolution2"}  # the Transport page's own controls
TD_STYLES = {"bool": "Toggle", "int": "Int", "float": "Float", "str": "Str", "prompts": "DAT", "loras": "DAT"}
PAIRS = {"prompts": [["ink on paper", 0.7], ["charcoal", 0.3]],
         "loras": [["ink", 0.5]]}  # a LoRA the tiny engine's folder holds (tiny_engine)
OBS_ADDRESS = "tcp://127.0.0.1:5998"


def td_name(param) -> str:
    """TouchDesigner's rule for custom parameter names: a capital letter, then lower case and digits."""
    return param.name.replace("_", "").capitalize()


def another_value(param):
    """A valid value of param other than its default, in its slider's range."""
    if param.kind == "bool":
        return not param.default
    if param.choices:
        return next(choice for choice in param.choices if choice != param.default)
    if param.kind in ("int", "float"):
        low, high = param.slider_range
        return low if param.default != low else high
    if param.kind in table.PAIR_KINDS:
        return PAIRS[param.kind]
    return "ink on paper"


def wait_until(condition, timeout_s: float = PATIENCE_S, each=lambda: time.sleep(0.01)) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        each()


def run_td_frames_until(condition) -> None:
    wait_until(condition, each=lambda: (fake_td.run_frame(), time.sleep(1 / 60)))


def test_the_models_hosts_offer_are_the_engines_presets_and_the_default_is_one():
    assert set(controls.MODELS) == set(PRESETS) and table.DEFAULT_MODEL in controls.MODELS


def test_the_controls_load_with_the_standard_library_alone():
    # As OBS's script imports them: before the Python environment with the bridge's packages is found.
    code = ("import sys; import bridge.controls; "
            "print(*sorted({name.split('.')[0] for name in sys.modules} - set(sys.stdlib_module_names)))")
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert [name for name in result.stdout.split() if not name.startswith("_")] == ["bridge"]


# ---------------------------------------------------------------------------- TouchDesigner


@pytest.fixture
def td():
    fake_td.install()
    yield
    fake_td.quit_project()
    sys.modules.pop("td", None)


@pytest.fixture
def component(td, tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "log_folder", lambda: tmp_path / "logs")
    return build_component(tmp_path / "StreamDiffusion.tox")


@pytest.mark.parametrize("param", HOST_PARAMS + SPOUT_PARAMS, ids=lambda param: param.name)
def test_each_touchdesigner_control_is_its_table_entry(component, param):
    par = component.par[td_name(param)]
    assert par is not None, f"no control {td_name(param)} for {param.name}"
    assert par.page.name == ("Transport" if param.group == "Spout" else param.group)
    assert par.label == param.label
    assert par.style == ("Menu" if param.choices else TD_STYLES[param.kind])
    assert par.help == controls.help_text(param)
    if param.unit:
        assert par.help.endswith(f" In {param.unit}.")
    if param.choices:
        assert par.menuNames == list(param.choices)
    if param.kind in table.PAIR_KINDS:  # a table DAT of rows (text, number); the component's own is empty
        assert param.default == () and par.eval() is component.op(param.name)
        assert component.op(param.name).rows()[1:] == []
    else:
        assert par.default == param.default and par.eval() == param.default
    if param.kind in ("int", "float"):
        assert (par.min, par.max, par.clampMin, par.clampMax) == (param.minimum, param.maximum, True, True)
        assert (par.normMin, par.normMax) == param.slider_range
        par.val = param.maximum + 1
        assert par.eval() == param.maximum
        par.val = param.minimum - 1
        assert par.eval() == param.minimum


def test_touchdesigner_shows_no_control_the_table_lacks(component):
    pages = {page.name: {par.name for par in page.pars} for page in component.customPages}
    for group in controls.HOST_GROUPS:
        assert pages[group] == {td_name(param) for param in table.in_group(group)}, group
    assert pages["Transport"] - TD_TRANSPORT_OWN == {td_name(param) for param in SPOUT_PARAMS}
    assert set(pages) == set(controls.HOST_GROUPS) | TD_HOST_PAGES
    model = component.par.Model
    assert model.menuNames == list(controls.MODELS) and model.eval() == table.DEFAULT_MODEL


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    loras = tmp_path_factory.mktemp("loras")
    write_lora(loras / "ink.safetensors", random_factors())
    engine = ServedEngine(tmp_path_factory.mktemp("engine"), "--session-timeout", "5", "--lora-dir", str(loras))
    yield engine
    assert engine.stop() == 0, engine.log()


def test_every_touchdesigner_control_reaches_the_engine_by_its_protocol_name(component, tiny_engine):
    component.inputConnectors[0].connect(source_top(pattern()))
    par = component.par
    par.Mode, par.Address = "attach", tiny_engine.address
    chosen = {param.name: another_value(param) for param in HOST_PARAMS}
    for param in HOST_PARAMS:
        if param.kind in table.PAIR_KINDS:
            for row in chosen[param.name]:
                component.op(param.name).appendRow(row)
        else:
            par[td_name(param)].val = chosen[param.name]
    par.Start.pulse()
    run_td_frames_until(lambda: component.EngineParams)
    assert {name: component.EngineParams[name] for name in chosen} == chosen

    # Changed while streaming, each goes on its own (a table of pairs: when its rows change).
    for param in HOST_PARAMS:
        if param.kind not in table.PAIR_KINDS:
            par[td_name(param)].val = param.default
    component.op("prompts").appendRow(["pencil", "1"])
    component.op("loras").appendRow(["ink", "-1"])
    defaults = {**table.defaults(), "prompts": [*PAIRS["prompts"], ["pencil", 1.0]],
                "loras": [*PAIRS["loras"], ["ink", -1.0]]}
    run_td_frames_until(lambda: all(component.EngineParams.get(param.name) == defaults[param.name]
                                    for param in HOST_PARAMS))


def test_attached_touchdesigner_takes_the_model_the_engine_serves(component, tiny_engine):
    component.inputConnectors[0].connect(source_top(pattern()))
    par = component.par
    assert par.Model.eval() != "tiny"  # the engine serves tiny; the component's Model says otherwise
    par.Mode, par.Address = "attach", tiny_engine.address
    par.Start.pulse()
    run_td_frames_until(lambda: par.Enginestate.eval() == "streaming")
    assert par.Enginemodel.eval() == "tiny"
    # A host that asks for another model by name is told which one this engine serves, and the fix.
    with pytest.raises(RemoteError) as refused:
        EngineClient(tiny_engine.address, width=32, height=32, model=table.DEFAULT_MODEL, timeout_s=PATIENCE_S).open()
    assert refused.value.code == "model_unavailable"
    assert "this engine serves 'tiny'" in refused.value.message
    assert f"python -m engine serve --model {table.DEFAULT_MODEL}" in refused.value.message


def test_touchdesigners_spout_transport_opens_a_spout_session_between_the_named_senders(component, tmp_path):
    spout = FakeSpoutMachine(tmp_path / "spout")
    engine = ServedEngine(tmp_path, env=spout_environment(spout))
    par = component.par
    try:
        component.inputConnectors[0].connect(source_top(pattern()))
        par.Mode, par.Address, par.Transport = "attach", engine.address, "spout"
        par.Spoutinput, par.Spoutoutput = "camera", "stylised"
        par.Resolution1, par.Resolution2 = 48, 40
        par.Start.pulse()
        run_td_frames_until(lambda: component.EngineParams.get("spout_output") == "stylised")
        assert component.EngineParams["spout_input"] == "camera"

        frame = rgba(np.full((40, 48, 3), 90, np.uint8))

        def draw_and_run_a_frame():
            spout.publish("camera", frame)
            fake_td.run_frame()
            time.sleep(0.03)

        wait_until(lambda: spout.senders.get("stylised") is not None and spout.senders["stylised"].frame_count >= 4,
                   each=draw_and_run_a_frame)
        published = spout.senders["stylised"]
        assert (published.width, published.height) == (48, 40)
        # The user's Spout TOPs carry the pixels: the component sent none, and its output shows its input.
        status = component.ext.StreamDiffusionExt._client.status()
        assert status.frames_sent == status.dropped.replaced == status.dropped.not_sent == 0
        assert component.op("stream").copied.dtype == np.float32
        assert par.Enginestate.eval() not in ("error", "refused")
    finally:
        par.Stop.pulse()
        assert engine.stop() == 0, engine.log()


def test_the_component_loads_without_the_bridge_and_takes_it_from_bridge_path(tmp_path):
    # A fresh interpreter whose packages are on the path without their .pth files, so that the
    # bridge (installed editable) is importable only from the repository, as in TouchDesigner.
    code = f"""
import sys
sys.path += [{sysconfig.get_paths()["purelib"]!r}, {str(TESTS)!r}]
import fake_td
from td_harness import build_component
fake_td.install()
component = build_component({str(tmp_path / "c.tox")!r})  # build_tox.py puts the repository on the path

# TouchDesigner opened again: the component as saved, the repository not on the path.
sys.path.remove({str(REPO)!r})
for name in [name for name in sys.modules if name.split(".")[0] == "bridge"]:
    del sys.modules[name]
fake_td.reopen_project()
fake_td.run_frame()
print(component.par.Enginestate.eval(), "|", component.par.Message.eval())
component.par.Bridgepath = {str(REPO)!r}
fake_td.run_frame()
print(component.par.Enginestate.eval(), "|", component.par.Message.eval())
"""
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    without, with_bridge = result.stdout.splitlines()
    assert without.startswith("error | cannot load the bridge (No module named 'bridge')")
    assert "set Bridge Path" in without
    assert with_bridge == "stopped | the bridge is loaded: press Start"


# ------------------------------------------------------------------------------------- OBS


@pytest.fixture
def obs_script(monkeypatch):
    """The OBS script's world, as tests/test_obs_script.py sets it up: a fake OBS and fake engines."""
    obs.reset()
    ENGINES.clear()
    monkeypatch.setattr(background, "EngineClient", FakeEngineClient)
    monkeypatch.setattr(background, "DEBOUNCE_S", 0.05)
    monkeypatch.setattr(libobs, "load", obs.FakeLibObs)
    monkeypatch.setattr(streamdiffusion.environment, "activate", lambda env, repo_root: None)
    yield
    if streamdiffusion._script is not None:
        obs.unload_script(streamdiffusion)
    ENGINES.clear()


def obs_value(param, value):
    """A value as the OBS script keeps it: a list of pairs as lines of text, number."""
    return "\n".join(f"{text}, {number}" for text, number in value) if param.kind in table.PAIR_KINDS else value


@pytest.mark.parametrize("param", HOST_PARAMS, ids=lambda param: param.name)
def test_each_obs_property_is_its_table_entry(obs_script, param):
    props = streamdiffusion.script_properties().all()
    prop = props[param.name]
    restarts = " (restarts the stream)" if param.applies == table.RELOAD else ""
    assert prop.description == param.label + restarts
    in_obs = streamdiffusion.pairs_format(param) if param.kind in table.PAIR_KINDS else ""
    assert prop.long_description == controls.help_text(param) + in_obs
    if param.choices:
        assert prop.kind == "list" and prop.items == [[label, value, False] for value, label in controls.menu(param)]
        assert prop.item_values() == list(param.choices)
    elif param.kind in ("int", "float"):
        # The table's bounds, never more: a slider, or a spin box where they are too wide for one.
        minimum, maximum, step = prop.bounds
        assert prop.kind == param.kind and (minimum, maximum) == (param.minimum, param.maximum)
        assert prop.slider == (param.slider is None)
        low, high = param.slider_range
        assert step == 1 if param.kind == "int" else 0 < step <= (high - low) / 10
        if prop.slider:  # a slider stops at the minimum plus whole steps: the default is one of them
            assert math.isclose((param.default - minimum) / step, round((param.default - minimum) / step))
    else:
        assert prop.kind == {"bool": "bool", "str": "text", "prompts": "text", "loras": "text"}[param.kind]

    settings = obs.settings()
    streamdiffusion.script_defaults(settings)
    assert settings.defaults[param.name] == obs_value(param, param.default)


def test_obs_shows_no_property_the_table_lacks(obs_script):
    props = streamdiffusion.script_properties()
    for group in controls.HOST_GROUPS:
        shown = props.by_name[f"{group.lower()}_group"].group.by_name
        assert list(shown) == [param.name for param in table.in_group(group)], group
    claimed = {name for name in props.all() if name in table.PARAMS}
    assert claimed == {param.name for param in HOST_PARAMS}
    model = props.all()["model"]
    assert model.item_values() == list(controls.MODELS)
    settings = obs.settings()
    streamdiffusion.script_defaults(settings)
    assert settings.defaults["model"] == table.DEFAULT_MODEL


def load_obs_script(**values) -> obs.Data:
    settings = obs.settings({"address": OBS_ADDRESS} | values)
    obs.load_script(streamdiffusion, settings)
    return settings


def test_every_obs_property_reaches_the_engine_by_its_protocol_name(obs_script):
    engine = FakeEngine(OBS_ADDRESS)
    chosen = {param.name: another_value(param) for param in HOST_PARAMS}
    settings = load_obs_script(**{param.name: obs_value(param, chosen[param.name]) for param in HOST_PARAMS})
    engine.wait_for(lambda e: e.hellos)
    assert {name: engine.hellos[0]["params"][name] for name in chosen} == chosen

    obs.update_script(streamdiffusion, settings, **{param.name: obs_value(param, param.default)
                                                    for param in HOST_PARAMS})
    engine.wait_for(lambda e: e.params_received)
    assert engine.params_received == [{param.name: [] if param.kind in table.PAIR_KINDS else param.default
                                       for param in HOST_PARAMS}]


def test_a_wrong_weighted_prompts_line_is_said_and_the_prompts_before_stay(obs_script):
    engine = FakeEngine(OBS_ADDRESS)
    settings = load_obs_script(prompts="ink on paper, 0.7\ncharcoal")  # no weight: 1
    engine.wait_for(lambda e: e.hellos)
    assert engine.hellos[0]["params"]["prompts"] == [["ink on paper", 0.7], ["charcoal", 1.0]]

    obs.update_script(streamdiffusion, settings, prompts="ink on paper, lots", strength=0.5)
    engine.wait_for(lambda e: e.params_received)
    assert engine.params_received == [{"strength": 0.5}]
    assert streamdiffusion._script.status_rows()["Set-up"] == (
        "Weighted Prompts: the weight 'lots' of 'ink on paper' is not a number; the prompts sent before stay")


def test_obs_takes_the_model_the_engine_serves(obs_script):
    engine = FakeEngine(OBS_ADDRESS, model="wan2.1-14b")
    load_obs_script(model="tiny")  # the model a local engine would start with
    wait_until(lambda: streamdiffusion._script.status_rows()["Model"] == "wan2.1-14b")
    assert engine.hellos[0]["model"] == "default" and engine.sessions_opened == 1
