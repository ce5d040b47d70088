"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Algorithm 1): the math alone.

A consistency function f(x_t, t) maps every point of the teacher's probability-flow ODE trajectory to the trajectory's
end, so one evaluation turns noise into a sample. The student learns it from pairs of adjacent points of the
trajectory that the teacher's DDIM solver links, against a slowly moving copy of itself (the target θ⁻):

    grid        t_n = n·k − 1 for n = 1..N, N = T / k, and t_0 = 0   (LCMScheduler's `original_inference_steps` = N)
    x̂_0(F, x, t) = (x − sqrt(1 − ᾱ_t)·F) / sqrt(ᾱ_t)     ε-prediction;  sqrt(ᾱ_t)·x − sqrt(1 − ᾱ_t)·F for v
    f(x, t)     = c_skip(t)·x + c_out(t)·x̂_0(F(x, t), x, t)   the boundary condition c_skip(0) = 1, c_out(0) = 0
    c_skip(t)   = σ_d² / ((s·t)² + σ_d²),  c_out(t) = s·t / sqrt((s·t)² + σ_d²),  σ_d = 0.5, s = timestep_scaling

    1. n ~ U{0, ..., N − 1}, ε ~ N(0, I):   x_{t_{n+1}} = sqrt(ᾱ)·z_0 + sqrt(1 − ᾱ)·ε   (the forward process)
    2. the guided teacher's DDIM step       x̂_{t_n} = sqrt(ᾱ_{t_n})·x̂_0 + sqrt(1 − ᾱ_{t_n})·ε̂   (η = 0)
    3. loss = d(f_θ(x_{t_{n+1}}, t_{n+1}), f_θ⁻(x̂_{t_n}, t_n))   θ⁻ ← μ·θ⁻ + (1 − μ)·θ after every step, no gradient

The student keeps the teacher's parameterisation (its output F is an ε or v prediction), so it starts from the
teacher's weights and is sampled by diffusers' LCMScheduler, whose `step` computes the same f on the same grid (a
test checks the two). Guidance is the teacher's (ldm's form ε(∅) + s·(ε(c) − ε(∅)) is LCM's with w = s − 1), applied
before the solver step; the student learns the guided trajectory at one fixed scale.
"""

from __future__ import annotations

from typing import Literal

import torch

SIGMA_DATA = 0.5  # σ_d of the boundary condition (LCM, after Song et al. 2023)


def skip_grid(num_train_timesteps: int, skip_interval: int) -> torch.Tensor:
    """The N = T / k timesteps t_n = n·k − 1 (n = 1..N) of the teacher's solver, ascending: LCMScheduler's grid."""
    if skip_interval < 1 or num_train_timesteps % skip_interval:
        raise ValueError(f"the skip interval {skip_interval} does not divide the {num_train_timesteps} training "
                         "timesteps")
    return torch.arange(1, num_train_timesteps // skip_interval + 1) * skip_interval - 1


def boundary_scalings(t: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip(t), c_out(t)) as LCMScheduler.get_scalings_for_boundary_condition_discrete: c_skip(0) = 1, c_out(0) =
    0, so f(x, 0) = x; by t = 1 already c_out ≈ 1 (s = 10)."""
    scaled = t.double() * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip.float(), c_out.float()


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


def predicted_x0(output: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x̂_0 from a network output F at x_t (ᾱ_t one per sample): LCMScheduler.step's step 4."""
    a, s = _per_sample(alpha_bar.sqrt(), x), _per_sample((1 - alpha_bar).sqrt(), x)
    if prediction_type == "epsilon":
        return (x - s * output) / a
    if prediction_type == "v_prediction":
        return a * x - s * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"prediction_type {prediction_type!r}: epsilon, v_prediction or sample")


def predicted_noise(output: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """ε̂ from a network output F at x_t: DDIMScheduler.step's step 3."""
    a, s = _per_sample(alpha_bar.sqrt(), x), _per_sample((1 - alpha_bar).sqrt(), x)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return a * output + s * x
    if prediction_type == "sample":
        return (x - a * output) / s
    raise ValueError(f"prediction_type {prediction_type!r}: epsilon, v_prediction or sample")


class ConsistencyDistillation:
    """The grid, the forward process, the teacher's solver step and the consistency function of one teacher (its
    ᾱ schedule and parameterisation) at skip interval k; pure tensor functions, no networks."""

    def __init__(self, alphas_cumprod: torch.Tensor, skip_interval: int, prediction_type: str,
                 timestep_scaling: float = 10.0):
        self.alphas_cumprod = alphas_cumprod.float()
        self.skip_interval = skip_interval
        self.grid = skip_grid(len(alphas_cumprod), skip_interval)
        self.prediction_type, self.timestep_scaling = prediction_type, timestep_scaling

    @property
    def num_points(self) -> int:
        """N: the solver's steps from T − 1 to 0, the most steps the student was distilled for."""
        return len(self.grid)

    def sample_timesteps(self, batch_size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_{n+1}, t_n) for n ~ U{0..N−1}, one pair per sample, from the global RNG (checkpointed, so a resumed run
        draws the same ones)."""
        index = torch.randint(0, self.num_points, (batch_size,), device=device)
        start = self.grid.to(device)[index]
        return start, (start - self.skip_interval).clamp(min=0)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(t.device)[t]

    def noisy(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t)·z_0 + sqrt(1 − ᾱ_t)·ε (DDPMScheduler.add_noise)."""
        alpha_bar = self.alpha_bar(t)
        return _per_sample(alpha_bar.sqrt(), z0) * z0 + _per_sample((1 - alpha_bar).sqrt(), z0) * noise

    def solver_step(self, output: torch.Tensor, x: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """One deterministic DDIM step (η = 0) of the (guided) teacher output at x_{start} to `end`."""
        alpha_start, alpha_end = self.alpha_bar(start), self.alpha_bar(end)
        x0 = predicted_x0(output, x, alpha_start, self.prediction_type)
        eps = predicted_noise(output, x, alpha_start, self.prediction_type)
        return _per_sample(alpha_end.sqrt(), x) * x0 + _per_sample((1 - alpha_end).sqrt(), x) * eps

    def consistency(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x, t) = c_skip(t)·x + c_out(t)·x̂_0(F, x, t) for a network output F at x_t (LCMScheduler.step's
        `denoised`)."""
        c_skip, c_out = boundary_scalings(t, self.timestep_scaling)
        x0 = predicted_x0(output, x, self.alpha_bar(t), self.prediction_type)
        return _per_sample(c_skip, x) * x + _per_sample(c_out, x) * x0


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, kind: Literal["l2", "huber"] = "l2",
                     huber_c: float = 0.001) -> torch.Tensor:
    """Mean distance of the student's f to the target's: squared error (LCM), or pseudo-Huber sqrt(d² + c²) − c
    (Song & Dhariwal 2023), less sensitive to the few large errors of early training."""
    diff = pred.float() - target.float()
    if kind == "l2":
        return diff.square().mean()
    return ((diff.square() + huber_c**2).sqrt() - huber_c).mean()
