import pytest
import torch

from engine.flow import (add_noise, denoising_steps, scheduler_grid, sigma_for_timestep,
                         x0_from_flow)


def test_grid_is_shifted_linear_schedule():
    sigmas, timesteps = scheduler_grid()
    assert sigmas.shape == timesteps.shape == (1000,)
    assert sigmas[0] == 1.0 and 0 < sigmas[-1] < 0.01
    assert torch.all(sigmas[1:] < sigmas[:-1])
    # Shift 8 bends the grid towards high noise: the unshifted midpoint 0.5 becomes 8/9.
    assert sigmas[500] == pytest.approx(8 * 0.5 / (1 + 7 * 0.5))
    assert torch.allclose(timesteps, 1000 * sigmas)


@pytest.mark.parametrize("t", [700, 500, 400, 200])
def test_sigma_of_published_timesteps_is_about_t_over_1000(t):
    sigmas, timesteps = scheduler_grid()
    sigma = sigma_for_timestep(t)
    assert sigma.item() == pytest.approx(t / 1000, abs=3e-3)
    # It is the grid point nearest to t, not an interpolation.
    assert sigma.item() == sigmas[(timesteps - t).abs().argmin()].item()


def test_sigma_for_timestep_keeps_tensor_shape():
    t = torch.tensor([[700, 500], [400, 200]])
    sigma = sigma_for_timestep(t)
    assert sigma.shape == t.shape
    for i in range(2):
        for j in range(2):
            assert sigma[i, j] == sigma_for_timestep(int(t[i, j]))


def test_add_noise_then_x0_from_true_flow_recovers_x0():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 5, 6, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    sigma = sigma_for_timestep(torch.tensor([[700, 500, 400], [200, 700, 500]]))  # one per frame
    x_t = add_noise(x0, noise, sigma)
    assert torch.allclose(x_t[1, 0], (1 - sigma[1, 0]) * x0[1, 0] + sigma[1, 0] * noise[1, 0])
    assert torch.allclose(x0_from_flow(x_t, noise - x0, sigma), x0, atol=1e-6)


def test_dtypes_follow_the_input():
    x0 = torch.randn(1, 2, 4, 4).to(torch.bfloat16)
    noise = torch.randn(1, 2, 4, 4).to(torch.bfloat16)
    x_t = add_noise(x0, noise, 0.7)
    assert x_t.dtype == torch.bfloat16
    x0_back = x0_from_flow(x_t, noise - x0, 0.7)
    assert x0_back.dtype == torch.bfloat16
    assert torch.allclose(x0_back.float(), x0.float(), atol=0.05)


def test_sigma_must_match_leading_dims():
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="sigma"):
        add_noise(x, x, torch.ones(3))
    with pytest.raises(ValueError, match="sigma"):
        x0_from_flow(x, x, torch.ones(2, 4))


def test_published_step_lists():
    assert [denoising_steps(n) for n in (1, 2, 3, 4)] == [
        [700], [700, 500], [700, 500, 400], [700, 500, 400, 200]]


@pytest.mark.parametrize("bad", [0, 5, -1, 2.0, True, "2"])
def test_bad_step_count_names_steps(bad):
    with pytest.raises(ValueError, match="steps"):
        denoising_steps(bad)
