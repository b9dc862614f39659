"""The errors a newcomer meets in the first hour say what went wrong and what to do: an
address without its transport, a CUDA device on a torch without CUDA, a damaged checkpoint,
a failed download, a malformed size. And the command line follows the conventions:
--version, a line of help and the default for every flag.

Each test asserts the message's words, not only the exception's type."""

import argparse
import re
import subprocess
import sys
from importlib import metadata

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file

from bridge.client import EngineClient
from bridge.launcher import EngineProcess
from engine import cli
from engine.models.weights import read_state_dict
from processes import REPO

cuda_built = pytest.mark.skipif(torch.backends.cuda.is_built(), reason="needs a torch built without CUDA")


def engine_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def cli_error(*args: str) -> str:
    """What `python -m engine ARGS` ends with, run in this process."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(list(args))
    return str(stopped.value.code)


# -- addresses ---------------------------------------------------------------------------------

def test_a_client_given_an_address_without_transport_shows_the_fix():
    with pytest.raises(ValueError) as refused:
        EngineClient("127.0.0.1:5555", width=64, height=64)
    assert str(refused.value) == ("address 127.0.0.1:5555 has no transport: ZeroMQ addresses start with tcp:// "
                                  "(or ipc:// for a socket file); write tcp://127.0.0.1:5555")


def test_the_launcher_refuses_an_address_without_transport_before_starting_anything(tmp_path):
    with pytest.raises(ValueError, match="bind 127.0.0.1:5555 has no transport.*write tcp://127.0.0.1:5555"):
        EngineProcess.start(model="tiny", bind="127.0.0.1:5555", log_file=tmp_path / "engine.log")
    assert not (tmp_path / "engine.log").exists()


def test_serve_refuses_a_bind_without_transport_with_the_fix():
    result = engine_command("serve", "--model", "tiny", "--bind", "127.0.0.1:5555")
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: --bind 127.0.0.1:5555 has no transport: ZeroMQ addresses start with "
                                     "tcp:// (or ipc:// for a socket file); write tcp://127.0.0.1:5555")


def test_an_address_of_another_kind_is_refused_with_the_forms_zeromq_takes():
    with pytest.raises(ValueError, match=r"http://127.0.0.1:5555 is not a ZeroMQ address: write tcp://HOST:PORT"):
        EngineClient("http://127.0.0.1:5555", width=64, height=64)


# -- devices -----------------------------------------------------------------------------------

@cuda_built
@pytest.mark.parametrize("command", ["serve", "run"])
def test_a_cuda_device_on_a_torch_without_cuda_says_how_to_get_it(command):
    result = engine_command(command, "--model", "tiny", "--device", "cuda")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert "\n" not in message
    release = torch.__version__.split("+")[0]
    assert message.startswith(f"error: --device cuda: the torch installed here ({torch.__version__}) is built "
                              "without CUDA.")
    assert f"pip install torch=={release} --index-url https://download.pytorch.org/whl/cuXXX" in message
    assert message.endswith("or run on the CPU with --device cpu")


def test_a_gpu_index_that_does_not_exist_names_those_that_do(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError) as refused:
        cli.check_device("cuda:2")
    assert str(refused.value) == ("--device cuda:2: there is no such GPU here; torch finds cuda:0, cuda:1. "
                                  "Give one of those, or --device cpu")
    cli.check_device("cuda:1")


def test_a_cuda_torch_that_finds_no_gpu_points_at_the_driver(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match=r"--device cuda: torch .* finds no GPU here. Check the NVIDIA driver "
                                         r"\(nvidia-smi\) and CUDA_VISIBLE_DEVICES, or run on the CPU"):
        cli.check_device("cuda")


def test_a_device_torch_does_not_know_is_named():
    assert cli_error("run", "--device", "gpu") == "error: --device gpu is not a device torch knows: give cpu, " \
                                                  "cuda or cuda:N"


# -- checkpoints -------------------------------------------------------------------------------

def weights_folder(tmp_path):
    """A --weights folder in the Wan2.1 release's layout; the DiT, read first, is the test's to write."""
    folder = tmp_path / "Wan2.1-T2V-1.3B"
    (folder / "google" / "umt5-xxl").mkdir(parents=True)
    for name in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"):
        torch.save({"weight": torch.zeros(2)}, folder / name)
    return folder


def truncated(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def write_truncated_pt(folder):
    torch.save({"generator": {"model.head.weight": torch.zeros(64, 64)}}, folder / "model.pt")
    truncated(folder / "model.pt")
    return folder / "model.pt"


def write_pt_that_is_not_a_zip(folder):
    (folder / "model.pt").write_bytes(bytes(range(256)) * 8)
    return folder / "model.pt"


def write_truncated_safetensors(folder):
    path = folder / "diffusion_pytorch_model.safetensors"  # the base Wan2.1 DiT, read when there is no model.pt
    save_file({"head.weight": torch.zeros(64, 64)}, str(path))
    truncated(path, 0.9)
    return path


def write_empty_pt(folder):
    (folder / "model.pt").write_bytes(b"")
    return folder / "model.pt"


def write_git_lfs_pointer(folder):
    (folder / "model.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 5\n")
    return folder / "model.pt"


@pytest.mark.parametrize("write, reason", [
    (write_truncated_pt, "the zip directory at its end is missing or damaged, as when the file is cut short"),
    (write_pt_that_is_not_a_zip, "it is neither a zip archive nor a pickle, as torch checkpoints are"),
    (write_truncated_safetensors, r"its header places tensors up to byte \d+, past its end"),
    (write_empty_pt, "it is empty"),
    (write_git_lfs_pointer, "it holds text, not weights: 'version https://git-lfs.github.com/spec/v1'"),
], ids=["truncated .pt", "not a zip", "truncated .safetensors", "empty", "a Git LFS pointer"])
def test_a_damaged_checkpoint_is_named_with_how_to_fetch_it_again(tmp_path, write, reason):
    folder = weights_folder(tmp_path)
    damaged = write(folder)
    message = cli_error("run", "--model", "wan2.1-1.3b", "--weights", str(folder), "--device", "cpu",
                        "--frames", "5", "--size", "64x64")
    size = damaged.stat().st_size
    assert message.startswith(f"error: {damaged} looks corrupt or truncated: ")
    assert re.search(f"{reason} \\({size} bytes\\)", message), message
    assert ("Delete it and fetch it again: `python -m engine download --model NAME` (wan2.1-1.3b or wan2.1-14b) "
            "into the Hugging Face cache") in message
    assert "or a new copy into your --weights folder" in message


def test_a_damaged_file_in_the_hugging_face_cache_names_the_blob_behind_its_link(tmp_path):
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    blob.write_bytes(b"")
    link = tmp_path / "snapshots" / "main" / "model.pt"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    with pytest.raises(ValueError) as refused:
        read_state_dict(link)
    assert f"Delete it and the file it links to, {blob}, and fetch it again" in str(refused.value)


def test_a_legacy_pickle_checkpoint_still_loads(tmp_path):
    torch.save({"weight": torch.ones(3)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(tmp_path / "old.pth")["weight"], torch.ones(3))


# -- downloads ---------------------------------------------------------------------------------

def test_a_failed_download_says_to_check_the_network_not_that_weights_are_missing(monkeypatch):
    def refused_connection(*args, **kwargs):
        # As huggingface_hub reports a Hub it cannot reach: an error about its cache, caused by the connection's
        refused = ConnectionRefusedError(111, "Connection refused")
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub") from refused

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refused_connection)
    message = cli_error("download", "--model", "wan2.1-1.3b")
    assert message.startswith(f"error: could not download the wan2.1-1.3b weights from "
                              f"{huggingface_hub.constants.ENDPOINT} "
                              "(ConnectionRefusedError: [Errno 111] Connection refused)")
    assert "behind a proxy set HTTPS_PROXY, for a mirror set HF_ENDPOINT" in message
    assert "then run `python -m engine download --model wan2.1-1.3b` again" in message
    assert "model.pt (from jerryfeng/StreamDiffusionV2: wan_causal_dmd_v2v/model.pt)" in message
    assert "pass that folder with --weights DIR" in message
    assert "not in the Hugging Face cache" not in message


# -- the command line's conventions --------------------------------------------------------------

def test_version_names_the_package_torch_and_cuda(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--version"])
    assert stopped.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"streamdiffusion-bridge {metadata.version('streamdiffusion-bridge')}"
    assert lines[1].startswith(f"torch {torch.__version__}: ")
    assert "CUDA" in lines[1]


def test_version_falls_back_on_pyproject_when_the_package_is_not_installed(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    declared = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert cli.package_version() == declared


def every_parser(parser: argparse.ArgumentParser, name: str = "python -m engine"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest: choice.help for choice in action._get_subactions()}
            for command, subparser in action.choices.items():
                assert helped.get(command), f"the command {command} has no help"
                yield from every_parser(subparser, f"{name} {command}")


def test_every_flag_of_every_command_has_a_line_of_help():
    for name, parser in every_parser(cli.build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help is not argparse.SUPPRESS, f"{name} {action.option_strings[0]}"


def test_help_shows_the_defaults():
    commands = dict(every_parser(cli.build_parser()))
    run_help = " ".join(commands["python -m engine run"].format_help().split())
    assert "how many frames to stream: of the test pattern, or the video's first (default 65)" in run_help
    assert "--device DEVICE cpu, cuda or cuda:N (default cuda where torch finds a GPU, else cpu)" in run_help
    serve_help = " ".join(commands["python -m engine serve"].format_help().split())
    assert "largest frame a host may send, WIDTHxHEIGHT (default 3840x2160)" in serve_help


@pytest.mark.parametrize("size", ["512,512", "512", "512x", "0x512"])
def test_a_malformed_size_is_refused_with_the_form_it_takes(size):
    assert cli_error("run", "--device", "cpu", "--size", size) == \
        f"error: --size {size} is not a size: write --size WIDTHxHEIGHT in pixels, e.g. --size 512x512"


def test_sizes_are_width_by_height():
    assert cli.parse_size("--size", "512x288") == (512, 288)
    assert cli.model_size("tiny", "512x288") == (288, 512)  # (height, width), the order tensors take
