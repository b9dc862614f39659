"""Slot choice of the rolling KV cache, adaptive sink replacement included."""

from dataclasses import replace

import pytest
import torch

from engine.config import get_preset
from engine.models.kv_cache import KVCache

DIM = 4  # one head of width 4 in one layer; one token per frame


def make_cache(threshold: float) -> KVCache:
    config = replace(get_preset("tiny"), dim=12, num_heads=1, num_layers=1,
                     num_kv_cache=4, num_sink=2, adapt_sink_threshold=threshold)
    cache = KVCache(config, batch=1, frame_tokens=1)
    cache.layout = [-1] * 4  # what the test has seen written where
    return cache


def write(cache: KVCache, direction) -> list[int]:
    """Write the next frame with key = value along ``direction``; return which
    frame each slot of the layer holds afterwards, read from the buffer itself."""
    frame = cache.frame_start[0]
    kv = torch.zeros(1, 1, 1, 12)
    # a per-frame length makes every write visible; cosine similarity ignores it
    kv[0, 0, 0, :len(direction)] = torch.tensor(direction, dtype=torch.float32) * (1 + frame / 10)
    before = cache.keys[0].clone()
    cache.write(0, kv, kv, cache.begin_write(1))
    cache.advance()
    changed = [s for s in range(4) if not torch.equal(before[0, s], cache.keys[0][0, s])]
    assert len(changed) == 1, "a frame is written to exactly one slot"
    cache.layout[changed[0]] = frame
    return list(cache.layout)


def fill(cache: KVCache) -> None:
    write(cache, [1, 0, 0])  # sink 0
    write(cache, [0, 1, 0])  # sink 1
    write(cache, [1, 1, 0])  # ring
    assert write(cache, [1, 1, 0]) == [0, 1, 2, 3]


def test_a_frame_like_the_sinks_goes_to_the_ring():
    cache = make_cache(threshold=0.2)
    fill(cache)
    # cosine 0.71 with both sinks: above the threshold, the oldest ring frame goes
    assert write(cache, [1, 1, 0]) == [0, 1, 4, 3]


def test_an_unlike_frame_replaces_the_least_similar_sink():
    cache = make_cache(threshold=0.2)
    fill(cache)
    # cosine with sink 0 is 0.1 (< 0.2), with sink 1 it is 0.995: sink 0 is replaced
    assert write(cache, [0.1, 1, 0]) == [4, 1, 2, 3]
    # the ring was left alone; the next ordinary frame evicts the oldest ring frame
    assert write(cache, [1, 1, 0]) == [4, 1, 5, 3]
    # frame 4, now a sink, is compared by its own direction: a frame opposite to it
    # replaces it rather than sink 1 (which the old sink 0 would have lost to)
    assert write(cache, [-0.1, -1, 0]) == [6, 1, 5, 3]
    # the host reads each decision at the next write: then its layout has frame 6
    # in sink 0 and frame 3 back in its ring slot, until frame 7's own decision
    write(cache, [1, 1, 0])
    assert cache.slot_frame[0][:3] == [6, 1, 5]
    cache.begin_write(1)  # frame 8's plan: frame 7 settled in sink 0, frame 8 over frame 3
    assert cache.slot_frame[0] == [7, 1, 5, 8] and cache.layout == [7, 1, 5, 3]


@pytest.mark.parametrize("threshold", [-1.0, 0.0])
def test_no_replacement_when_off_or_the_similarity_is_above_the_threshold(threshold):
    cache = make_cache(threshold=threshold)
    fill(cache)
    # cosine with sink 0 is 0.05 (above 0.0), with sink 1 about 1
    assert write(cache, [0.05, 1, 0]) == [0, 1, 4, 3]


def test_an_opposite_frame_replaces_a_sink_only_once_per_frame():
    cache = make_cache(threshold=0.2)
    fill(cache)
    # negative cosine with both sinks: only the least similar one is replaced
    assert write(cache, [-1, -0.5, 0]) == [4, 1, 2, 3]


def test_sinks_are_not_compared_while_the_cache_fills():
    cache = make_cache(threshold=0.2)
    write(cache, [1, 0, 0])
    # orthogonal to sink 0, but the cache is not full yet: it takes the next empty slot
    assert write(cache, [0, 0, 1]) == [0, 1, -1, -1]
    assert write(cache, [0, -1, 0]) == [0, 1, 2, -1]
