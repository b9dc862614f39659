"""LoRA adapters for the causal DiT (engine/models/lora.py): each published layout adds its
scaled low-rank change to every adapted layer, several mix, scales change live, broken files
are refused naming their keys, and a running engine takes all of it without a restart."""

import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bridge.client import EngineClient
from bridge.zmq_io import RemoteError
from engine import cli
from engine.config import get_preset
from engine.devices import lora_devices
from engine.models.dit import CausalWanDiT, StreamInput
from engine.models.lora import LoraLibrary
from engine.models.lora_files import LoraFileError, linear_shapes
from engine.models.text import TinyTextEncoder
from engine.models.vae import TINY_VAE, WanVAE
from engine.pipeline import StreamPipeline, StreamSettings
from live_tensors import tensor_storages
from processes import PATIENCE_S, ServedEngine
from tiny_loras import lora_state, merged, random_factors, write_lora

pytestmark = pytest.mark.timeout(300)

LATENT_H, LATENT_W = 4, 6


def make_dit() -> CausalWanDiT:
    torch.manual_seed(0)
    dit = CausalWanDiT(get_preset("tiny")).eval()
    with torch.no_grad():  # every weight random, so that every layer shapes the output
        for parameter in dit.parameters():
            parameter.normal_(0, 0.2)
    return dit


def clip(batch: int = 2, frames: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, frames, LATENT_H, LATENT_W, generator=generator),
            torch.randint(0, 1000, (batch, frames), generator=generator), torch.randn(1, 7, 32, generator=generator))


def streamed(dit, adapters=None, chunks: int = 3):
    """Flows of a few cached calls, as a stream runs them (text K/V kept in the cache)."""
    latents, timesteps, context = clip(frames=chunks)
    cache = dit.new_cache(2, LATENT_H, LATENT_W)
    flows = []
    for index in range(chunks):
        chunk = slice(index, index + 1)
        flows.append(dit(latents[:, :, chunk], timesteps[:, chunk], context, cache=cache, adapters=adapters))
        cache.advance()
    return torch.cat(flows, dim=2)


def assert_equal_to_rounding(actual, expected):
    """Equal but for float32 rounding: within a few units of the last place of the output's largest value."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


@pytest.fixture
def library(tmp_path):
    return LoraLibrary(tmp_path, get_preset("tiny"))


# ------------------------------------------------------------------ the arithmetic


@torch.no_grad()
@pytest.mark.parametrize("layout, suffix", [("diffusers", ".safetensors"), ("wan", ".safetensors"), ("wan", ".pt")])
@pytest.mark.parametrize("scale", [0.7, -1.5])
def test_an_adapter_in_each_layout_adds_scale_alpha_over_rank_up_down_to_every_layer(library, tmp_path, layout,
                                                                                     suffix, scale):
    factors = random_factors(alpha=2.0)
    write_lora(tmp_path / f"style{suffix}", factors, layout)
    dit = make_dit()
    adapter = library.adapter(f"style{suffix}")
    assert (adapter.layout, adapter.rank) == (layout, "rank 4")
    assert set(adapter.layers) == set(linear_shapes(get_preset("tiny")))  # every linear layer, embeddings and head too

    mix = library.mix([(f"style{suffix}", scale)])
    reference = merged(dit, [(factors, scale, layout)])
    latents, timesteps, context = clip()
    assert_equal_to_rounding(dit(latents, timesteps, context, adapters=mix), reference(latents, timesteps, context))
    assert_equal_to_rounding(streamed(dit, mix), streamed(reference))
    assert not torch.allclose(streamed(dit, mix), streamed(dit), atol=1e-2)  # the change is no rounding


@torch.no_grad()
def test_scale_0_and_no_adapter_give_the_base_models_output_exactly(library, tmp_path):
    write_lora(tmp_path / "style.safetensors", random_factors())
    dit = make_dit()
    latents, timesteps, context = clip()
    base, base_streamed = dit(latents, timesteps, context), streamed(dit)
    adapted = library.mix([("style", 1.0)])
    assert not torch.equal(dit(latents, timesteps, context, adapters=adapted), base)
    for adapters in (library.mix([("style", 0.0)]), library.mix([]), None):  # scale 0, unloaded
        assert torch.equal(dit(latents, timesteps, context, adapters=adapters), base)
        assert torch.equal(streamed(dit, adapters), base_streamed)


@torch.no_grad()
def test_several_adapters_mix_each_at_its_own_scale(library, tmp_path):
    first, second = random_factors(seed=1, rank=4, alpha=8.0), random_factors(seed=2, rank=2, alpha=None)
    write_lora(tmp_path / "ink.safetensors", first, "wan")
    write_lora(tmp_path / "grain.safetensors", second, "diffusers")
    dit = make_dit()
    mix = library.mix([("ink", 0.5), ("grain", -0.8)])
    reference = merged(dit, [(first, 0.5, "wan"), (second, -0.8, "diffusers")])
    assert_equal_to_rounding(streamed(dit, mix), streamed(reference))
    assert library.mix([("ink", 0.5), ("grain", -0.8)]) is mix  # sessions that agree share one mix


@torch.no_grad()
def test_streams_with_different_adapters_share_a_forward_each_with_its_own(library, tmp_path):
    write_lora(tmp_path / "ink.safetensors", random_factors(seed=1))
    dit = make_dit()
    latents, timesteps, context = clip()
    mixes = [library.mix([("ink", 1.0)]), None, library.mix([("ink", -0.5)])]
    caches = [dit.new_cache(2, LATENT_H, LATENT_W) for _ in mixes]
    frame = slice(0, 1)
    together = dit.forward_streams([StreamInput(latents[:, :, frame], timesteps[:, frame], context, cache, mix)
                                    for cache, mix in zip(caches, mixes)])
    for flow, mix in zip(together, mixes):
        alone = dit(latents[:, :, frame], timesteps[:, frame], context, cache=dit.new_cache(2, LATENT_H, LATENT_W),
                    adapters=mix)
        assert_equal_to_rounding(flow, alone)


def test_the_shapes_lora_files_are_checked_against_are_the_models_linear_layers():
    for preset in ("tiny", "wan2.1-1.3b"):
        config = get_preset(preset)
        with torch.device("meta"):
            dit = CausalWanDiT(config)
        actual = {name: tuple(module.weight.shape) for name, module in dit.named_modules()
                  if isinstance(module, torch.nn.Linear)}
        assert linear_shapes(config) == actual


# ------------------------------------------------------------------ broken files


def broken_files(folder):
    """name -> (file written, what the error says)."""
    factors = random_factors()
    state = lora_state(factors, "wan")
    files = {}
    wrong = dict(state)
    wrong["diffusion_model.blocks.0.self_attn.q.lora_down.weight"] = torch.randn(4, 48)
    files["wrong_shapes"] = (wrong, ["another shape than the model's",
                                     "diffusion_model.blocks.0.self_attn.q.lora_down.weight [4, 48]"])
    unknown = dict(state)
    unknown["diffusion_model.blocks.0.norm3.weight"] = torch.randn(64)
    unknown["diffusion_model.patch_embedding.lora_down.weight"] = torch.randn(4, 64)
    files["unknown_keys"] = (unknown, ["2 keys of no LoRA layout", "diffusion_model.blocks.0.norm3.weight",
                                       "diffusion_model.patch_embedding.lora_down.weight"])
    mismatch = dict(state)
    mismatch["diffusion_model.blocks.1.ffn.0.lora_up.weight"] = torch.randn(128, 3)
    files["rank_mismatch"] = (mismatch, ["ranks disagree", "diffusion_model.blocks.1.ffn.0.lora_down.weight [4, 64]"])
    for name, (state, _) in files.items():
        save_file({key: value.contiguous() for key, value in state.items()}, str(folder / f"{name}.safetensors"))
    (folder / "not_safetensors.safetensors").write_bytes(b"this is not a tensor file at all")
    files["not_safetensors"] = (None, ["not a safetensors or torch file"])
    return {name: said for name, (_, said) in files.items()}


def test_a_broken_file_is_refused_naming_the_file_and_its_first_offending_keys(library, tmp_path):
    for name, said in broken_files(tmp_path).items():
        with pytest.raises(LoraFileError) as refused:
            library.adapter(name)
        message = str(refused.value)
        assert str(tmp_path / f"{name}.safetensors") in message, message
        for words in said:
            assert words in message, (name, message)
    with pytest.raises(LoraFileError, match="no such file; put missing in the LoRA folder"):
        library.adapter("missing")


def test_devices_lists_the_folders_adapters_without_a_model(tmp_path):
    write_lora(tmp_path / "ink.safetensors", random_factors(rank=8), "wan")
    write_lora(tmp_path / "grain.safetensors", random_factors(rank=2, alpha=None), "diffusers")
    broken_files(tmp_path)
    rows = {device.name: device for device in lora_devices(tmp_path)}
    assert rows["ink"].usable and rows["ink"].why == "wan layout, rank 8, 26 layers adapted; for tiny"
    assert rows["grain"].usable and rows["grain"].why == "diffusers layout, rank 2, 26 layers adapted; for tiny"
    assert not rows["wrong_shapes"].usable and "fits no model preset" in rows["wrong_shapes"].why
    for name in ("unknown_keys", "rank_mismatch", "not_safetensors"):
        assert not rows[name].usable and rows[name].fix, name
    assert "norm3" in rows["unknown_keys"].why and "not a safetensors file" in rows["not_safetensors"].why
    (missing,) = lora_devices(tmp_path / "nowhere")
    assert not missing.usable and "no LoRA folder" in missing.why and "--lora-dir" in missing.fix


def test_serve_takes_lora_flags_as_name_scale_pairs():
    assert cli.lora_flag("ink") == ("ink", 1.0)
    assert cli.lora_flag("/loras/ink.safetensors:0.5") == ("/loras/ink.safetensors", 0.5)
    assert cli.lora_flag("C:/loras/ink.safetensors") == ("C:/loras/ink.safetensors", 1.0)  # a drive, not a scale
    assert cli.lora_flag("ink:-1.25") == ("ink", -1.25)
    with pytest.raises(Exception, match="scale must be from -2 to 2"):
        cli.lora_flag("ink:3")


# ------------------------------------------------------------------ a live pipeline


def tensor_bytes() -> int:
    return tensor_storages()[1]


@torch.no_grad()
def test_a_scale_changes_at_the_next_chunk_without_a_restart_and_500_changes_leave_memory_flat(tmp_path):
    write_lora(tmp_path / "ink.safetensors", random_factors(seed=3))
    torch.manual_seed(0)
    config = get_preset("tiny")
    dit, vae = CausalWanDiT(config).eval(), WanVAE(TINY_VAE).eval()
    text = TinyTextEncoder(config.text_len, config.text_dim)
    loras = LoraLibrary(tmp_path, config)
    settings = StreamSettings(height=32, width=32, prompt="ink", loras=(("ink", 0.5),))
    pipelines = [StreamPipeline(dit, vae, text, settings, loras=loras) for _ in range(2)]
    frames = np.random.default_rng(0).integers(0, 255, (40, 32, 32, 3), dtype=np.uint8)
    outputs = [[pipeline.push(frames[:5])] for pipeline in pipelines]
    for start in range(5, 21, 4):
        for pipeline, out in zip(pipelines, outputs):
            out.append(pipeline.push(frames[start:start + 4]))
    assert pipelines[1].update(loras=(("ink", -1.0),)) is False  # live: caches and the stream batch kept
    for pipeline, out in zip(pipelines, outputs):
        out.append(pipeline.push(frames[21:25]))
    same, changed = (np.concatenate(out).astype(float) for out in outputs)
    assert np.array_equal(same[:-4], changed[:-4])  # identical until the change ...
    assert np.abs(same[-4:] - changed[-4:]).mean() > 0.1  # ... and the very next chunk shows it

    pipeline = pipelines[1]
    before = tensor_bytes()
    for change in range(500):
        pipeline.update(loras=(("ink", -1.0 + change / 500),))
        if change % 50 == 0:
            pipeline.push(frames[25:29])
    pipeline.update(loras=(("ink", -1.0),))
    for _ in range(pipeline.settings.steps + 1):  # until no stream-batch slot's step ran before the last change
        pipeline.push(frames[25:29])
    assert tensor_bytes() == before


# ------------------------------------------------------------------ a running engine


HOST_SIZE = 32


class Streaming:
    """A host streaming the test pattern to a session, keeping the outputs by seq."""

    def __init__(self, client: EngineClient):
        self.client, self.outputs, self.sent = client, {}, 0
        self.frames = cli.test_pattern(2000, HOST_SIZE, HOST_SIZE)

    def send(self, count: int) -> None:
        for _ in range(count):
            deadline = time.monotonic() + PATIENCE_S
            while True:  # only while the next chunk has room: no frame dropped as stale
                stats = self.client.stats()
                if stats["frames_in"] == self.sent and stats["frames_waiting"] < stats["next_chunk_frames"]:
                    break
                assert time.monotonic() < deadline, f"the engine stopped taking frames: {stats}"
                self.collect(0.002)
            self.client.send(self.frames[self.sent])
            self.sent += 1
            self.collect(0.01)

    def collect(self, timeout: float) -> None:
        output = self.client.receive(timeout)
        if output is not None:
            self.outputs[output.seq] = output.pixels.astype(float)

    def wait_for(self, seq: int) -> None:
        deadline = time.monotonic() + PATIENCE_S
        while max(self.outputs, default=-1) < seq:
            assert time.monotonic() < deadline, f"output {seq} never came: {self.client.stats()}"
            self.collect(0.002)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder / "ink.safetensors", random_factors(seed=5))
    broken_files(folder)
    engine = ServedEngine(tmp_path_factory.mktemp("engine"), "--lora-dir", str(folder), "--lora", "ink:0.5")
    yield engine
    assert engine.stop() == 0, engine.log()


def open_session(engine, **params) -> EngineClient:
    return EngineClient(engine.address, transport="shm", width=HOST_SIZE, height=HOST_SIZE, timeout_s=PATIENCE_S,
                        prompt="a watercolour painting", **params)


def test_a_live_scale_change_shows_at_the_next_chunk_and_500_leave_the_engine_flat(engine):
    with open_session(engine) as kept, open_session(engine) as changed:
        assert kept.stats()["params"]["loras"] == [["ink", 0.5]]  # serve --lora: every session's default
        hosts = [Streaming(kept), Streaming(changed)]
        for host in hosts:
            host.send(13)
            host.wait_for(8)
        reply = changed.set(loras=[["ink", -1.0]])
        assert reply["restarts"] is False and reply["params"]["loras"] == [["ink", -1.0]]
        for host in hosts:
            host.send(4)
            host.wait_for(12)
        # The outputs before the change are the same in both sessions; those of the next chunk out are not.
        both = [seq for seq in range(13) if seq in hosts[0].outputs and seq in hosts[1].outputs]
        before, after = [seq for seq in both if seq < 9], [seq for seq in both if seq >= 9]
        assert before and all(np.array_equal(hosts[0].outputs[seq], hosts[1].outputs[seq]) for seq in before)
        assert after and np.mean([np.abs(hosts[0].outputs[seq] - hosts[1].outputs[seq]).mean() for seq in after]) > 0.1

        memory = changed.stats()["lora_memory_bytes"]
        for change in range(500):
            changed.set(loras=[["ink", round(-1.0 + change / 500, 3)]])
            if change % 100 == 99:
                hosts[1].send(4)
        changed.set(loras=[["ink", -1.0]])
        hosts[1].send(4 * (changed.stats()["params"]["steps"] + 1))  # until no slot's step ran before the change
        hosts[1].wait_for(hosts[1].sent - 5)
        stats = changed.stats()
        assert stats["lora_memory_bytes"] == memory and stats["state"] == "streaming"


@pytest.mark.parametrize("name", ["wrong_shapes", "unknown_keys", "rank_mismatch", "not_safetensors", "missing"])
def test_a_broken_file_is_a_bad_value_and_the_session_streams_on_with_its_adapters(engine, name):
    with open_session(engine) as client:
        host = Streaming(client)
        host.send(9)
        host.wait_for(4)
        with pytest.raises(RemoteError) as refused:
            client.set(loras=[["ink", 1.0], [name, 0.5]])
        assert (refused.value.code, refused.value.field) == ("bad_value", "params.loras")
        assert f"{name}.safetensors" in refused.value.message
        host.send(4)
        host.wait_for(8)
        stats = client.stats()
        assert stats["params"]["loras"] == [["ink", 0.5]] and stats["state"] == "streaming"
