"""The Wan2.1 VAE: streaming equals offline, published layout, loading, argument
checks, bounded stream state, latent scaling. CPU, tiny config, small frames."""

from __future__ import annotations

import pytest
import torch

from engine.models.vae import (TINY_VAE, WAN21_VAE, VAEStreamState, WanVAE, get_vae_config,
                               load_vae)
from engine.models.weights import CheckpointMismatch

# The published per-channel latent statistics (Wan2.1 WanVAE wrapper; the same
# numbers are the diffusers AutoencoderKLWan defaults latents_mean / latents_std).
PUBLISHED_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                  0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
PUBLISHED_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]

# float32 rounding differences between one pass and chunk by chunk
TOLERANCE = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    torch.manual_seed(0)
    return WanVAE(TINY_VAE).eval()


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    """17 frames (1 + 4*4) of 32x32 video in [-1, 1]."""
    generator = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, 17, 32, 32, generator=generator) * 2 - 1


def split_frames(video: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    assert sum(sizes) == video.shape[2]
    return list(video.split(sizes, dim=2))


# ---------------------------------------------------------------- streaming equals whole clip


@pytest.mark.parametrize("chunks", [[1, 4, 4, 4, 4], [5, 4, 4, 4], [1, 8, 8], [9, 8]],
                         ids=lambda c: "+".join(map(str, c)))
def test_stream_encode_equals_whole_clip(vae, clip, chunks):
    with torch.no_grad():
        whole = vae.encode(clip)
    state = vae.new_stream()
    streamed = [vae.stream_encode(chunk, state) for chunk in split_frames(clip, chunks)]

    # 1 + 4k frames -> 1 + k latents; 4k frames -> k latents
    assert [z.shape[2] for z in streamed] == [(n + 3) // 4 for n in chunks]
    assert whole.shape == (1, 16, 5, 4, 4)
    torch.testing.assert_close(torch.cat(streamed, dim=2), whole, **TOLERANCE)
    assert state.frames_encoded == 17


def test_stream_encode_depends_on_the_past(vae, clip):
    """Guards the test above against passing trivially: without the stream's memory
    of earlier chunks, a later chunk encodes differently."""
    with torch.no_grad():
        whole = vae.encode(clip)
    state = vae.new_stream()
    vae.stream_encode(clip[:, :, :5], state)
    for key, past in state.encoder_cache.items():  # forget the past, keep the stream position
        state.encoder_cache[key] = torch.zeros_like(past)
    forgetful = vae.stream_encode(clip[:, :, 5:9], state)
    assert not torch.allclose(forgetful, whole[:, :, 2:3], **TOLERANCE)


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1], [2, 3]], ids=["one-by-one", "2+3"])
def test_stream_decode_equals_whole_clip(vae, clip, chunks):
    with torch.no_grad():
        latents = vae.encode(clip)
        whole = vae.decode(latents)
    state = vae.new_stream()
    streamed = [vae.stream_decode(z, state) for z in latents.split(chunks, dim=2)]

    # a stream's first latent decodes to 1 frame, each later latent to 4
    assert [f.shape[2] for f in streamed] == [4 * n - 3 * (i == 0) for i, n in enumerate(chunks)]
    assert whole.shape == clip.shape
    assert whole.abs().max() <= 1
    torch.testing.assert_close(torch.cat(streamed, dim=2), whole, **TOLERANCE)
    assert state.latents_decoded == 5


def test_streams_are_independent_and_reset_restarts(vae, clip):
    """One model, two interleaved streams, and a reset stream, give the same latents."""
    first, second = vae.new_stream(), vae.new_stream()
    reused = vae.new_stream()
    vae.stream_encode(torch.zeros(1, 3, 5, 32, 32), reused)
    reused.reset()
    outputs: dict[str, list[torch.Tensor]] = {"first": [], "second": [], "reused": []}
    for chunk in split_frames(clip, [5, 4, 4, 4]):
        for name, state in (("first", first), ("second", second), ("reused", reused)):
            outputs[name].append(vae.stream_encode(chunk, state))
    reference = torch.cat(outputs["first"], dim=2)
    torch.testing.assert_close(torch.cat(outputs["second"], dim=2), reference, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(outputs["reused"], dim=2), reference, rtol=0, atol=0)


# ---------------------------------------------------------------- published layout


def test_wan21_config_is_the_published_one():
    assert get_vae_config("wan2.1") is WAN21_VAE
    assert (WAN21_VAE.z_dim, WAN21_VAE.base_dim, WAN21_VAE.dim_mult, WAN21_VAE.num_res_blocks) == (
        16, 96, (1, 2, 4, 4), 2)
    assert WAN21_VAE.temporal_downsample == (False, True, True)
    assert (WAN21_VAE.spatial_factor, WAN21_VAE.temporal_factor) == (8, 4)
    assert list(WAN21_VAE.latent_mean) == PUBLISHED_MEAN
    assert list(WAN21_VAE.latent_std) == PUBLISHED_STD
    # the tiny one is the same model shape, narrower, with the same latent space
    assert get_vae_config("tiny") is TINY_VAE
    assert (TINY_VAE.z_dim, TINY_VAE.spatial_factor, TINY_VAE.temporal_factor) == (16, 8, 4)
    with pytest.raises(ValueError, match="name"):
        get_vae_config("wan9")


# Representative keys of Wan2.1_VAE.pth and their shapes.
PUBLISHED_SHAPES = {
    "encoder.conv1.weight": [96, 3, 3, 3, 3],
    "encoder.downsamples.0.residual.0.gamma": [96, 1, 1, 1],
    "encoder.downsamples.0.residual.2.weight": [96, 96, 3, 3, 3],
    "encoder.downsamples.0.residual.3.gamma": [96, 1, 1, 1],
    "encoder.downsamples.0.residual.6.bias": [96],
    "encoder.downsamples.2.resample.1.weight": [96, 96, 3, 3],
    "encoder.downsamples.3.shortcut.weight": [192, 96, 1, 1, 1],
    "encoder.downsamples.5.time_conv.weight": [192, 192, 3, 1, 1],
    "encoder.downsamples.8.time_conv.weight": [384, 384, 3, 1, 1],
    "encoder.middle.0.residual.2.weight": [384, 384, 3, 3, 3],
    "encoder.middle.1.norm.gamma": [384, 1, 1],
    "encoder.middle.1.to_qkv.weight": [1152, 384, 1, 1],
    "encoder.middle.1.proj.weight": [384, 384, 1, 1],
    "encoder.head.0.gamma": [384, 1, 1, 1],
    "encoder.head.2.weight": [32, 384, 3, 3, 3],
    "conv1.weight": [32, 32, 1, 1, 1],
    "conv2.weight": [16, 16, 1, 1, 1],
    "decoder.conv1.weight": [384, 16, 3, 3, 3],
    "decoder.middle.1.to_qkv.bias": [1152],
    "decoder.upsamples.3.time_conv.weight": [768, 384, 3, 1, 1],
    "decoder.upsamples.3.resample.1.weight": [192, 384, 3, 3],
    "decoder.upsamples.4.shortcut.weight": [384, 192, 1, 1, 1],
    "decoder.upsamples.7.time_conv.weight": [768, 384, 3, 1, 1],
    "decoder.upsamples.11.resample.1.weight": [96, 192, 3, 3],
    "decoder.upsamples.14.residual.6.weight": [96, 96, 3, 3, 3],
    "decoder.head.0.gamma": [96, 1, 1, 1],
    "decoder.head.2.weight": [3, 96, 3, 3, 3],
}


def test_full_model_has_the_published_state_dict_layout():
    with torch.device("meta"):
        model = WanVAE(WAN21_VAE)
    state = model.state_dict()
    for key, shape in PUBLISHED_SHAPES.items():
        assert key in state, key
        assert list(state[key].shape) == shape, key
    # spatial-only resampling has no time conv: encoder step 0, decoder step 2
    assert "encoder.downsamples.2.time_conv.weight" not in state
    assert "decoder.upsamples.11.time_conv.weight" not in state
    # Totals of the published file: 194 tensors, 126,892,531 parameters
    # (508 MB in float32, 254 MB in bf16).
    assert len(state) == 194
    assert sum(t.numel() for t in state.values()) == 126_892_531


# ---------------------------------------------------------------- loading


def test_tiny_checkpoint_loads_strictly(vae, clip, tmp_path):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(vae.state_dict(), path)  # the published layout: a raw state dict
    loaded = load_vae(path, TINY_VAE)
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(clip), vae.encode(clip), rtol=0, atol=0)


def test_checkpoint_with_wrong_keys_is_a_readable_error(vae, tmp_path):
    state = dict(vae.state_dict())
    state["encoder.head.0.weight"] = state.pop("encoder.head.0.gamma")  # renamed
    del state["conv2.bias"]  # missing
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatch) as caught:
        load_vae(path, TINY_VAE)
    message = str(caught.value)
    assert "Wan VAE" in message and str(path) in message
    assert "encoder.head.0.gamma" in message and "conv2.bias" in message  # missing
    assert "encoder.head.0.weight" in message  # unexpected


def test_checkpoint_for_another_config_names_the_shape_conflicts(vae, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(vae.state_dict(), path)
    with pytest.raises(CheckpointMismatch, match=r"shape of encoder.conv1.weight: model wants \[96, 3, 3, 3, 3\]"):
        load_vae(path)  # the full Wan2.1 config


# ---------------------------------------------------------------- argument checks


def frames(t: int, h: int = 16, w: int = 16, channels: int = 3) -> torch.Tensor:
    return torch.zeros(1, channels, t, h, w)


@pytest.mark.parametrize("bad, argument", [
    (torch.zeros(3, 5, 16, 16), "frames"),  # no batch dim
    (frames(5, channels=4), "frames"),  # RGBA
    (frames(5, h=20), "frames"),  # height not a multiple of 8
    (frames(5, w=12), "frames"),
    (frames(4), "frames"),  # a first chunk needs 1 + 4k frames
    (frames(0), "frames"),
])
def test_stream_encode_rejects_bad_frames(vae, bad, argument):
    with pytest.raises(ValueError, match=f"^{argument}:"):
        vae.stream_encode(bad, vae.new_stream())


def test_stream_encode_rejects_bad_later_chunks(vae):
    state = vae.new_stream()
    vae.stream_encode(frames(5), state)
    for bad in (frames(5), frames(1), frames(4, h=24)):  # not 4k frames; size changed
        with pytest.raises(ValueError, match="^frames:"):
            vae.stream_encode(bad, state)
    assert vae.stream_encode(frames(8), state).shape[2] == 2  # the stream goes on


@pytest.mark.parametrize("bad", [torch.zeros(1, 16, 2, 2), torch.zeros(1, 4, 1, 2, 2), torch.zeros(1, 16, 0, 2, 2)],
                         ids=["no-batch-dim", "4-channels", "no-latents"])
def test_decode_rejects_bad_latents(vae, bad):
    with pytest.raises(ValueError, match="^latents:"):
        vae.stream_decode(bad, vae.new_stream())
    with pytest.raises(ValueError, match="^latents:"):
        vae.decode(bad)


def test_decode_rejects_latents_of_another_size_mid_stream(vae):
    state = vae.new_stream()
    vae.stream_decode(torch.zeros(1, 16, 1, 2, 2), state)
    with pytest.raises(ValueError, match="^latents:.*reset"):
        vae.stream_decode(torch.zeros(1, 16, 1, 3, 2), state)


def test_offline_encode_needs_a_whole_clip(vae):
    with pytest.raises(ValueError, match="^video:"):
        vae.encode(frames(16))


# ---------------------------------------------------------------- bounded state


def test_stream_state_stays_bounded_over_a_long_stream(vae):
    """50 chunks in and out: the cached bytes stop growing after the first chunk,
    and the cache holds no autograd history even with gradients enabled."""
    generator = torch.Generator().manual_seed(2)
    state = vae.new_stream()
    sizes = []
    for i in range(50):
        chunk = torch.rand(1, 3, 5 if i == 0 else 4, 16, 16, generator=generator) * 2 - 1
        out = vae.stream_decode(vae.stream_encode(chunk, state), state)
        assert out.shape[2] == chunk.shape[2]  # frames in = frames out
        sizes.append(state.nbytes())
    assert sizes[1] > 0
    assert set(sizes[1:]) == {sizes[1]}
    cached = [*state.encoder_cache.values(), *state.decoder_cache.values()]
    assert not any(t.requires_grad for t in cached)
    assert (state.frames_encoded, state.latents_decoded) == (5 + 49 * 4, 2 + 49)
    state.reset()
    assert state.nbytes() == 0 and state.frames_encoded == 0


# ---------------------------------------------------------------- latent scale


def test_encode_returns_the_raw_mean_not_normalised():
    """Weights set so that the encoder's mean is a known constant per channel:
    encode must return exactly it, not (mean - latent_mean) / latent_std."""
    torch.manual_seed(3)
    model = WanVAE(TINY_VAE).eval()
    known = torch.linspace(-3, 3, 32)
    with torch.no_grad():
        model.encoder.head[2].weight.zero_()
        model.encoder.head[2].bias.copy_(known)
        model.conv1.weight.copy_(torch.eye(32).view(32, 32, 1, 1, 1))
        model.conv1.bias.zero_()
        video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
        expected = known[:16].view(1, 16, 1, 1, 1).expand(1, 16, 2, 2, 2)
        torch.testing.assert_close(model.encode(video), expected, rtol=0, atol=0)
    torch.testing.assert_close(model.stream_encode(video, model.new_stream()), expected, rtol=0, atol=0)


def test_decode_denormalises_with_the_published_statistics(vae):
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn(1, 16, 3, 4, 4, generator=generator)
    mean = torch.tensor(PUBLISHED_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(PUBLISHED_STD).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        by_hand = vae.decoder(vae.conv2(latents * std + mean)).clamp(-1, 1)
        without_scaling = vae.decoder(vae.conv2(latents)).clamp(-1, 1)
        decoded = vae.decode(latents)
    torch.testing.assert_close(decoded, by_hand, **TOLERANCE)
    assert not torch.allclose(decoded, without_scaling, **TOLERANCE)  # the scaling matters
    streamed = vae.stream_decode(latents, VAEStreamState())
    torch.testing.assert_close(streamed, by_hand, **TOLERANCE)


# ---------------------------------------------------------------- speed options, exact on the CPU


def test_latent_statistics_are_made_once_per_device_and_dtype(vae, clip):
    with torch.no_grad():
        latents = vae.encode(clip)
        first = vae.decode(latents)
        held = vae._latent_statistics(latents)
        again = vae.decode(latents)
    assert vae._latent_statistics(latents)[0] is held[0]  # the same tensors, not new copies per call
    torch.testing.assert_close(held[0].flatten(), torch.tensor(PUBLISHED_MEAN))
    torch.testing.assert_close(held[1].flatten(), torch.tensor(PUBLISHED_STD))
    assert torch.equal(first, again)
    double = vae._latent_statistics(latents.double())
    assert double[0].dtype == torch.float64 and double[0] is not held[0]


def test_channels_last_gives_the_same_latents_and_frames(clip):
    torch.manual_seed(0)
    plain = WanVAE(TINY_VAE).eval()
    fast = WanVAE(TINY_VAE).eval()
    fast.load_state_dict(plain.state_dict())
    fast.set_channels_last(True)
    conv = fast.encoder.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    states = plain.new_stream(), fast.new_stream()
    for chunk in clip.split([5, 4, 4, 4], dim=2):
        latents = [vae.stream_encode(chunk, state) for vae, state in zip((plain, fast), states)]
        torch.testing.assert_close(latents[1], latents[0], **TOLERANCE)
        frames = [vae.stream_decode(latents[0], state) for vae, state in zip((plain, fast), states)]
        torch.testing.assert_close(frames[1], frames[0], **TOLERANCE)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    fast.set_channels_last(False)
    assert fast.encoder.conv1.weight.is_contiguous() and not fast.channels_last
