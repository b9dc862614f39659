"""The causal DiT and its rolling KV cache (tiny preset, CPU)."""

import torch
import pytest

from engine.config import get_preset
from engine.models.attention import window_mask
from engine.models.dit import CausalWanDiT, StreamInput
from engine.models.rope import rotary_position

LATENT_H, LATENT_W = 4, 6  # 2x3 tokens per frame


def make_model(**cache_settings) -> CausalWanDiT:
    torch.manual_seed(0)
    model = CausalWanDiT(get_preset("tiny").with_cache(**cache_settings)).eval()
    # The published init leaves some projections small; randomise every weight so
    # that each part of the network visibly shapes the output.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def clip(frames: int, batch: int = 1):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 16, frames, LATENT_H, LATENT_W, generator=g)
    timesteps = torch.randint(0, 1000, (batch, frames), generator=g)
    context = torch.randn(1, 7, 32, generator=g)
    return latents, timesteps, context


def stream(model, latents, timesteps, context, frames_per_call=1):
    cache = model.new_cache(latents.shape[0], LATENT_H, LATENT_W)
    outputs = []
    for start in range(0, latents.shape[2], frames_per_call):
        end = start + frames_per_call
        outputs.append(model(latents[:, :, start:end], timesteps[:, start:end], context, cache=cache))
        cache.advance(frames_per_call)
    return torch.cat(outputs, dim=2), cache


@torch.no_grad()
@pytest.mark.parametrize("frames_per_call", [1, 2])
def test_streaming_equals_offline_when_the_cache_holds_every_frame(frames_per_call):
    model = make_model(num_kv_cache=8, num_sink=2, adapt_sink_threshold=-1)
    latents, timesteps, context = clip(8, batch=2)
    streamed, _ = stream(model, latents, timesteps, context, frames_per_call)
    offline = model(latents, timesteps, context, block_size=frames_per_call)
    torch.testing.assert_close(streamed, offline, rtol=1e-5, atol=1e-5)
    # and the causality is real: full attention over the clip gives something else
    assert not torch.allclose(model(latents, timesteps, context), offline, atol=1e-3)


@torch.no_grad()
def test_eviction_keeps_the_sink_and_the_most_recent_frames():
    model = make_model(num_kv_cache=3, num_sink=1, adapt_sink_threshold=-1)
    latents, timesteps, context = clip(12)
    streamed, cache = stream(model, latents, timesteps, context)

    visible = window_mask(12, block_size=1, num_sink=1, num_kv_cache=3)
    for j in range(12):
        assert set(torch.nonzero(visible[j]).flatten().tolist()) == {0, max(j - 1, 0), j}
    torch.testing.assert_close(streamed, model(latents, timesteps, context, block_size=1), rtol=1e-5, atol=1e-5)
    # the sink still holds frame 0; the ring the last two
    assert cache.slot_frame[0][0] == 0
    assert sorted(cache.slot_frame[0][1:]) == [10, 11]


@torch.no_grad()
def test_reprocessing_a_frame_overwrites_its_slot():
    model = make_model(num_kv_cache=3, num_sink=1, adapt_sink_threshold=-1)
    latents, timesteps, context = clip(4)
    cache = model.new_cache(1, LATENT_H, LATENT_W)
    for f in range(4):
        for step in (900, 500, 100):  # three denoising steps of the same frame
            model(latents[:, :, f:f + 1], torch.tensor([[step]]), context, cache=cache)
        cache.advance()
    slots = cache.slot_frame[0]
    assert slots[0] == 0 and sorted(slots[1:]) == [2, 3]


@torch.no_grad()
def test_streams_sharing_a_forward_each_get_what_they_would_alone():
    """Three sessions in one forward: their own caches (positions, sink replacement), prompts and batch widths."""
    model = make_model(num_kv_cache=3, num_sink=1, adapt_sink_threshold=0.5)
    g = torch.Generator().manual_seed(2)
    widths, contexts = (1, 2, 1), [torch.randn(1, 7, 32, generator=g) for _ in range(3)]
    alone = [model.new_cache(width, LATENT_H, LATENT_W) for width in widths]
    shared = [model.new_cache(width, LATENT_H, LATENT_W) for width in widths]
    for cache in alone[1:] + shared[1:]:  # streams at different positions of their own
        cache.advance(3)
    for _ in range(8):  # past the cache size: evictions and sink decisions per stream
        inputs = [StreamInput(torch.randn(width, 16, 1, LATENT_H, LATENT_W, generator=g),
                              torch.randint(0, 1000, (width, 1), generator=g), context, cache)
                  for width, context, cache in zip(widths, contexts, shared)]
        together = model.forward_streams(inputs)
        for part, cache, flow in zip(inputs, alone, together):
            torch.testing.assert_close(flow, model(part.latents, part.timesteps, part.context, cache=cache),
                                       rtol=1e-4, atol=1e-4)
        for cache in alone + shared:
            cache.advance()
    assert [c.slot_frame for c in shared] == [c.slot_frame for c in alone]
    with pytest.raises(ValueError, match=r"inputs\[1\].latents hold frames, height, width \[2, 4, 6\]"):
        model.forward_streams([inputs[0], StreamInput(torch.randn(1, 16, 2, LATENT_H, LATENT_W),
                                                      torch.zeros(1, 2), contexts[2], shared[2])])
    with pytest.raises(ValueError, match=r"inputs\[1\]: cache was made for batch 2"):
        model.forward_streams([inputs[0], StreamInput(inputs[2].latents, inputs[2].timesteps, contexts[2], shared[1])])


def test_the_cross_attention_cache_follows_the_context():
    model = make_model(num_kv_cache=8, num_sink=2, adapt_sink_threshold=-1)
    latents, timesteps, context = clip(1)
    with torch.no_grad():
        cache = model.new_cache(1, LATENT_H, LATENT_W)
        first = model(latents, timesteps, context, cache=cache)
        other = torch.randn_like(context)
        switched = model(latents, timesteps, other, cache=cache)  # same frame, new prompt
        torch.testing.assert_close(switched, model(latents, timesteps, other))
        other.mul_(2)  # edited in place: must not reuse the stale keys
        torch.testing.assert_close(model(latents, timesteps, other, cache=cache), model(latents, timesteps, other))
        assert not torch.allclose(first, switched)


@pytest.mark.slow
@torch.no_grad()
def test_rope_refresh_keeps_a_10000_frame_stream_in_the_table_at_fixed_size():
    model = CausalWanDiT(get_preset("tiny")).eval()
    config = model.config
    positions = [rotary_position(f, config.num_kv_cache, config.rope_refresh_at) for f in range(10_000)]
    assert max(positions) < config.rope_refresh_at <= config.rope_max_positions
    assert positions[:50] == list(range(50)) and positions[50] == config.num_kv_cache - 1
    assert all(b == a + 1 or b == config.num_kv_cache - 1 for a, b in zip(positions, positions[1:]))

    latents = torch.randn(1, 16, 1, 2, 2)
    context = torch.randn(1, 4, 32)
    cache = model.new_cache(1, 2, 2)
    buffers = [t.data_ptr() for t in cache.keys + cache.values]
    size = cache.nbytes()
    t = torch.tensor([[500]])
    for _ in range(10_000):
        out = model(latents, t, context, cache=cache)
        cache.advance()
    assert torch.isfinite(out).all()
    assert cache.nbytes() == size
    assert [t.data_ptr() for t in cache.keys + cache.values] == buffers
    assert sorted(cache.slot_frame[0][config.num_sink:]) == [9_997, 9_998, 9_999]


@pytest.mark.parametrize("bad, argument", [
    (dict(latents=torch.randn(1, 15, 1, 4, 6)), "channels"),
    (dict(latents=torch.randn(1, 16, 1, 5, 6)), "multiples of the patch"),
    (dict(latents=torch.randn(16, 1, 4, 6)), "latents"),
    (dict(timesteps=torch.tensor([700])), "timesteps"),
    (dict(timesteps=torch.tensor([[700, 500]])), "timesteps"),
    (dict(context=torch.randn(1, 7, 31)), "context"),
    (dict(context=torch.randn(1, 33, 32)), "text_len"),
    (dict(block_size=0), "block_size"),
])
def test_bad_arguments_name_the_argument(bad, argument):
    model = make_model()
    latents, timesteps, context = clip(1)
    arguments = dict(latents=latents, timesteps=timesteps, context=context) | bad
    block_size = arguments.pop("block_size", None)
    with pytest.raises(ValueError, match=argument):
        model(**arguments, block_size=block_size)


def test_a_cached_call_rejects_more_frames_than_the_ring_holds():
    model = make_model(num_kv_cache=3, num_sink=1, adapt_sink_threshold=-1)
    latents, timesteps, context = clip(3)
    with pytest.raises(ValueError, match="latents hold 3 frames"):
        model(latents, timesteps, context, cache=model.new_cache(1, LATENT_H, LATENT_W))
