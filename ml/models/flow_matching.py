"""Flow matching in UltraShape's time convention: t = 0 is noise, t = 1 is data.

    x_t = t * x1 + (1 - t) * x0,   x0 ~ N(0, I),   target velocity u = x1 - x0
    training: t ~ U[0, 1], loss = mean((v(x_t, t) - u)^2)           (official: Linear path, velocity)
    sampling: sigmas = linspace(0, 1, steps) followed by 1; x += (sigma[i+1] - sigma[i]) * v(x, sigma[i])
              with classifier-free guidance v = v_u + g * (v_c - v_u)

The official Euler schedule ends with sigma[steps-1] = 1 followed by the appended 1, so its last
model call is multiplied by dt = 0: we skip that call (identical output, one DiT pass fewer).
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class DeepCache:
    """One kept DiT state for sample_euler's step caching (cache_interval > 1), one per batch layout.

    sample_euler hands it to cond_fn as the keyword `cache`; cond_fn runs
    `v, cache.h = dit.forward_cached(..., cache_depth=cache.depth, h_mid=cache.h)` and returns v.
    h None: this call must be a full one, and it refills h."""

    depth: int  # shallow blocks run fresh on a cached call (refine.cache_depth)
    h: torch.Tensor | None = None  # hidden state entering block depth - depth, from the last full call


@torch.no_grad()
def sample_euler(
    cond_fn: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    steps: int = 50,
    guidance: float = 5.0,
    batched_cfg: bool = True,
    progress: bool = False,
    guidance_until: float = 1.0,
    cache_interval: int = 1,
    cache_depth: int = 2,
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
    cache_interval > 1 is a speed-up that changes the result (DeepCache-style): step i runs the full DiT
    when i % cache_interval == 0, on the first step and whenever the guidance mode changes (the kept state
    must have this step's batch layout); the other steps reuse the deep blocks' state from the last full
    step and run only the first and last cache_depth blocks. cond_fn is then called with a keyword
    `cache=DeepCache(...)` (see DeepCache), one per branch name, so batched CFG keeps cond and uncond
    together and split CFG keeps each alone. 1 = official: cond_fn is called exactly as without caching.
    """
    from tqdm.auto import tqdm

    if isinstance(cache_interval, bool) or not isinstance(cache_interval, int) or cache_interval < 1:
        raise ValueError(f"cache_interval (refine.cache_interval) must be an integer >= 1 (1 = off, the official "
                         f"sampler), got {cache_interval!r}")
    if isinstance(cache_depth, bool) or not isinstance(cache_depth, int) or cache_depth < 1:
        raise ValueError(f"cache_depth (refine.cache_depth) must be an integer >= 1, got {cache_depth!r}")
    sigmas = euler_sigmas(steps)
    x = noise.float()
    B = x.shape[0]
    caches: dict[str, DeepCache] = {}  # branch -> kept state, for the current guidance mode only
    mode = None

    def call(xx, tt, branch, full):
        if cache_interval == 1:
            return cond_fn(xx, tt, branch).float()
        c = caches.setdefault(branch, DeepCache(cache_depth))
        if full:
            c.h = None
        v = cond_fn(xx, tt, branch, cache=c).float()
        if c.h is None:
            raise RuntimeError("cond_fn was given cache=DeepCache(...) but left cache.h empty: it must run "
                               "`v, cache.h = dit.forward_cached(..., cache_depth=cache.depth, h_mid=cache.h)`")
        return v

    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        dt = float(sigmas[i + 1] - sigmas[i])
        if dt == 0.0:  # official last step: multiplied by zero, skip the model call
            continue
        t = torch.full((B,), float(sigmas[i]), device=x.device)
        guided = guidance >= 0 and float(sigmas[i]) < guidance_until
        step_mode = ("both" if batched_cfg else "split") if guided else "cond"
        if step_mode != mode:  # a new batch layout: the kept states do not fit it
            caches.clear()
            mode = step_mode
        full = i % cache_interval == 0 or not caches
        if guided:
            if batched_cfg:
                v = call(torch.cat([x, x]), torch.cat([t, t]), "both", full)
                vc, vu = v.chunk(2)
            else:
                vc = call(x, t, "cond", full)
                vu = call(x, t, "uncond", full)
            v = vu + guidance * (vc - vu)
        else:
            v = call(x, t, "cond", full)
        x = x + dt * v
    return x
