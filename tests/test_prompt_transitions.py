"""Weighted prompts, linear and slerp blends, and prompt transitions, live (tiny model, CPU).

The conditioning is observed where it matters: the text context each DiT call is fed.
A chunk's frames come out of the call that finishes it, so every output frame is
paired with the context of the stream-batch slot that call finished.
"""

import math

import numpy as np
import pytest
import torch

from bridge.protocol import ErrorCode, ProtocolError
from engine.models.text import blend_embeddings
from engine.models.weights import build_models
from engine.pipeline import StreamPipeline, StreamSettings
from engine.session import apply_params

OLD, NEW, NEWER = "a cat", "a dog", "a bird"
CHANGE_AT = 3  # the chunk a change comes before: after the first chunk and two more


@pytest.fixture(scope="module")
def models():
    return build_models("tiny")


@pytest.fixture
def fed(models, monkeypatch) -> list[torch.Tensor]:
    """The text context of every DiT call from here on, in order."""
    contexts = []
    forward_streams = models.dit.forward_streams

    def recording(inputs):
        contexts.extend(part.context for part in inputs)
        return forward_streams(inputs)

    monkeypatch.setattr(models.dit, "forward_streams", recording)
    return contexts


@pytest.fixture
def decoded(models, monkeypatch) -> list[torch.Tensor]:
    """The finished latents the decoder is given from here on, in order."""
    latents = []
    stream_decode = models.vae.stream_decode

    def recording(x0, state):
        latents.append(x0)
        return stream_decode(x0, state)

    monkeypatch.setattr(models.vae, "stream_decode", recording)
    return latents


def make(models, **settings) -> StreamPipeline:
    settings = dict(height=16, width=16, prompt=OLD) | settings
    return StreamPipeline(models.dit, models.vae, models.text_encoder, StreamSettings(**settings))


def encoded(models, prompt: str) -> torch.Tensor:
    return models.text_encoder.encode([prompt])


def clip(frames: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def chunks(pipe: StreamPipeline, video: np.ndarray) -> list[np.ndarray]:
    first = pipe.first_chunk_frames
    return [video[:first]] + [video[start:start + 4] for start in range(first, len(video), 4)]


def finished_context(call_context: torch.Tensor) -> torch.Tensor:
    """A call's context for the chunk it finishes: the last slot's row (one row: every slot's)."""
    return call_context[-1:]


def stream(pipe: StreamPipeline, fed: list, video: np.ndarray, changes: dict[int, dict]
           ) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """Stream ``video`` with ``changes[k]`` applied before chunk k: the outputs, and per
    output frame the context its chunk was finished with. Every change is live."""
    outputs, contexts = [], []
    for index, chunk in enumerate(chunks(pipe, video)):
        if index in changes:
            cache, lanes = pipe.cache, pipe.lanes
            assert pipe.update(**changes[index]) is False
            assert pipe.cache is cache and pipe.lanes is lanes
        out = pipe.push(chunk)
        outputs.append(out)
        contexts += [finished_context(fed[-1])] * len(out)
        if len(out):
            torch.testing.assert_close(pipe.context, contexts[-1], rtol=0, atol=0)
    return outputs, contexts


def frames_before(outputs: list[np.ndarray], chunk: int) -> int:
    return sum(len(out) for out in outputs[:chunk])


def transition_weight(frame: int, length: int) -> float:
    """The rule: output frame k after the change takes the weight of its chunk's last frame
    (chunks of 4 frames), k / length at most 1."""
    return min(4 * math.ceil(frame / 4) / length, 1.0)


# ---------------------------------------------------------------- weighted prompts


def test_weighted_prompts_blend_linear_and_slerp_as_blend_embeddings(models, fed):
    weighted = (("a cat", 1.0), ("a dog in the snow", 3.0))
    by_hand = {method: blend_embeddings([encoded(models, text) for text, _ in weighted], [1.0, 3.0], method)
               for method in ("linear", "slerp")}
    for method, expected in by_hand.items():
        pipe = make(models, prompts=weighted, blend=method)
        torch.testing.assert_close(pipe.context, expected)
        pipe.push(clip(5))
        torch.testing.assert_close(fed[-1], expected)
    assert not torch.allclose(by_hand["linear"], by_hand["slerp"], atol=1e-4)

    pipe = make(models, prompts=weighted, blend="linear")
    assert pipe.update(blend="slerp") is False  # a cut (transition_frames 0), live
    torch.testing.assert_close(pipe.context, by_hand["slerp"])


def test_weighted_prompts_replace_the_prompt_and_take_protocol_lists(models):
    settings = StreamSettings(prompt="ignored", prompts=[["a cat", 1], ["a dog", 2]])
    assert settings.prompts == (("a cat", 1.0), ("a dog", 2.0))
    pipe = make(models, prompt="ignored", prompts=(("a cat", 1.0),))
    torch.testing.assert_close(pipe.context, encoded(models, "a cat"))


@pytest.mark.parametrize("settings, names", [
    (dict(prompts=(("a", 1), ("b", 1), ("c", 1)), blend="slerp"), ("blend", "prompts")),
    (dict(prompts=(("a", 1), ("b", -1))), ("weights",)),
    (dict(prompts=(("a", 0), ("b", 0))), ("weights",)),
    (dict(prompts=(("a", float("nan")),)), ("weights",)),
    (dict(prompts=(("a",),)), ("prompts",)),
    (dict(transition_frames=-1), ("transition_frames",)),
    (dict(transition_frames=257), ("transition_frames",)),
    (dict(transition_frames=2.5), ("transition_frames",)),
])
def test_bad_prompt_settings_are_refused_naming_them(settings, names):
    with pytest.raises(ValueError) as error:
        StreamSettings(**settings)
    assert all(name in str(error.value) for name in names)


def test_a_refused_change_changes_nothing(models):
    pipe = make(models, prompts=(("a", 1.0), ("b", 1.0), ("c", 1.0)))
    settings, context = pipe.settings, pipe.context
    with pytest.raises(ValueError, match="slerp"):
        pipe.update(blend="slerp")
    assert pipe.settings is settings and pipe.context is context


def test_the_engine_answers_slerp_of_three_prompts_with_bad_value():
    three = [["a", 1.0], ["b", 1.0], ["c", 1.0]]
    with pytest.raises(ProtocolError) as error:
        apply_params(StreamSettings(), {}, {}, {"blend": "slerp", "prompts": three})
    assert error.value.code == ErrorCode.BAD_VALUE and "prompts" in str(error.value)


# ---------------------------------------------------------------- transitions


@pytest.mark.parametrize("blend, stream_batch, steps, length", [
    ("linear", True, 2, 12), ("linear", True, 3, 12), ("linear", False, 2, 12), ("slerp", True, 2, 6)])
def test_a_transition_moves_the_context_monotonically_over_exactly_n_output_frames(
        models, fed, blend, stream_batch, steps, length):
    pipe = make(models, blend=blend, stream_batch=stream_batch, steps=steps)
    old, new = encoded(models, OLD), encoded(models, NEW)
    outputs, contexts = stream(pipe, fed, clip(5 + 4 * 7),
                               {CHANGE_AT: dict(prompt=NEW, transition_frames=length)})
    changed_at = frames_before(outputs, CHANGE_AT)
    assert all(torch.equal(context, old) for context in contexts[:changed_at])
    after = contexts[changed_at:]
    assert len(after) > length + 4

    for frame, context in enumerate(after, start=1):  # against the rule, by hand
        weight = transition_weight(frame, length)
        expected = new if weight == 1 else blend_embeddings([old, new], [1 - weight, weight], blend)
        torch.testing.assert_close(context, expected)

    # Monotonic, and at the new context from the chunk that holds frame N on, never before it.
    distances = [float((context - new).norm()) for context in after]
    assert all(later <= earlier for earlier, later in zip(distances, distances[1:]))
    last_frame_short_of_new = 4 * ((length - 1) // 4)
    assert all(distance > 0 for distance in distances[:last_frame_short_of_new])
    assert all(torch.equal(context, new) for context in after[last_frame_short_of_new:])
    assert torch.equal(after[length - 1], new)
    if blend == "linear":  # the blend weight itself, read back off the context
        direction = new - old
        weights = [float(((context - old) * direction).sum() / (direction * direction).sum()) for context in after]
        assert all(0 < w <= 1 for w in weights)
        assert all(later >= earlier for earlier, later in zip(weights, weights[1:]))


def test_frames_inside_a_transition_differ_from_a_cut_and_from_no_change(models, fed, decoded):
    """The tiny model hears its prompt faintly (about 1 grey level at 32x32), so frames are
    compared as uint8 and, to measure, as the latents the decoder is given."""
    video, length = clip(5 + 4 * 6, size=32), 12
    frames, latents = {}, {}
    for name, change in [("none", dict(transition_frames=length)), ("cut", dict(prompt=NEW)),
                         ("transition", dict(prompt=NEW, transition_frames=length))]:
        pipe = make(models, height=32, width=32)
        outputs, _ = stream(pipe, fed, video, {CHANGE_AT: change})
        frames[name], latents[name] = np.concatenate(outputs), list(decoded)
        decoded.clear()
    changed_at = frames_before(outputs, CHANGE_AT)
    inside = slice(changed_at, changed_at + 4 * (length // 4 - 1))  # the chunks short of the new prompt
    first_chunk_inside = sum(1 for out in outputs[:CHANGE_AT] if len(out))
    chunks_inside = slice(first_chunk_inside, first_chunk_inside + length // 4 - 1)
    for other in ("none", "cut"):
        np.testing.assert_array_equal(frames["transition"][:changed_at], frames[other][:changed_at])
        assert all(not np.array_equal(ours, theirs)
                   for ours, theirs in zip(frames["transition"][inside], frames[other][inside])), other
        assert all((ours - theirs).abs().max() > 1e-3
                   for ours, theirs in zip(latents["transition"][chunks_inside], latents[other][chunks_inside])), other

    # After the transition the stream goes on, converging on the cut's (same prompt, same frames).
    assert len(frames["transition"]) == len(video) - pipe.lag_frames
    last = {name: runs[-1] for name, runs in latents.items()}
    assert (last["transition"] - last["cut"]).norm() < 0.2 * (last["transition"] - last["none"]).norm()


def test_an_interrupted_transition_starts_from_where_it_stood(models, fed):
    pipe = make(models)
    old, new, newer = (encoded(models, prompt) for prompt in (OLD, NEW, NEWER))
    interrupt_at = CHANGE_AT + 2  # two chunks into a 16-frame transition: at weight 8/16 by then
    outputs, contexts = stream(pipe, fed, clip(5 + 4 * 8), {
        CHANGE_AT: dict(prompt=NEW, transition_frames=16),
        interrupt_at: dict(prompt=NEWER, transition_frames=8)})
    standing = contexts[frames_before(outputs, interrupt_at) - 1]
    torch.testing.assert_close(standing, blend_embeddings([old, new], [0.5, 0.5]))
    torch.testing.assert_close(pipe.transition.start, standing, rtol=0, atol=0)

    after = contexts[frames_before(outputs, interrupt_at):]
    torch.testing.assert_close(after[0], blend_embeddings([standing, newer], [0.5, 0.5]))
    assert all(torch.equal(context, newer) for context in after[4:])


def test_the_same_prompt_again_leaves_a_running_transition_alone(models, fed):
    pipe = make(models)
    stream(pipe, fed, clip(5 + 4 * 3), {CHANGE_AT: dict(prompt=NEW, transition_frames=16)})
    transition = pipe.transition
    pipe.update(prompt=NEW, transition_frames=4)
    assert pipe.transition is transition


# ---------------------------------------------------------------- live


def test_prompt_changes_keep_the_caches_and_the_stream_batch(models, fed):
    pipe = make(models, steps=3)
    video = clip(5 + 4 * 8)
    changes = [dict(prompt=NEW, transition_frames=8), dict(prompts=((OLD, 1.0), (NEWER, 2.0))),
               dict(blend="slerp"), dict(transition_frames=0), dict(prompts=(), prompt=OLD)]
    outputs, _ = stream(pipe, fed, video, {CHANGE_AT + i: change for i, change in enumerate(changes)})
    assert [len(out) for out in outputs] == [5, 0, 0] + [4] * (len(outputs) - 3)
