"""dev.py, the set-up and commands entry point, on Windows, macOS and Linux with the platform
faked: which venv Python, which torch build and why, the stamp, the messages. Nothing is
installed: the steps that would install are recorded instead."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
dev = importlib.util.module_from_spec(_spec)
sys.modules["dev"] = dev  # dataclasses look their module up there
_spec.loader.exec_module(dev)

PLAIN_TORCH = [f"torch=={dev.TORCH_VERSION}"]
GPU_LINE = "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-1234)"


@pytest.fixture
def on(monkeypatch):
    """on("win32") or on("darwin", "arm64"): the platform dev.py sees."""
    def fake(platform: str, machine: str = "x86_64") -> None:
        monkeypatch.setattr(sys, "platform", platform)
        monkeypatch.setattr(dev.platform, "machine", lambda: machine)
    return fake


@pytest.mark.parametrize("platform, parts", [("win32", ("Scripts", "python.exe")), ("linux", ("bin", "python")),
                                             ("darwin", ("bin", "python"))])
def test_the_venv_python_is_where_the_platform_puts_it(on, platform, parts):
    on(platform)
    assert dev.venv_python(Path(".venv")).parts[-2:] == parts


# -- which torch ----------------------------------------------------------------------------

def test_linux_with_an_nvidia_driver_installs_the_index_default_which_is_the_cuda_build(on):
    on("linux")
    choice = dev.choose_torch(GPU_LINE)
    assert (choice.build, choice.pip_args) == ("CUDA", PLAIN_TORCH)
    assert GPU_LINE in choice.reason and "default torch is the CUDA build" in choice.reason


def test_linux_without_one_installs_the_same_plain_pin_and_says_it_runs_on_the_cpu(on):
    on("linux")
    choice = dev.choose_torch(None)
    assert (choice.build, choice.pip_args) == ("CPU", PLAIN_TORCH)
    assert "no NVIDIA driver" in choice.reason and "CPU" in choice.reason


def test_windows_with_an_nvidia_driver_takes_the_cuda_build_from_pytorchs_index(on):
    on("win32")
    choice = dev.choose_torch(GPU_LINE)
    assert choice.build == "CUDA"
    assert choice.pip_args == [*PLAIN_TORCH, "--index-url", dev.TORCH_CUDA_INDEX]
    assert dev.TORCH_CUDA_INDEX.startswith("https://download.pytorch.org/whl/cu")
    assert "PyPI's Windows torch is CPU-only" in choice.reason and dev.TORCH_CUDA_INDEX in choice.reason


def test_windows_without_one_takes_pypis_cpu_build(on):
    on("win32")
    choice = dev.choose_torch(None)
    assert (choice.build, choice.pip_args) == ("CPU", PLAIN_TORCH)
    assert "CPU-only" in choice.reason


def test_apple_silicon_takes_pypis_build_with_mps(on):
    on("darwin", "arm64")
    choice = dev.choose_torch(None)
    assert (choice.build, choice.pip_args) == ("macOS (MPS)", PLAIN_TORCH)
    assert "Apple silicon" in choice.reason


def test_an_intel_mac_is_told_that_torch_has_no_build_for_it(on):
    on("darwin", "x86_64")
    with pytest.raises(SystemExit, match="no builds for Intel Macs.*Rosetta"):
        dev.choose_torch(None)


# -- finding an NVIDIA driver ----------------------------------------------------------------

@pytest.fixture
def nvidia_smi(monkeypatch):
    """Fake nvidia-smi at the paths given, answering with ``answer`` (exit code, output); returns
    the commands run."""
    ran = []

    def install(paths: list[str], on_path: str | None = None, answer=(0, GPU_LINE + "\n")):
        monkeypatch.setattr(dev.shutil, "which", lambda name: on_path)
        monkeypatch.setattr(dev.os.path, "isfile", lambda path: path in paths)

        def run(command, **kwargs):
            ran.append(command)
            return subprocess.CompletedProcess(command, answer[0], stdout=answer[1], stderr="")
        monkeypatch.setattr(dev.subprocess, "run", run)
        return ran
    return install


def test_linux_finds_the_gpu_through_nvidia_smi_on_path(on, nvidia_smi):
    on("linux")
    ran = nvidia_smi(["/usr/bin/nvidia-smi"], on_path="/usr/bin/nvidia-smi")
    assert dev.find_nvidia_gpu() == GPU_LINE
    assert ran == [["/usr/bin/nvidia-smi", "-L"]]


def test_no_nvidia_smi_or_one_whose_driver_does_not_answer_means_no_gpu(on, nvidia_smi):
    on("linux")
    assert nvidia_smi([]) is not None and dev.find_nvidia_gpu() is None
    nvidia_smi(["/usr/bin/nvidia-smi"], on_path="/usr/bin/nvidia-smi",
               answer=(9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver"))
    assert dev.find_nvidia_gpu() is None


def test_windows_finds_nvidia_smi_in_system32_when_it_is_not_on_path(on, nvidia_smi, monkeypatch):
    on("win32")
    monkeypatch.setenv("SystemRoot", r"C:\Windows")
    ran = nvidia_smi([r"C:\Windows\System32\nvidia-smi.exe"])
    assert dev.find_nvidia_gpu() == GPU_LINE
    assert ran == [[r"C:\Windows\System32\nvidia-smi.exe", "-L"]]


def test_windows_also_looks_where_older_drivers_put_it(on, monkeypatch):
    on("win32")
    monkeypatch.setattr(dev.shutil, "which", lambda name: None)
    monkeypatch.setenv("ProgramFiles", r"C:\Program Files")
    assert r"C:\Program Files\NVIDIA Corporation\NVSMI\nvidia-smi.exe" in dev.nvidia_smi_candidates()


def test_macos_does_not_look_for_cuda(on, nvidia_smi):
    on("darwin", "arm64")
    ran = nvidia_smi(["/usr/local/bin/nvidia-smi"], on_path="/usr/local/bin/nvidia-smi")
    assert dev.find_nvidia_gpu() is None and ran == []


# -- the stamp and the set-up ----------------------------------------------------------------

def test_the_stamp_is_current_until_pyproject_or_the_extras_change(tmp_path, monkeypatch):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\n')
    venv = tmp_path / ".venv"
    venv.mkdir()
    assert not dev.stamp_is_current(venv, dev.install_fingerprint(pyproject))
    dev.write_stamp(venv, dev.install_fingerprint(pyproject))
    assert dev.stamp_is_current(venv, dev.install_fingerprint(pyproject))
    monkeypatch.setattr(dev, "EXTRAS", dev.EXTRAS + ",spout")
    assert not dev.stamp_is_current(venv, dev.install_fingerprint(pyproject))
    monkeypatch.undo()
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["numpy"]\n')
    assert not dev.stamp_is_current(venv, dev.install_fingerprint(pyproject))


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A checkout in tmp_path whose .venv exists; returns the commands set-up runs, recorded, not run."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    monkeypatch.setattr(dev, "ROOT", tmp_path)
    monkeypatch.setattr(dev, "VENV", tmp_path / ".venv")
    steps = []

    def record(what, command, hint=""):
        steps.append(command)
        if command[1:3] == ["-m", "venv"]:  # as venv would, make the venv's Python
            python = dev.venv_python(dev.VENV)
            python.parent.mkdir(parents=True)
            python.touch()
    monkeypatch.setattr(dev, "run_step", record)
    return steps


def test_set_up_on_windows_with_a_gpu_installs_cuda_torch_then_the_project_once(on, checkout, monkeypatch, capsys):
    on("win32")
    python = dev.venv_python(dev.VENV)
    python.parent.mkdir(parents=True)
    python.touch()
    monkeypatch.setattr(dev, "installed_torch", lambda python: None)
    monkeypatch.setattr(dev, "find_nvidia_gpu", lambda: GPU_LINE)
    monkeypatch.setattr(dev.subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(
        command, 0, stdout="2.13.0+cu128 True\n", stderr=""))  # the installed torch, asked what it is

    assert dev.setup() == python
    assert checkout == [[str(python), "-m", "pip", "install", *PLAIN_TORCH, "--index-url", dev.TORCH_CUDA_INDEX],
                        [str(python), "-m", "pip", "install", "--quiet", "-e", f".[{dev.EXTRAS}]"]]
    said = capsys.readouterr().out
    assert f"torch {dev.TORCH_VERSION}, the CUDA build: NVIDIA driver found ({GPU_LINE})" in said
    assert "torch 2.13.0+cu128 is installed and sees a CUDA GPU" in said

    monkeypatch.setattr(dev, "installed_torch", lambda python: "2.13.0+cu128")
    checkout.clear()
    dev.setup()
    assert checkout == []
    assert "is set up (torch 2.13.0+cu128; pyproject.toml unchanged" in capsys.readouterr().out


def test_set_up_keeps_a_torch_already_there_and_says_so(on, checkout, monkeypatch, capsys):
    on("linux")
    python = dev.venv_python(dev.VENV)
    python.parent.mkdir(parents=True)
    python.touch()
    monkeypatch.setattr(dev, "installed_torch", lambda python: "2.13.0+cpu")
    monkeypatch.setattr(dev, "find_nvidia_gpu", lambda: pytest.fail("no need to look for a GPU"))
    dev.setup()
    assert checkout == [[str(python), "-m", "pip", "install", "--quiet", "-e", f".[{dev.EXTRAS}]"]]
    assert "torch 2.13.0+cpu is already in .venv; kept" in capsys.readouterr().out


def test_a_fresh_checkout_gets_a_venv_made_by_this_python(on, checkout, monkeypatch):
    on("linux")
    monkeypatch.setattr(dev, "installed_torch", lambda python: "2.13.0+cpu")
    dev.setup()
    assert checkout[0] == [sys.executable, "-m", "venv", "--clear", str(dev.VENV)]
    assert checkout[1][-2:] == ["--upgrade", "pip"]


# -- messages ---------------------------------------------------------------------------------

def test_too_old_a_python_is_told_what_is_needed():
    with pytest.raises(SystemExit, match=r"Python 3\.9 .* needs 3\.10 or newer"):
        dev.check_python((3, 9, 18))
    dev.check_python((3, 10, 0))


def test_debian_without_python3_venv_is_told_to_install_it(on, monkeypatch):
    on("linux")
    monkeypatch.setattr(dev.importlib.util, "find_spec", lambda name: None if name == "ensurepip" else object())
    with pytest.raises(SystemExit, match="lacks the ensurepip module .*apt install python3-venv"):
        dev.check_venv_module()


def test_a_failed_step_stops_with_its_name_and_what_to_do(monkeypatch, capsys):
    monkeypatch.setattr(dev.subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 1))
    with pytest.raises(SystemExit, match=r"installing torch failed \(exit code 1\); check the network"):
        dev.run_step("installing torch", ["pip"], hint="check the network")
    assert "dev.py: installing torch ..." in capsys.readouterr().out


# -- commands ---------------------------------------------------------------------------------

def test_test_commands_forward_their_arguments_to_pytest(monkeypatch):
    monkeypatch.setattr(dev, "setup", lambda: Path("venv-python"))
    ran = []
    monkeypatch.setattr(dev.subprocess, "run", lambda command, **kwargs: ran.append(command)
                        or subprocess.CompletedProcess(command, 0))
    assert dev.main(["test-quick", "-x", "-q", "tests/test_dev.py"]) == 0
    assert dev.main(["demo", "--download"]) == 0
    assert ran == [["venv-python", "-m", "pytest", "-m", "not slow", "-x", "-q", "tests/test_dev.py"],
                   ["venv-python", "-m", "engine", "demo", "--download"]]


def test_unknown_commands_and_stray_arguments_are_refused(capsys):
    assert dev.main(["deploy"]) == 2
    assert dev.main(["setup", "--force"]) == 2
    assert "setup takes no arguments" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_the_makefile_calls_dev_py_and_passes_pytest_args_as_ci_does():
    dry_run = subprocess.run(["make", "-n", "-C", str(ROOT), "test", "PYTEST_ARGS=-p no:cacheprovider"],
                             capture_output=True, text=True, check=True).stdout
    assert "python3 dev.py test -p no:cacheprovider" in dry_run
