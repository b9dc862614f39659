import math

import pytest
import torch

from engine.motion import MotionNoiseController, MotionSettings


def clip(*levels: float, size: int = 8) -> torch.Tensor:
    """A [1, 3, T, H, W] chunk whose frame f is filled with levels[f]."""
    frames = torch.tensor(levels, dtype=torch.float32).view(1, 1, -1, 1, 1)
    return frames.expand(1, 3, len(levels), size, size).clone()


def t0_of(scale: float) -> int:
    return int(1000 * scale) - 100


def test_first_chunk_gives_the_unmodified_scale():
    controller = MotionNoiseController()
    assert controller.first_chunk(clip(-1, 1, -1, 1, -1)) == (0.8, 700)
    low = MotionNoiseController(MotionSettings(noise_scale=0.7))
    assert low.first_chunk(clip(0, 0, 0, 0, 0)) == (0.7, 600)


def test_still_clip_keeps_the_maximum_scale():
    controller = MotionNoiseController()
    controller.first_chunk(clip(0.3, 0.3, 0.3, 0.3, 0.3))
    for _ in range(10):
        scale, t0 = controller.update(clip(0.3, 0.3, 0.3, 0.3))
        assert scale == pytest.approx(0.8)
        assert t0 == t0_of(scale)


def test_large_motion_lowers_the_scale_towards_the_minimum():
    settings = MotionSettings()
    floor = settings.noise_scale - settings.slope
    controller = MotionNoiseController(settings)
    controller.first_chunk(clip(-1, -1, -1, -1, -1))
    scales = [controller.update(clip(1, -1, 1, -1))[0] for _ in range(6)]
    assert all(later < earlier for earlier, later in zip(scales, scales[1:]))
    assert all(s >= floor - 1e-9 for s in scales)
    assert scales[-1] == pytest.approx(floor, abs=1e-6)
    assert controller.update(clip(1, -1, 1, -1))[1] == t0_of(controller.noise_scale)


def test_partial_motion_follows_the_formula():
    controller = MotionNoiseController()
    controller.first_chunk(clip(0.0))
    # Largest step 0.05 (RMS over pixels) -> d_hat = 0.05 / 0.2.
    scale, t0 = controller.update(clip(0.02, 0.07, 0.07, 0.05))
    d_hat = 0.05 / 0.2
    expected = (0.8 - 0.1 * d_hat) * 0.9 + 0.1 * 0.8
    assert scale == pytest.approx(expected, abs=1e-6)
    assert t0 == t0_of(expected)


def test_first_frame_is_compared_with_the_previous_chunk():
    controller = MotionNoiseController()
    controller.first_chunk(clip(0.0, 0.0, 0.0, 0.0, 0.0))
    # Still inside the chunk, but a cut from the previous chunk's last frame.
    scale, _ = controller.update(clip(0.5, 0.5, 0.5, 0.5))
    assert scale < 0.8 - 0.08


def test_ema_smooths_a_single_jump_and_recovers():
    settings = MotionSettings()
    controller = MotionNoiseController(settings)
    controller.first_chunk(clip(0.0, 0.0, 0.0, 0.0, 0.0))
    still = clip(0.0, 0.0, 0.0, 0.0)
    controller.update(still)
    # One chunk of full motion that ends where the still scene is.
    jumped, _ = controller.update(clip(1.0, -1.0, 1.0, 0.0))
    assert 0.8 - jumped == pytest.approx(settings.ema * settings.slope)
    recovered = [controller.update(still)[0] for _ in range(4)]
    assert recovered[0] > jumped
    assert recovered[-1] == pytest.approx(0.8, abs=1e-4)


def test_unbatched_and_batched_layouts_agree():
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.rand(3, 4, 6, 6, generator=generator) * 0.2 for _ in range(3)]
    first = torch.zeros(3, 5, 6, 6)
    plain, batched = MotionNoiseController(), MotionNoiseController()
    plain.first_chunk(first)
    batched.first_chunk(first[None])
    for chunk in chunks:
        assert plain.update(chunk) == batched.update(chunk[None])


def test_reset_forgets_the_stream():
    controller = MotionNoiseController()
    controller.first_chunk(clip(-1.0))
    controller.update(clip(1.0, -1.0, 1.0, -1.0))
    controller.reset()
    assert controller.noise_scale == 0.8
    with pytest.raises(RuntimeError, match="first_chunk"):
        controller.update(clip(0.0))


@pytest.mark.parametrize("frames", [
    torch.zeros(3, 4, 8),                 # no time axis
    torch.zeros(1, 1, 3, 4, 8, 8),        # too many dims
    torch.zeros(1, 4, 4, 8, 8),           # 4 channels
    torch.zeros(1, 3, 0, 8, 8),           # no frames
    torch.zeros(1, 3, 4, 8, 8, dtype=torch.uint8),
    torch.full((1, 3, 4, 8, 8), math.nan),
    [[0.0]],
])
def test_bad_frames_name_the_argument(frames):
    controller = MotionNoiseController()
    with pytest.raises(ValueError, match="frames"):
        controller.first_chunk(frames)
    controller.first_chunk(clip(0.0))
    with pytest.raises(ValueError, match="frames"):
        controller.update(frames)


def test_a_new_resolution_needs_a_reset():
    controller = MotionNoiseController()
    controller.first_chunk(clip(0.0, size=8))
    with pytest.raises(ValueError, match="frames"):
        controller.update(clip(0.0, size=16))


@pytest.mark.parametrize("field, value", [
    ("noise_scale", 1.5), ("slope", -0.1), ("ema", 0.0), ("diff_scale", 0.0), ("timestep_offset", -1)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MotionSettings(**{field: value})
