"""StreamPipeline on the tiny preset (CPU): frames in, stylised frames out."""

import tracemalloc

import numpy as np
import pytest
import torch

from engine.models.weights import build_models
from engine.pipeline import StreamPipeline, StreamSettings, push_streams
from live_tensors import tensor_storages


@pytest.fixture(scope="module")
def models():
    return build_models("tiny")


def make(models, **settings) -> StreamPipeline:
    settings = dict(height=32, width=48, prompt="a cat") | settings
    return StreamPipeline(models.dit, models.vae, models.text_encoder, StreamSettings(**settings))


def clip(frames: int, height=40, width=60, seed=0) -> np.ndarray:
    """A moving gradient with some noise: uint8 RGBA [frames, h, w, 4]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((frames, height, width, 4), np.uint8)
    for f in range(frames):
        out[f, ..., 0] = (x * 4 + f * 9) % 256
        out[f, ..., 1] = (y * 5 + f * 3) % 256
        out[f, ..., 2] = rng.integers(0, 255, (height, width))
        out[f, ..., 3] = 255
    return out


def stream(pipe: StreamPipeline, video: np.ndarray) -> list[np.ndarray]:
    first = pipe.first_chunk_frames
    outputs = [pipe.push(video[:first])]
    for start in range(first, len(video), 4):
        outputs.append(pipe.push(video[start:start + 4]))
    return outputs


@pytest.mark.parametrize("stream_batch, steps", [(True, 2), (True, 3), (False, 2)])
def test_every_frame_after_the_lag_has_one_output_in_order(models, stream_batch, steps):
    pipe = make(models, steps=steps, stream_batch=stream_batch)
    video = clip(5 + 4 * 6)
    outputs = stream(pipe, video)
    assert pipe.lag_frames == (4 * (steps - 1) if stream_batch else 0)
    counts = [len(o) for o in outputs]
    lag_chunks = pipe.lag_frames // 4
    assert counts == [5] + [0] * lag_chunks + [4] * (6 - lag_chunks)
    assert sum(counts) == len(video) - pipe.lag_frames
    for o in outputs:
        assert o.dtype == np.uint8 and o.shape[1:] == (40, 60, 3)


def test_the_same_seed_gives_the_same_video_and_another_seed_another(models):
    video = clip(13)
    a = np.concatenate(stream(make(models, seed=7), video))
    b = np.concatenate(stream(make(models, seed=7), video))
    c = np.concatenate(stream(make(models, seed=8), video))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def chunks(pipe: StreamPipeline, video: np.ndarray) -> list[np.ndarray]:
    first = pipe.first_chunk_frames
    return [video[:first]] + [video[start:start + 4] for start in range(first, len(video), 4)]


SESSIONS = [dict(prompt="a cat", steps=2), dict(prompt="a dog", steps=3, seed=5),
            dict(prompt="ink", steps=2, stream_batch=False), dict(prompt="fog", low_latency_start=True, steps=2)]


def stream_together(pipes: list[StreamPipeline], videos: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Every pipeline's k-th chunk in the k-th push_streams, as the worker batches sessions."""
    outputs = [[] for _ in pipes]
    for step in zip(*(chunks(pipe, video) for pipe, video in zip(pipes, videos))):
        for out, finished in zip(outputs, push_streams(pipes, list(step))):
            assert not isinstance(finished, Exception), finished
            out.append(finished)
    return outputs


def test_sessions_stepped_together_get_the_frames_they_would_get_alone(models):
    """Different prompts, seeds, step counts and modes, and first chunks of 5 and 1 frames:
    the DiT calls of the same size run as one forward, each against its own caches."""
    videos = [clip(21 if not s.get("low_latency_start") else 17, seed=i) for i, s in enumerate(SESSIONS)]
    alone = [np.concatenate(stream(make(models, **s), video)) for s, video in zip(SESSIONS, videos)]
    calls = []
    forward_streams = models.dit.forward_streams
    try:
        models.dit.forward_streams = lambda inputs: calls.append(len(inputs)) or forward_streams(inputs)
        together = stream_together([make(models, **s) for s in SESSIONS], videos)
    finally:
        del models.dit.forward_streams
    for expected, got in zip(alone, together):
        got = np.concatenate(got)
        assert got.shape == expected.shape
        assert np.abs(got.astype(int) - expected).max() <= 1  # float rounding of a batched matmul
    assert max(calls) == len(SESSIONS)  # all four in one forward at some point, not one by one


def test_a_session_that_fails_inside_a_shared_step_fails_alone(models):
    pipes = [make(models, **s) for s in SESSIONS[:3]]
    for pipe, video in zip(pipes, [clip(5, seed=i) for i in range(3)]):
        pipe.push(video)
    frames = [clip(4, seed=i) for i in range(3)]
    frames[1] = frames[1][..., :2]  # two channels: this host's frames are broken
    results = push_streams(pipes, frames)
    assert isinstance(results[1], ValueError) and "3 or 4" in str(results[1])
    assert all(isinstance(r, np.ndarray) for r in (results[0], results[2]))


def test_a_shared_forward_that_runs_out_of_memory_is_run_stream_by_stream(models):
    """One stream's rows fit where three streams' do not: the failure comes part-way through
    the forward (caches half written, slots planned), and the retry alone gives every stream
    the frames it gets alone, past the cache's size (sinks replaced as they would be)."""
    videos = [clip(37, seed=i) for i in range(3)]
    alone = [np.concatenate(stream(make(models), video)) for video in videos]
    block = models.dit.blocks[1]
    block_forward = block.forward

    def out_of_memory_beyond_two_rows(x, *args, **kwargs):
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return block_forward(x, *args, **kwargs)

    try:
        block.forward = out_of_memory_beyond_two_rows
        together = stream_together([make(models) for _ in range(3)], videos)
    finally:
        del block.forward
    for expected, got in zip(alone, together):
        assert np.abs(np.concatenate(got).astype(int) - expected).max() <= 1


def test_without_stream_batching_a_chunk_may_hold_two_latent_frames(models):
    pipe = make(models, stream_batch=False, steps=2)
    calls = []
    forward_streams = models.dit.forward_streams
    try:
        models.dit.forward_streams = lambda inputs: calls.append(inputs[0].latents.shape[2]) or forward_streams(inputs)
        counts = [len(pipe.push(chunk)) for chunk in (clip(5), clip(8, seed=1), clip(4, seed=2), clip(8, seed=3))]
    finally:
        del models.dit.forward_streams
    assert counts == [5, 8, 4, 8]
    assert calls == [2, 2, 2, 2, 1, 1, 2, 2]  # 2 steps per chunk; an 8-frame chunk is one 2-latent forward per step
    assert pipe.next_latent == 2 + 2 + 1 + 2
    batched = make(models, stream_batch=True)
    batched.push(clip(5))
    assert batched.chunk_sizes == (4,)
    with pytest.raises(ValueError, match="takes 4$"):
        batched.push(clip(8))


def test_low_latency_start_answers_the_first_frame_alone(models):
    pipe = make(models, low_latency_start=True, stream_batch=False)
    video = clip(1 + 4 * 3)
    counts = [len(o) for o in stream(pipe, video)]
    assert counts == [1, 4, 4, 4]


def test_a_prompt_change_applies_at_the_next_chunk_without_rebuilding(models):
    video = clip(5 + 4 * 4)
    kept = make(models)
    changed = make(models)
    out_kept, out_changed = [], []
    for i, (start, end) in enumerate([(0, 5), (5, 9), (9, 13), (13, 17), (17, 21)]):
        if i == 3:
            cache = changed.cache
            assert changed.update(prompt="a watercolour dog") is False
            assert changed.cache is cache  # the KV cache is kept
        out_kept.append(kept.push(video[start:end]))
        out_changed.append(changed.push(video[start:end]))
    for i in range(3):
        np.testing.assert_array_equal(out_kept[i], out_changed[i])
    assert not np.array_equal(out_kept[4], out_changed[4])


def test_reload_settings_rebuild_the_stream(models):
    pipe = make(models)
    stream(pipe, clip(9))
    assert pipe.update(steps=1) is True
    assert pipe.cache is None and pipe.lag_frames == 0
    assert len(pipe.push(clip(5))) == 5


@pytest.mark.parametrize("fit", ["crop", "letterbox", "stretch"])
def test_each_fit_mode_returns_the_host_size(models, fit):
    pipe = make(models, fit=fit, stream_batch=False)
    out = pipe.push(clip(5, height=30, width=90))
    assert out.shape == (5, 30, 90, 3)


def test_text_to_video_needs_no_input(models):
    pipe = make(models, mode="t2v", stream_batch=False)
    counts = [len(pipe.push(None)) for _ in range(3)]
    assert counts == [5, 4, 4]


@pytest.mark.parametrize("bad, problem", [
    (clip(5).astype(np.int32), "dtype"),
    (clip(5)[..., :2], "3 or 4"),
    (clip(0), "empty"),
    (np.full((5, 8, 8, 3), np.nan, np.float32), "NaN"),
    (clip(4), "takes 5"),
    ("not frames", "array"),
])
def test_bad_input_names_the_problem_and_the_pipeline_goes_on(models, bad, problem):
    pipe = make(models, stream_batch=False)
    with pytest.raises(ValueError, match=problem):
        pipe.push(bad)
    assert len(pipe.push(clip(5))) == 5
    assert len(pipe.push(clip(4))) == 4


@pytest.mark.parametrize("bad", [dict(height=30), dict(steps=5), dict(fit="zoom"), dict(strength=0.05)])
def test_bad_settings_are_refused(models, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        make(models, **bad)


def memory_in_use(device: torch.device) -> dict[str, int]:
    """What a stream may pile up, each where it is counted: tensors alive (found by walking
    Python's objects, which tracemalloc does not see into) and their storages' bytes, each
    storage once; the device allocator's bytes on a GPU; Python's own allocations."""
    tensors, tensor_bytes = tensor_storages()
    return {"live tensors": tensors, "tensor bytes": tensor_bytes,
            "device bytes": torch.cuda.memory_allocated(device) if device.type == "cuda" else 0,
            "python bytes": tracemalloc.get_traced_memory()[0]}


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_a_2000_frame_stream_keeps_memory_flat(device):
    models = build_models("tiny", device=device)
    pipe = make(models)
    video = clip(9)
    pipe.push(video[:5])
    seen = []
    tracemalloc.start()
    try:
        for i in range(500):  # 4 frames a chunk: 2,000 frames
            pipe.push(video[1:5] if i % 2 else video[5:9])
            if i in (100, 499):  # long past the caches' filling up
                seen.append({"cache bytes": pipe.cache.nbytes(), "vae state bytes": pipe.vae_state.nbytes(),
                             **memory_in_use(torch.device(device))})
    finally:
        tracemalloc.stop()
    after_100, after_500 = seen
    grown = {what: after_500[what] - after_100[what] for what in after_100}
    assert grown.pop("python bytes") < 1_000_000  # Python's own small caches may settle a little later
    assert not any(grown.values()), f"400 chunks later, grown by {grown}, from {after_100}"


def test_the_taehv_decoder_streams_the_same_frame_counts():
    models = build_models("tiny", taehv=True)
    pipe = StreamPipeline(models.dit, models.vae, models.text_encoder,
                          StreamSettings(height=32, width=48, steps=1), decoder=models.decoder)
    counts = [len(o) for o in stream(pipe, clip(5 + 4 * 3))]
    assert counts == [5, 4, 4, 4]


def test_the_text_encoder_can_leave_the_device_after_encoding(models):
    pipe = StreamPipeline(models.dit, models.vae, models.text_encoder, StreamSettings(height=32, width=48),
                          offload_text_encoder=True)
    encoder = pipe.prompts.encoder
    assert encoder.offloaded
    before = pipe.context.clone()
    pipe.update(prompt="another prompt")
    assert encoder.offloaded and not torch.equal(before, pipe.context)
    pipe.update(prompt="")  # seen before: from the cache, the encoder stays off
    torch.testing.assert_close(pipe.context, before)


def test_a_low_strength_keeps_the_first_timestep_valid(models):
    pipe = make(models, strength=0.1, stream_batch=False)
    video = clip(13, seed=3)
    stream(pipe, video)
    assert pipe.motion.first_timestep(pipe.motion.noise_scale) >= 0
    pipe.update(strength=0.15)
    assert pipe.motion.settings.noise_scale - pipe.motion.settings.slope >= 0.1 - 1e-9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned memory)")
def test_frames_through_pinned_memory_equal_the_pageable_path():
    """model_frames uploads through pinned memory and host_frames downloads through it, with
    non-blocking copies: the frames must be those of plain .to(device) and .cpu()."""
    from engine.pipeline import downloaded, model_frames, uploaded

    video = clip(5)
    settings = StreamSettings(height=32, width=48)
    fitted, _ = model_frames(video, (5,), settings, device="cuda", dtype=torch.float32)
    pageable, _ = model_frames(video, (5,), settings, device="cpu", dtype=torch.float32)
    assert fitted.is_cuda
    torch.testing.assert_close(fitted.cpu(), pageable, rtol=0, atol=1e-4)  # the GPU's resize rounds apart
    frames = torch.from_numpy(video).cuda()
    torch.testing.assert_close(uploaded(torch.from_numpy(video), "cuda"), frames, rtol=0, atol=0)
    np.testing.assert_array_equal(downloaded(frames * 2), (frames * 2).cpu().numpy())
