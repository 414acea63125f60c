"""Flow matching in UltraShape's time convention: t = 0 is noise, t = 1 is data.

    x_t = t * x1 + (1 - t) * x0,   x0 ~ N(0, I),   target velocity u = x1 - x0
    training: t ~ U[0, 1], loss = mean((v(x_t, t) - u)^2)           (official: Linear path, velocity)
    sampling: sigmas = linspace(0, 1, steps) followed by 1; x += (sigma[i+1] - sigma[i]) * v(x, sigma[i])
              with classifier-free guidance v = v_u + g * (v_c - v_u)

The official Euler schedule ends with sigma[steps-1] = 1 followed by the appended 1, so its last
model call is multiplied by dt = 0: we skip that call (identical output, one DiT pass fewer).
"""

from __future__ import annotations

from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, N, C), t (B,)) -> v


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, u) for noise x0, data x1 and times t (B,)."""
    tt = t.view(-1, *([1] * (x1.ndim - 1))).to(x1.dtype)
    return tt * x1 + (1 - tt) * x0, x1 - x0


def flow_matching_loss(
    velocity_fn: VelocityFn,
    x1: torch.Tensor,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean-squared velocity error (scalar), official 'Linear / velocity / uniform t'.

    x1: DiT-space latents (B, N, C). velocity_fn(x_t, t) runs the model with its conditioning.
    Pass t and noise to make a step reproducible; otherwise they are drawn (from `generator`).
    """
    B = x1.shape[0]
    gdev = generator.device if generator is not None else x1.device
    if t is None:
        t = torch.rand(B, generator=generator, device=gdev).to(x1.device)
    if noise is None:
        noise = torch.randn(x1.shape, generator=generator, device=gdev).to(x1.device, x1.dtype)
    xt, u = interpolate(noise, x1, t)
    v = velocity_fn(xt, t.to(x1.dtype))
    if v.shape != x1.shape:
        raise ValueError(f"velocity has shape {tuple(v.shape)}, expected {tuple(x1.shape)}")
    return ((v.float() - u.float()) ** 2).mean()


def euler_sigmas(steps: int) -> torch.Tensor:
    """The official schedule: linspace(0, 1, steps) then a final 1 (float32, length steps + 1)."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the official schedule spends its last step at t=1), got {steps}")
    return torch.cat([torch.linspace(0, 1, steps, dtype=torch.float64).float(), torch.ones(1)])


@torch.no_grad()
def sample_euler(
    cond_fn: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor],
    noise: torch.Tensor,
    steps: int = 50,
    guidance: float = 5.0,
    batched_cfg: bool = True,
    progress: bool = False,
    guidance_until: float = 1.0,
) -> torch.Tensor:
    """Integrate from noise (t=0) to data (t=1) with classifier-free guidance.

    cond_fn(x, t, branch) -> velocity, branch one of:
      "both":   x and t are the batch doubled as [conditional; unconditional]; return both halves
                in that order (one DiT call per step: batched CFG);
      "cond" / "uncond": x is the plain batch, run with the image / the zero context.
    guidance < 0 disables guidance (conditional only), as officially (guidance >= 0 means CFG on).
    Latents are kept in float32 between steps.
    guidance_until < 1 is a speed-up that changes the result (guidance interval): steps at
    t >= guidance_until run the conditional branch alone (half the tokens). 1.0 = official.
    """
    from tqdm.auto import tqdm

    sigmas = euler_sigmas(steps)
    x = noise.float()
    B = x.shape[0]
    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        dt = float(sigmas[i + 1] - sigmas[i])
        if dt == 0.0:  # official last step: multiplied by zero, skip the model call
            continue
        t = torch.full((B,), float(sigmas[i]), device=x.device)
        if guidance >= 0 and float(sigmas[i]) < guidance_until:
            if batched_cfg:
                v = cond_fn(torch.cat([x, x]), torch.cat([t, t]), "both").float()
                vc, vu = v.chunk(2)
            else:
                vc = cond_fn(x, t, "cond").float()
                vu = cond_fn(x, t, "uncond").float()
            v = vu + guidance * (vc - vu)
        else:
            v = cond_fn(x, t, "cond").float()
        x = x + dt * v
    return x
