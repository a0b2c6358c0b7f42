"""Deterministic DDIM sampling (η = 0) and DDIM inversion with a partial depth.

Written against the training scheduler's ``alphas_cumprod`` rather than a scheduler's
``step``/``reversed_step`` so both directions use the same timesteps and every
timestep is bounds-checked (MONAI's ``reversed_step`` is not, DESIGN §3).

Timesteps use "trailing" spacing: with T training steps and S sampling steps,
``t_i = round(T − i·T/S) − 1`` for i = 0..S−1, so sampling starts at t = T − 1 (pure
noise) and the last step lands on the clean image (ᾱ = 1).
"""

from __future__ import annotations

from typing import Callable

import torch

# model_fn(x_t (B,C,S,S), t (B,) long) -> network output (B,C,S,S)
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Descending timesteps, ``steps`` of them, first = T − 1, all in [0, T − 1]."""
    steps = max(1, min(int(steps), num_train_timesteps))
    ts = []
    for i in range(steps):
        t = int(round(num_train_timesteps - i * num_train_timesteps / steps)) - 1
        ts.append(min(max(t, 0), num_train_timesteps - 1))
    return ts


def _alpha(alphas_cumprod: torch.Tensor, t: int) -> torch.Tensor:
    """ᾱ_t for t in [0, T−1]; t < 0 means the clean image (ᾱ = 1)."""
    if t < 0:
        return alphas_cumprod.new_tensor(1.0)
    return alphas_cumprod[min(t, alphas_cumprod.shape[0] - 1)]


def split_prediction(out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor,
                     prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂₀, ε̂) from the network output under ``prediction_type`` at ᾱ = ``a``."""
    sa, sb = a.sqrt(), (1 - a).clamp_min(0).sqrt()
    if prediction_type == "v_prediction":
        return sa * x_t - sb * out, sa * out + sb * x_t
    if prediction_type == "epsilon":
        return (x_t - sb * out) / sa.clamp_min(1e-8), out
    return out, (x_t - sa * out) / sb.clamp_min(1e-8)


@torch.no_grad()
def ddim_sample(model_fn: ModelFn, x_t: torch.Tensor, alphas_cumprod: torch.Tensor,
                prediction_type: str, steps: int, start_index: int = 0,
                clip: float | tuple[torch.Tensor, torch.Tensor] | None = 1.0) -> torch.Tensor:
    """Run DDIM (η = 0) from ``x_t`` at ``timesteps[start_index]`` down to x₀.

    ``start_index`` 0 starts from pure noise at t = T − 1; k > 0 starts part way (the
    input must then be at that timestep, e.g. from :func:`ddim_invert`). ``clip``
    clamps x̂₀ to [−clip, clip] at every step, or to ``(lo, hi)`` tensors broadcastable
    to x (None: no clamp, for latents).
    """
    T = alphas_cumprod.shape[0]
    ts = ddim_timesteps(T, steps)
    x = x_t
    for i in range(start_index, len(ts)):
        t = ts[i]
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        a, a_prev = _alpha(alphas_cumprod, t), _alpha(alphas_cumprod, t_prev)
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x0, eps = split_prediction(model_fn(x, tt), x, a, prediction_type)
        if clip is not None:
            x0 = x0.clamp(-clip, clip) if isinstance(clip, (int, float)) else torch.clamp(x0, *clip)
            # keep ε consistent with the clamped x̂₀ so the trajectory stays on the ODE
            eps = (x - a.sqrt() * x0) / (1 - a).clamp_min(1e-8).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@torch.no_grad()
def ddim_invert(model_fn: ModelFn, x0: torch.Tensor, alphas_cumprod: torch.Tensor,
                prediction_type: str, steps: int, depth: float = 1.0) -> tuple[torch.Tensor, int]:
    """Deterministic DDIM inversion of clean ``x0`` up the same timesteps as sampling.

    ``depth`` in (0, 1] is the fraction of the ``steps`` inverted (1 = up to
    t = T − 1). Returns ``(x_t, start_index)`` to pass to :func:`ddim_sample`.
    """
    T = alphas_cumprod.shape[0]
    ts = ddim_timesteps(T, steps)
    n = len(ts)
    k = min(n, max(1, int(round(float(depth) * n))))
    start_index = n - k
    ascending = list(reversed(ts))  # lowest first
    x = x0
    t_cur = -1
    for j in range(k):
        t_next = ascending[j]
        a_cur, a_next = _alpha(alphas_cumprod, t_cur), _alpha(alphas_cumprod, t_next)
        tt = torch.full((x.shape[0],), t_next, dtype=torch.long, device=x.device)
        # ε̂ evaluated at the next (higher) timestep on the current x: the usual
        # first-order approximation of the reversed ODE step
        _, eps = split_prediction(model_fn(x, tt), x, a_next, prediction_type)
        x0_hat = (x - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
        x = a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps
        t_cur = t_next
    return x, start_index


def noise_to(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
             steps: int, depth: float) -> tuple[torch.Tensor, int]:
    """Forward-diffuse ``x0`` with given noise to the timestep of a partial depth.

    Same index convention as :func:`ddim_invert` (depth 1 → pure noise at T − 1).
    """
    T = alphas_cumprod.shape[0]
    ts = ddim_timesteps(T, steps)
    n = len(ts)
    k = min(n, max(1, int(round(float(depth) * n))))
    start_index = n - k
    a = _alpha(alphas_cumprod, ts[start_index])
    if k == n:  # full depth: pure noise, nothing of x0 leaks into a "fresh" sample
        return noise, start_index
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, start_index
