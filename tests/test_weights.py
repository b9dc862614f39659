"""DiT checkpoints in the published layouts; the published key names and shapes."""

import json
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from engine.config import get_preset
from engine.models.dit import CausalWanDiT
from engine.models.weights import CheckpointMismatch, WeightsNotFound, load_dit, locate_weights


def published_dit_shapes(dim, ffn_dim, layers, text_dim=4096, freq_dim=256, in_dim=16, out_dim=16):
    """Key -> shape of a Wan2.1 DiT as the fact sheet lists them (reference §1, §7)."""
    shapes = {
        "patch_embedding.weight": (dim, in_dim, 1, 2, 2), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (out_dim * 4, dim), "head.head.bias": (out_dim * 4,),
        "head.modulation": (1, 2, dim),
    }
    for n in range(layers):
        block = f"blocks.{n}."
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"{block}{attn}.{proj}.weight"] = (dim, dim)
                shapes[f"{block}{attn}.{proj}.bias"] = (dim,)
            shapes[f"{block}{attn}.norm_q.weight"] = (dim,)
            shapes[f"{block}{attn}.norm_k.weight"] = (dim,)
        shapes[f"{block}norm3.weight"] = shapes[f"{block}norm3.bias"] = (dim,)
        shapes[f"{block}ffn.0.weight"], shapes[f"{block}ffn.0.bias"] = (ffn_dim, dim), (ffn_dim,)
        shapes[f"{block}ffn.2.weight"], shapes[f"{block}ffn.2.bias"] = (dim, ffn_dim), (dim,)
        shapes[f"{block}modulation"] = (1, 6, dim)
    return shapes


@pytest.mark.parametrize("preset, dim, ffn_dim, layers", [
    ("wan2.1-1.3b", 1536, 8960, 30), ("wan2.1-14b", 5120, 13824, 40)])
def test_presets_have_the_published_keys_and_shapes(preset, dim, ffn_dim, layers):
    with torch.device("meta"):
        model = CausalWanDiT(get_preset(preset))
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert actual == published_dit_shapes(dim, ffn_dim, layers)
    if preset == "wan2.1-1.3b":
        assert sum(p.numel() for p in model.parameters()) == 1_418_996_800


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = CausalWanDiT(get_preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def outputs(model):
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 16, 2, 4, 4, generator=g)
    with torch.no_grad():
        return model(latents, torch.tensor([[700, 500]]), torch.randn(1, 5, 32, generator=g))


def write_layout(layout: str, state: dict, folder):
    if layout == "safetensors":
        path = folder / "diffusion_pytorch_model.safetensors"
        save_file(state, str(path))
        return path
    if layout == "sharded":
        keys = sorted(state)
        shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        weight_map = {}
        for shard, shard_keys in shards.items():
            save_file({k: state[k] for k in shard_keys}, str(folder / shard))
            weight_map.update({k: shard for k in shard_keys})
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
        (folder / "config.json").write_text(json.dumps({"dim": 64, "num_layers": 2, "model_type": "t2v"}))
        return folder
    # StreamDiffusionV2 model.pt: under a generator key with the wrapper's "model." prefix, or raw
    prefixed = {f"model.{k}": v for k, v in state.items()}
    payload = {"raw": state, "raw_prefixed": prefixed}.get(layout, {layout: prefixed})
    path = folder / "model.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("layout", ["generator", "generator_ema", "state_dict", "raw", "raw_prefixed",
                                    "safetensors", "sharded"])
def test_a_tiny_checkpoint_round_trips_in_each_published_layout(tiny, tmp_path, layout):
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    path = write_layout(layout, state, tmp_path)
    loaded = load_dit(path, get_preset("tiny")).eval()
    torch.testing.assert_close(outputs(loaded), outputs(tiny))


def test_a_broken_checkpoint_says_what_does_not_fit(tiny, tmp_path):
    state = dict(tiny.state_dict())
    del state["blocks.1.ffn.2.bias"]
    state["blocks.1.extra.weight"] = torch.zeros(3)
    state["head.modulation"] = torch.zeros(1, 3, 64)
    torch.save({"generator": state}, tmp_path / "model.pt")
    with pytest.raises(CheckpointMismatch) as error:
        load_dit(tmp_path / "model.pt", get_preset("tiny"))
    message = str(error.value)
    assert "1 missing keys: blocks.1.ffn.2.bias" in message
    assert "1 unexpected keys: blocks.1.extra.weight" in message
    assert re.search(r"shape of head\.modulation: model wants \[1, 2, 64\], checkpoint has \[1, 3, 64\]", message)


def test_a_checkpoint_of_another_size_fails_readably(tiny, tmp_path):
    torch.save(tiny.state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointMismatch, match="missing keys: blocks.2"):
        load_dit(tmp_path / "model.pt", replace(get_preset("tiny"), num_layers=3))


def test_a_folder_for_another_preset_is_refused_before_loading(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dim": 5120, "num_layers": 40}))
    with pytest.raises(ValueError, match="dim: folder has 5120, preset 'wan2.1-1.3b' has 1536"):
        load_dit(tmp_path, get_preset("wan2.1-1.3b"))


def test_a_missing_file_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_dit(tmp_path / "model.pt", get_preset("tiny"))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        load_dit(tmp_path, get_preset("tiny"))


def published_folder(root, with_model=True, with_taehv=False):
    folder = root / "Wan2.1-T2V-1.3B"
    (folder / "google" / "umt5-xxl").mkdir(parents=True)
    for name in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "config.json"):
        (folder / name).write_bytes(b"")
    if with_model:
        (root / "wan_causal_dmd_v2v").mkdir()
        (root / "wan_causal_dmd_v2v" / "model.pt").write_bytes(b"")
    if with_taehv:
        (root / "taew2_1.pth").write_bytes(b"")
    return folder


def test_a_folder_in_the_published_layout_is_found(tmp_path):
    folder = published_folder(tmp_path, with_taehv=True)
    files = locate_weights("wan2.1-1.3b", folder, taehv=True)
    assert files.dit == tmp_path / "wan_causal_dmd_v2v" / "model.pt"
    assert files.vae == folder / "Wan2.1_VAE.pth" and files.text_encoder == folder
    assert files.taehv == tmp_path / "taew2_1.pth"


def test_an_incomplete_folder_says_which_files_to_place_where(tmp_path):
    folder = published_folder(tmp_path, with_model=False)
    (folder / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(WeightsNotFound) as error:
        locate_weights("wan2.1-1.3b", folder)
    message = str(error.value)
    assert "the DiT (StreamDiffusionV2 model.pt)" in message and "the VAE" in message
    assert "jerryfeng/StreamDiffusionV2: wan_causal_dmd_v2v/model.pt" in message
    assert "python -m engine download --model wan2.1-1.3b" in message


def test_without_network_or_cache_the_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsNotFound, match="not in the Hugging Face cache(.|\n)*--weights"):
        locate_weights("wan2.1-14b")


def test_the_cli_reports_missing_weights_instead_of_a_traceback(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "engine", "run", "--model", "wan2.1-1.3b",
                             "--weights", str(tmp_path), "--frames", "5"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "lacks files of wan2.1-1.3b" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- encoder / decoder choice, cache presets

def stream_counts(models, frames: int = 5 + 4 * 8, steps: int = 2, **settings) -> tuple[list[int], list]:
    import numpy as np

    from engine.pipeline import StreamPipeline, StreamSettings

    pipe = StreamPipeline(models.dit, models.vae, models.text_encoder,
                          StreamSettings(height=32, width=48, steps=steps, prompt="x", **settings),
                          decoder=models.decoder)
    video = np.random.default_rng(0).integers(0, 256, (frames, 40, 60, 3), dtype=np.uint8)
    chunks = [video[:5]] + [video[i:i + 4] for i in range(5, frames, 4)]
    outputs = [pipe.push(chunk) for chunk in chunks]
    return [len(o) for o in outputs], outputs


@pytest.mark.parametrize("encoder,decoder", [("wan", "wan"), ("wan", "taehv"), ("taehv", "wan"), ("taehv", "taehv")])
def test_each_encoder_and_decoder_pair_streams(encoder, decoder):
    from engine.models.taehv import TAEHV
    from engine.models.vae import WanVAE
    from engine.models.weights import build_models

    models = build_models("tiny", encoder=encoder, decoder=decoder)
    kinds = {"wan": WanVAE, "taehv": TAEHV}
    assert isinstance(models.vae, kinds[encoder]) and models.autoencoders == (encoder, decoder)
    if encoder == decoder:
        assert models.decoder is None  # the encoder decodes, with one stream state
    else:
        assert isinstance(models.decoder, kinds[decoder])
    counts, outputs = stream_counts(models)
    assert counts == [5, 0] + [4] * 7
    assert all(o.dtype.name == "uint8" and o.shape[1:] == (40, 60, 3) for o in outputs if len(o))


def test_the_choice_keeps_the_other_models_and_the_old_taehv_flag():
    from engine.models.weights import build_models

    base = build_models("tiny")
    both = build_models("tiny", encoder="taehv", decoder="taehv")
    old = build_models("tiny", taehv=True)
    fast = build_models("tiny", decoder="taehv")
    for a, b in [(base.dit, both.dit), (base.vae, fast.vae), (old.decoder, both.vae), (old.decoder, fast.decoder)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert old.autoencoders == fast.autoencoders == ("wan", "taehv")
    assert base.decoder is None and base.autoencoders == ("wan", "wan")


@pytest.mark.parametrize("kwargs,problem", [
    (dict(encoder="vae"), "encoder"), (dict(decoder="tiny"), "decoder"),
    (dict(taehv=True, decoder="wan"), "taehv"), (dict(cache="faster"), "cache preset"),
])
def test_a_bad_choice_is_refused_by_name(kwargs, problem):
    from engine.models.weights import build_models

    with pytest.raises(ValueError, match=problem):
        build_models("tiny", **kwargs)


def test_the_fast_cache_preset_is_the_published_fast_config():
    from engine.config import CACHE_PRESETS

    fast, default = get_preset("wan2.1-1.3b", "fast"), get_preset("wan2.1-1.3b")
    assert (fast.num_kv_cache, fast.num_sink, fast.adapt_sink_threshold) == (5, 2, -1)
    assert (default.num_kv_cache, default.num_sink, default.adapt_sink_threshold) == (6, 3, 0.2)
    assert replace(fast, num_kv_cache=6, num_sink=3, adapt_sink_threshold=0.2) == default  # only the cache differs
    assert sorted(CACHE_PRESETS) == ["default", "fast"]


@pytest.mark.parametrize("stream_batch", [True, False])
def test_the_pipeline_streams_with_the_fast_preset(stream_batch):
    from engine.models.weights import build_models

    models = build_models("tiny", cache="fast", decoder="taehv")
    assert models.dit.config.num_kv_cache == 5 and models.dit.config.num_sink == 2
    # Long enough for the 5-frame cache to fill and its ring to turn over several times.
    counts, _ = stream_counts(models, frames=5 + 4 * 16, steps=3, stream_batch=stream_batch)
    assert counts == ([5, 0, 0] + [4] * 14 if stream_batch else [5] + [4] * 16)
    cache_default, _ = stream_counts(build_models("tiny", decoder="taehv"), frames=5 + 4 * 16, steps=3,
                                     stream_batch=stream_batch)
    assert cache_default == counts


def test_speed_options_leave_the_frames_as_they_were():
    from engine.config import SpeedOptions
    from engine.models.weights import build_models

    plain = build_models("tiny")
    fast = build_models("tiny", speed=SpeedOptions(vae_channels_last=True, cudnn_benchmark=True))
    assert fast.vae.channels_last and not plain.vae.channels_last
    assert not torch.backends.cudnn.benchmark  # a CUDA switch: untouched on the CPU
    _, ours = stream_counts(fast)
    _, theirs = stream_counts(plain)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and (abs(a.astype(int) - b.astype(int)) <= 1).all()
