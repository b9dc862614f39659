"""Flow matching as StreamDiffusionV2 uses it.

The model is trained on the straight path ``x_t = (1 - sigma) x0 + sigma noise``
and predicts the flow ``noise - x0``. At inference the scheduler is a fixed grid
of 1000 timesteps, shifted by 8 towards high noise:

    sigma  = linspace(1, 0, 1001)[:-1]
    sigma' = shift * sigma / (1 + (shift - 1) * sigma)
    t      = 1000 * sigma'

A requested timestep (700, 500, ...) is looked up on that grid, so its sigma is
the grid's nearest sigma', close to t / 1000. The shift only shapes the grid.
"""

from __future__ import annotations

import functools

import torch

NUM_TRAIN_TIMESTEPS = 1000
SHIFT = 8.0
# The published step list (``denoising_step_list`` without its trailing 0);
# running n steps keeps its first n entries.
PUBLISHED_STEPS = (700, 500, 400, 200)


@functools.cache
def _grid(device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid, made on the CPU and kept on each device once (not copied per lookup)."""
    if device.type != "cpu":
        return tuple(g.to(device) for g in _grid())
    sigmas = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float64)[:-1]
    sigmas = SHIFT * sigmas / (1 + (SHIFT - 1) * sigmas)
    return sigmas, NUM_TRAIN_TIMESTEPS * sigmas


def scheduler_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """The scheduler's 1000 shifted sigmas (from 1 down towards 0) and their
    timesteps ``1000 * sigma'``, float64 on the CPU."""
    sigmas, timesteps = _grid()
    return sigmas.clone(), timesteps.clone()  # copies: the cached grid must stay intact


def sigma_for_timestep(timestep: float | torch.Tensor) -> torch.Tensor:
    """The grid sigma whose timestep is nearest to ``timestep``.

    Takes a number or a tensor of any shape; returns float64 of the same shape on
    the same device.
    """
    timestep = torch.as_tensor(timestep)
    sigmas, timesteps = _grid(timestep.device)
    distance = (timesteps - timestep.to(torch.float64).reshape(-1, 1)).abs()
    return sigmas[distance.argmin(dim=1)].reshape(timestep.shape)


def denoising_steps(steps: int) -> list[int]:
    """The published timestep list for 1 to 4 denoising steps, e.g. 2 -> [700, 500]."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= len(PUBLISHED_STEPS):
        raise ValueError(f"steps must be an integer from 1 to {len(PUBLISHED_STEPS)}, got {steps!r}")
    return list(PUBLISHED_STEPS[:steps])


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - sigma) x0 + sigma noise`` in x0's dtype.

    ``sigma`` is a number or a tensor whose shape is a leading part of x0's shape:
    [B] gives one sigma per sample, [B, F] one per frame of [B, F, C, H, W] latents.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise has shape {list(noise.shape)}, x0 has {list(x0.shape)}; they must match")
    # Half-precision inputs are mixed in float32 so the result is rounded only once.
    compute = torch.promote_types(x0.dtype, torch.float32)
    sigma = _broadcastable(sigma, x0).to(compute)
    noisy = (1 - sigma) * x0.to(compute) + sigma * noise.to(compute)
    return noisy.to(x0.dtype)


def x0_from_flow(x_t: torch.Tensor, flow: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """The clean sample the predicted flow points to: ``x0 = x_t - sigma flow``.

    Computed in float64 as published (bf16 would visibly blur x0), returned in
    x_t's dtype. ``sigma`` broadcasts as in :func:`add_noise`.
    """
    if flow.shape != x_t.shape:
        raise ValueError(f"flow has shape {list(flow.shape)}, x_t has {list(x_t.shape)}; they must match")
    sigma = _broadcastable(sigma, x_t).to(torch.float64)
    x0 = x_t.to(torch.float64) - sigma * flow.to(torch.float64)
    return x0.to(x_t.dtype)


def _broadcastable(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` on x's device with trailing singleton dims so it broadcasts over x."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.dim() > x.dim() or tuple(sigma.shape) != tuple(x.shape[:sigma.dim()]):
        raise ValueError(f"sigma of shape {list(sigma.shape)} must be a number or match the leading "
                         f"dims of the sample's shape {list(x.shape)}")
    return sigma.reshape(*sigma.shape, *([1] * (x.dim() - sigma.dim())))
