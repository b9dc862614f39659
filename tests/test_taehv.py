"""TAEHV decoder: published checkpoint layout, strict loading, streaming decode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.models.taehv import TAEHV, TAEW2_1, TINY_TAEHV, TAEHVConfig, load_taehv
from engine.models.weights import CheckpointMismatch

LATENT_H, LATENT_W = 2, 3


@pytest.fixture(scope="module")
def tiny() -> TAEHV:
    torch.manual_seed(0)
    return TAEHV(TINY_TAEHV).eval()


def random_latents(frames: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, frames, LATENT_H, LATENT_W, generator=generator)


def state_bytes(state) -> int:
    return sum(t.untyped_storage().nbytes() for t in state.memory if t is not None)


def test_offline_decode_shape_range_and_frame_count(tiny):
    frames = tiny.decode(random_latents(5, batch=2))
    assert frames.shape == (2, 3, 4 * 5 - 3, 8 * LATENT_H, 8 * LATENT_W)
    assert frames.min() >= -1 and frames.max() <= 1


def test_streaming_one_latent_at_a_time_equals_offline(tiny):
    latents = random_latents(5)
    state = tiny.new_stream()
    chunks = [tiny.stream_decode(latents[:, :, [i]], state) for i in range(5)]
    assert [c.shape[2] for c in chunks] == [1, 4, 4, 4, 4]
    torch.testing.assert_close(torch.cat(chunks, dim=2), tiny.decode(latents), rtol=1e-5, atol=1e-6)


def test_streaming_in_uneven_chunks_equals_offline(tiny):
    latents = random_latents(6)
    state = tiny.new_stream()
    chunks = [tiny.stream_decode(latents[:, :, a:b], state) for a, b in [(0, 2), (2, 3), (3, 6)]]
    assert [c.shape[2] for c in chunks] == [5, 4, 12]
    torch.testing.assert_close(torch.cat(chunks, dim=2), tiny.decode(latents), rtol=1e-5, atol=1e-6)


def test_interleaved_streams_do_not_share_state(tiny):
    first, second = random_latents(3, seed=2), random_latents(3, seed=3)
    state_a, state_b = tiny.new_stream(), tiny.new_stream()
    out_a, out_b = [], []
    for i in range(3):
        out_a.append(tiny.stream_decode(first[:, :, [i]], state_a))
        out_b.append(tiny.stream_decode(second[:, :, [i]], state_b))
    torch.testing.assert_close(torch.cat(out_a, dim=2), tiny.decode(first), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(out_b, dim=2), tiny.decode(second), rtol=1e-5, atol=1e-6)


def test_memory_carries_the_past(tiny):
    latents = random_latents(2)
    last_in_clip = tiny.decode(latents)[:, :, -1]
    last_alone = tiny.decode(latents[:, :, 1:])[:, :, -1]
    assert not torch.allclose(last_in_clip, last_alone)


def test_stream_state_stays_bounded(tiny):
    state = tiny.new_stream()
    latents = random_latents(40)
    tiny.stream_decode(latents[:, :, [0]], state)
    size_after_first = state_bytes(state)
    for i in range(1, 40):
        assert tiny.stream_decode(latents[:, :, [i]], state).shape[2] == 4
    assert state_bytes(state) == size_after_first > 0
    # One frame per MemBlock (9 of them), whatever the chunk size.
    tiny.stream_decode(random_latents(5), state)
    assert state_bytes(state) == size_after_first
    assert sum(t is not None for t in state.memory) == 9


# Shapes from the published taew2_1 layout (madebyollin/taehv taehv.py; confirmed by
# third-party readers of the shipped safetensors headers: 64 decoder tensors,
# decoder.7 TGrow [256, 256, 1, 1] for Wan, 58 biases over the whole file).
PUBLISHED_SHAPES = {
    "encoder.0.weight": (64, 3, 3, 3),
    "encoder.0.bias": (64,),
    "encoder.2.conv.weight": (64, 128, 1, 1),      # TPool, 2 frames -> 1
    "encoder.3.weight": (64, 64, 3, 3),            # stride-2 conv, no bias
    "encoder.4.conv.0.weight": (64, 128, 3, 3),    # MemBlock: [x, past] -> 64
    "encoder.12.conv.weight": (64, 64, 1, 1),      # TPool, 1 frame -> 1
    "encoder.16.conv.4.bias": (64,),
    "encoder.17.weight": (16, 64, 3, 3),
    "encoder.17.bias": (16,),
    "decoder.1.weight": (256, 16, 3, 3),
    "decoder.3.conv.0.weight": (256, 512, 3, 3),
    "decoder.5.conv.4.weight": (256, 256, 3, 3),
    "decoder.7.conv.weight": (256, 256, 1, 1),     # TGrow, 1 frame -> 1
    "decoder.8.weight": (128, 256, 3, 3),
    "decoder.9.conv.0.weight": (128, 256, 3, 3),
    "decoder.13.conv.weight": (256, 128, 1, 1),    # TGrow, 1 frame -> 2
    "decoder.14.weight": (64, 128, 3, 3),
    "decoder.19.conv.weight": (128, 64, 1, 1),     # TGrow, 1 frame -> 2
    "decoder.20.weight": (64, 64, 3, 3),
    "decoder.22.weight": (3, 64, 3, 3),
    "decoder.22.bias": (3,),
}


def test_published_config_has_the_published_layout():
    with torch.device("meta"):
        state = TAEHV(TAEW2_1).state_dict()
    for key, shape in PUBLISHED_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(k.startswith("encoder.") for k in state) == 64
    assert sum(k.startswith("decoder.") for k in state) == 64
    assert sum(k.endswith(".bias") for k in state) == 58
    assert "decoder.8.bias" not in state and "decoder.3.skip.weight" not in state
    assert (TAEW2_1.time_upscale, TAEW2_1.frames_to_trim) == (4, 3)


def splitmix_uniform(shape: list[int], seed: int, scale: float, offset: float) -> torch.Tensor:
    """Deterministic uniform values of variance scale**2 (splitmix64 of seed * 2**32 + index)."""
    z = np.arange(math.prod(shape), dtype=np.uint64) + np.uint64(seed << 32) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    unit = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) * 2 - 1
    return torch.from_numpy(unit * scale * math.sqrt(3) + offset).reshape(shape)


def test_published_decoder_matches_upstream_golden_values():
    """Pins the decoder's arithmetic (MemBlock input order, TGrow frame order, trim)
    to upstream taehv.py. The golden values come from an independent port that ran
    upstream taehv.py (commit 011dfc21) in float64 with these deterministic weights
    (seed = sum of the key's bytes mod 997) on latents of shape [1, 16, 2, 2, 3]."""
    with torch.device("meta"):
        model = TAEHV(TAEW2_1)
    weights = {}
    for key, tensor in model.decoder.state_dict().items():
        shape, seed = list(tensor.shape), sum(f"decoder.{key}".encode()) % 997
        if key == "22.bias":
            weights[key] = splitmix_uniform(shape, seed, 0.05, 0.5)
        elif key.endswith("bias"):
            weights[key] = splitmix_uniform(shape, seed, 0.05, 0.0)
        else:
            weights[key] = splitmix_uniform(shape, seed, math.sqrt(1 / math.prod(shape[1:])), 0.0)
    model.decoder.load_state_dict({k: v.float().double() for k, v in weights.items()}, assign=True)
    # Upstream lays latents out [B, T, C, H, W] and frames [B, T, H, W, C] in [0, 1].
    latents = splitmix_uniform([1, 2, 16, 2, 3], 7, 1.0, 0.0).float().double().transpose(1, 2)

    def upstream_layout(frames: torch.Tensor) -> torch.Tensor:
        return ((frames + 1) / 2).permute(0, 2, 3, 4, 1).flatten()

    clip = upstream_layout(model.decode(latents))
    assert clip.numel() == 5 * 16 * 24 * 3
    assert clip.mean().item() == pytest.approx(0.5453534, abs=1e-6)
    for index, want in [(0, 0.5278884), (767, 0.6362164), (1535, 0.2605670),
                        (2687, 0.7761875), (4607, 0.4165053), (5759, 0.4709628)]:
        assert clip[index].item() == pytest.approx(want, abs=1e-6), index
    second_alone = upstream_layout(model.decode(latents[:, :, 1:]))
    assert second_alone.mean().item() == pytest.approx(0.5575177, abs=1e-6)
    for index, want in [(0, 0.4963038), (537, 0.6685046), (920, 0.7683413), (1151, 0.4861233)]:
        assert second_alone[index].item() == pytest.approx(want, abs=1e-6), index


def test_tiny_config_keeps_the_published_key_names():
    with torch.device("meta"):
        published, tiny_keys = TAEHV(TAEW2_1).state_dict(), TAEHV(TINY_TAEHV).state_dict()
    assert list(published) == list(tiny_keys)


def test_checkpoint_round_trip_loads_strictly(tiny, tmp_path):
    path = tmp_path / "taew2_1.pth"
    torch.save(tiny.state_dict(), path)
    loaded = load_taehv(path, TINY_TAEHV)
    latents = random_latents(3)
    torch.testing.assert_close(loaded.decode(latents), tiny.decode(latents))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_broken_checkpoint_raises_a_readable_mismatch(tiny, tmp_path):
    state = dict(tiny.state_dict())
    del state["decoder.22.bias"]
    state["decoder.99.weight"] = torch.zeros(1)
    state["decoder.7.conv.weight"] = torch.zeros(16, 8, 1, 1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatch) as caught:
        load_taehv(path, TINY_TAEHV)
    message = str(caught.value)
    assert "decoder.22.bias" in message and "decoder.99.weight" in message
    assert "decoder.7.conv.weight" in message and str(path) in message


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_taehv(tmp_path / "nowhere.pth", TINY_TAEHV)


@pytest.mark.parametrize("bad", [
    torch.zeros(1, 16, 2, 2),           # 4-D
    torch.zeros(1, 4, 1, 2, 2),         # wrong latent channels
    torch.zeros(1, 16, 0, 2, 2),        # no frames
    [[0.0]],                            # not a tensor
])
def test_bad_latents_raise_value_error_naming_latents(tiny, bad):
    with pytest.raises(ValueError, match="latents"):
        tiny.decode(bad)
    with pytest.raises(ValueError, match="latents"):
        tiny.stream_decode(bad, tiny.new_stream())


def test_latents_that_do_not_continue_the_stream_are_refused(tiny):
    state = tiny.new_stream()
    tiny.stream_decode(random_latents(1), state)
    with pytest.raises(ValueError, match="latents"):
        tiny.stream_decode(torch.zeros(1, 16, 1, LATENT_H + 1, LATENT_W), state)
    with pytest.raises(ValueError, match="latents"):
        tiny.stream_decode(random_latents(1, batch=2), state)


def test_bad_state_and_config_raise_value_error_naming_them(tiny):
    with pytest.raises(ValueError, match="state"):
        tiny.stream_decode(random_latents(1), state={})
    with pytest.raises(ValueError, match="config"):
        TAEHV("taew2_1")
    with pytest.raises(ValueError, match="decoder_widths"):
        TAEHVConfig(decoder_widths=(8, 8, 4))
    with pytest.raises(ValueError, match="decoder_time_grow"):
        TAEHVConfig(decoder_time_grow=(True, True))


# ---------------------------------------------------------------- the encoder

# The published encoder, layer by layer (madebyollin/taehv taehv.py, TAEHV.encoder for
# Wan 2.1): (kind, index in the Sequential, stride). Written out here, apart from the
# model's own layer builder, so that the reference below checks the layout too.
# float32 rounding over some 40 layers of output ~1 (the float64 test below is exact to 1e-10)
FLOAT32 = dict(rtol=1e-4, atol=2e-5)

PUBLISHED_ENCODER = [("conv", 0, 1), ("relu", 1, 1),
                     ("pool", 2, 2), ("conv", 3, 2), ("mem", 4, 1), ("mem", 5, 1), ("mem", 6, 1),
                     ("pool", 7, 2), ("conv", 8, 2), ("mem", 9, 1), ("mem", 10, 1), ("mem", 11, 1),
                     ("pool", 12, 1), ("conv", 13, 2), ("mem", 14, 1), ("mem", 15, 1), ("mem", 16, 1),
                     ("conv", 17, 1)]


@pytest.fixture(scope="module")
def lively() -> TAEHV:
    """The tiny config with He-initialised convs: torch's default init shrinks the signal
    at each of the ~40 layers until the latents no longer depend on the frames, which
    would let a wrong encoder pass. Here every frame leaves its mark."""
    torch.manual_seed(0)
    model = TAEHV(TINY_TAEHV).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 4:
                parameter.normal_(0, math.sqrt(2 / parameter[0].numel()))
            else:
                parameter.uniform_(-0.05, 0.05)
    return model


def published_encode_video(state: dict, video: torch.Tensor) -> torch.Tensor:
    """A reference of the published ``encode_video``, straight from a state dict, one
    frame at a time: video [N, T, 3, H, W] in [0, 1] -> latents [N, ceil(T / 4), C, h, w].

    As published: the clip is padded at its end to a multiple of 4 frames with copies
    of its last frame; a time pool of stride s stacks s consecutive frames on channels
    (earliest first) under a 1x1 conv; a MemBlock sees [frame, the previous frame's
    input] (zeros before the first) and adds its input back before a ReLU."""
    def weight(index, name="weight"):
        return state.get(f"encoder.{index}.{name}")

    frames = list(video.unbind(1))
    frames += [frames[-1]] * (-len(frames) % 4)
    for kind, index, stride in PUBLISHED_ENCODER:
        if kind == "conv":
            frames = [torch.nn.functional.conv2d(f, weight(index), weight(index, "bias"), stride=stride, padding=1)
                      for f in frames]
        elif kind == "relu":
            frames = [torch.relu(f) for f in frames]
        elif kind == "pool":
            frames = [torch.nn.functional.conv2d(torch.cat(frames[i:i + stride], dim=1), weight(index, "conv.weight"))
                      for i in range(0, len(frames), stride)]
        else:
            outputs, past = [], torch.zeros_like(frames[0])
            for f in frames:
                h = torch.cat([f, past], dim=1)
                for layer in (0, 2, 4):
                    h = torch.nn.functional.conv2d(h, weight(index, f"conv.{layer}.weight"),
                                                   weight(index, f"conv.{layer}.bias"), padding=1)
                    h = torch.relu(h) if layer < 4 else h
                outputs.append(torch.relu(h + f))
                past = f
            frames = outputs
    return torch.stack(frames, dim=1)


def random_clip(frames: int, batch: int = 1, size: int = 16, seed: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=generator) * 2 - 1


def held_first_frame(clip: torch.Tensor) -> torch.Tensor:
    """The clip as the published encoder sees it here: [0, 1], NTCHW, frame 0 repeated 3 times in front."""
    video = ((clip + 1) / 2).transpose(1, 2)
    return torch.cat([video[:, :1].expand(-1, 3, -1, -1, -1), video], dim=1)


def test_encode_equals_the_published_encoder_on_the_whole_clip(lively):
    clip = random_clip(9, batch=2)
    ours = lively.encode(clip, native=True)
    assert ours.shape == (2, 16, 3, 2, 2)
    reference = published_encode_video(lively.state_dict(), held_first_frame(clip)).transpose(1, 2)
    torch.testing.assert_close(ours, reference, **FLOAT32)


def test_published_size_encoder_equals_the_reference_in_float64():
    torch.manual_seed(5)
    model = TAEHV(TAEW2_1).double().eval()
    with torch.no_grad():
        for parameter in model.encoder.parameters():
            if parameter.ndim == 4:
                parameter.normal_(0, math.sqrt(2 / parameter[0].numel()))
    clip = random_clip(5, size=16).double()
    reference = published_encode_video(model.state_dict(), held_first_frame(clip)).transpose(1, 2)
    torch.testing.assert_close(model.encode(clip, native=True), reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunks", [[1, 4, 4, 4, 4], [5, 4, 4, 4], [1, 8, 8], [9, 8], [17]],
                         ids=lambda c: "+".join(map(str, c)))
def test_stream_encode_in_chunks_equals_the_whole_clip(lively, chunks):
    clip = random_clip(17)
    state = lively.new_stream()
    parts = [lively.stream_encode(part, state, native=True) for part in clip.split(chunks, dim=2)]
    assert [p.shape[2] for p in parts] == [1 + (chunks[0] - 1) // 4] + [c // 4 for c in chunks[1:]]
    torch.testing.assert_close(torch.cat(parts, dim=2), lively.encode(clip, native=True), **FLOAT32)
    reference = published_encode_video(lively.state_dict(), held_first_frame(clip)).transpose(1, 2)
    torch.testing.assert_close(torch.cat(parts, dim=2), reference, **FLOAT32)


def test_the_first_latent_is_the_first_frame_held_and_later_ones_see_the_past(lively):
    clip = random_clip(5)
    held = clip[:, :, :1].expand(-1, -1, 4, -1, -1)
    # Latent 0 is frame 0 alone, whatever follows it (the Wan VAE's chunking).
    torch.testing.assert_close(lively.encode(clip, native=True)[:, :, :1], lively.encode(clip[:, :, :1], native=True))
    reference = published_encode_video(lively.state_dict(), ((held + 1) / 2).transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(lively.encode(clip[:, :, :1], native=True), reference, **FLOAT32)
    # Latent 1 depends on frame 0 through the MemBlocks' memory, and on its own frames.
    other_start = torch.cat([-clip[:, :, :1], clip[:, :, 1:]], dim=2)
    latents = lively.encode(clip, native=True)
    assert (latents[:, :, 1] - lively.encode(other_start, native=True)[:, :, 1]).abs().max() > 0.1
    assert (latents - lively.encode(-clip, native=True)).abs().amin(dim=(0, 1, 3, 4)).min() > 0


def test_encode_gives_the_wan_vae_encoders_latent_space(lively):
    from engine.models.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD

    clip = random_clip(5)
    native = lively.encode(clip, native=True)
    mean = torch.tensor(WAN21_LATENT_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(lively.encode(clip), native * std + mean)
    state = lively.new_stream()
    streamed = torch.cat([lively.stream_encode(clip[:, :, :1], state), lively.stream_encode(clip[:, :, 1:], state)], 2)
    torch.testing.assert_close(streamed, lively.encode(clip))


def test_encoder_state_stays_bounded_and_streams_are_separate(lively):
    state, other = lively.new_stream(), lively.new_stream()
    clip = random_clip(1 + 4 * 12, seed=6)
    lively.stream_encode(clip[:, :, :1], state)
    size = state.nbytes()
    for i in range(12):
        assert lively.stream_encode(clip[:, :, 1 + 4 * i:5 + 4 * i], state).shape[2] == 1
        lively.stream_encode(random_clip(5 if i == 0 else 4, seed=7 + i), other)
    assert state.nbytes() == size > 0
    assert sum(t is not None for t in state.encoder_memory) == 9
    assert all(t is None for t in state.memory)  # the decoder's memory is untouched
    fresh = lively.new_stream()
    whole = torch.cat([lively.stream_encode(clip[:, :, :1], fresh), lively.stream_encode(clip[:, :, 1:], fresh)], 2)
    state = lively.new_stream()
    parts = [lively.stream_encode(clip[:, :, :1], state)] + [lively.stream_encode(clip[:, :, 1 + 4 * i:5 + 4 * i], state)
                                                          for i in range(12)]
    torch.testing.assert_close(torch.cat(parts, 2), whole, **FLOAT32)


def test_one_state_encodes_and_decodes_a_stream(lively):
    """TAEHV both ways shares one stream state, as a pipeline whose encoder decodes too."""
    clip = random_clip(5)
    state = lively.new_stream()
    latents = lively.stream_encode(clip, state, native=True)
    frames = lively.stream_decode(latents, state)
    assert frames.shape == (1, 3, 5, 16, 16)
    torch.testing.assert_close(frames, lively.decode(latents))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_encoder_loads_from_a_checkpoint_in_the_published_layout(lively, tmp_path, suffix):
    from safetensors.torch import save_file

    path = tmp_path / f"taew2_1{suffix}"
    state = {k: v.contiguous() for k, v in lively.state_dict().items()}
    assert sum(k.startswith("encoder.") for k in state) == 64  # every encoder tensor, as published
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    loaded = load_taehv(path, TINY_TAEHV)
    clip = random_clip(9)
    torch.testing.assert_close(loaded.encode(clip), lively.encode(clip))
    reference = published_encode_video(state, held_first_frame(clip)).transpose(1, 2)
    torch.testing.assert_close(loaded.encode(clip, native=True), reference, **FLOAT32)


@pytest.mark.parametrize("bad", [
    torch.zeros(1, 3, 1, 16),             # 4-D
    torch.zeros(1, 4, 1, 16, 16),         # not RGB
    torch.zeros(1, 3, 1, 12, 16),         # height not a multiple of 8
    torch.zeros(1, 3, 0, 16, 16),         # no frames
    torch.zeros(1, 3, 4, 16, 16),         # a first chunk is 1 + 4k frames
    [[0.0]],                              # not a tensor
])
def test_bad_frames_raise_value_error_naming_frames(lively, bad):
    with pytest.raises(ValueError, match="frames"):
        lively.stream_encode(bad, lively.new_stream())


def test_later_chunks_must_continue_the_stream(lively):
    state = lively.new_stream()
    lively.stream_encode(random_clip(5), state)
    with pytest.raises(ValueError, match="multiple of 4"):
        lively.stream_encode(random_clip(5), state)
    with pytest.raises(ValueError, match="frames"):
        lively.stream_encode(random_clip(4, size=24), state)
    with pytest.raises(ValueError, match="state"):
        lively.stream_encode(random_clip(1), state={})
