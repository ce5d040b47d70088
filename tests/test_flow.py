"""The flow-matching objective's math (ldm.flow), its samplers (ldm.schedulers) and RePaint's flow jump
(ldm.pipelines.repaint): values, an exact solution through the real schedulers, and training σ = sampling σ."""

import re

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, LCMScheduler

from ldm.objectives import flow
from ldm.pipelines.noising import initial_noise_scale, is_flow_matching, noise_latents, scale_model_input
from ldm.pipelines.repaint import flow_renoise, renoise, supports_resampling
from ldm.schedulers import FLOW_SCHEDULERS, SCHEDULERS, make_scheduler, objective_of, scheduler_objective

T = 1000


def test_interpolation_and_velocity_values():
    x, noise = torch.tensor([[2.0, 0.0]]), torch.tensor([[-1.0, 4.0]])
    # x_σ = (1 − σ)·x + σ·ε at σ = 0.25: 0.75·2 − 0.25 = 1.25 and 0 + 1 = 1; the ends are x and ε.
    assert torch.equal(flow.interpolate(x, noise, torch.tensor([0.25])), torch.tensor([[1.25, 1.0]]))
    assert torch.equal(flow.interpolate(x, noise, torch.tensor([0.0])), x)
    assert torch.equal(flow.interpolate(x, noise, torch.tensor([1.0])), noise)
    assert torch.equal(flow.velocity(x, noise), torch.tensor([[-3.0, 4.0]]))  # v = ε − x
    # v is dx_σ/dσ: a finite difference along the path gives it back, at any σ.
    sigma, h = torch.tensor([0.3]), 1e-3
    slope = (flow.interpolate(x, noise, sigma + h) - flow.interpolate(x, noise, sigma)) / h
    torch.testing.assert_close(slope, flow.velocity(x, noise), atol=1e-3, rtol=0)
    # One σ per sample of a batch of images.
    xs, eps = torch.zeros(2, 4, 3, 3), torch.ones(2, 4, 3, 3)
    out = flow.interpolate(xs, eps, torch.tensor([0.1, 0.9]))
    assert torch.allclose(out[0], torch.full((4, 3, 3), 0.1)) and torch.allclose(out[1], torch.full((4, 3, 3), 0.9))


@pytest.mark.parametrize("name", FLOW_SCHEDULERS)
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 17])
def test_exact_velocity_field_takes_the_sampler_to_the_data_point(name, shift, steps):
    """For one data point x*, the exact velocity at (x_σ, σ) is ε − x* = (x_σ − x*)/σ. The real scheduler, handed
    that field at the timesteps it asks about (t = σ·T), must land on x* from any noise, at any step count."""
    scheduler = make_scheduler(name, flow.build_flow_scheduler(T, shift).config)
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    scheduler.set_timesteps(steps)
    x = torch.randn(target.shape, generator=torch.Generator().manual_seed(2)) * initial_noise_scale(scheduler)
    for t in scheduler.timesteps:
        model_input = scale_model_input(scheduler, x, t)
        sigma = t / T  # the network sees t; σ = t / T is what the flow schedulers mean by it
        v = (model_input - target) / sigma
        x = scheduler.step(v, t, x).prev_sample
    torch.testing.assert_close(x, target, atol=1e-5, rtol=0)


def test_training_sigma_map_is_the_schedulers_shift():
    """σ = shift·u / (1 + (shift − 1)·u) is exactly the map the saved scheduler applies to its σ table, and the
    timestep the network is trained at, σ·T, is the one the sampler passes at that σ."""
    scheduler = flow.build_flow_scheduler(T, 3.0)
    unshifted = torch.arange(T, 0, -1, dtype=torch.float32) / T
    torch.testing.assert_close(flow.shifted(unshifted, 3.0), scheduler.sigmas, atol=1e-6, rtol=0)
    scheduler.set_timesteps(10)
    torch.testing.assert_close(flow.timesteps_of(scheduler.sigmas[:-1], T), scheduler.timesteps, atol=1e-3, rtol=0)


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kolmogorov–Smirnov distance between two samples' empirical distributions."""
    grid = torch.cat([a, b]).sort().values
    cdf = [torch.searchsorted(s.sort().values, grid, right=True) / len(s) for s in (a, b)]
    return (cdf[0] - cdf[1]).abs().max().item()


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_training_sigmas_are_distributed_like_the_sampling_grid(shift):
    """The trap of Nerogar/OneTrainer #615: with the resolution shift applied at sampling only, the sampler asks
    about σ that training rarely drew. With uniform u, training's σ and the σ that flow-Euler visits at many steps
    must be one distribution (KS distance ~ 1/steps); an unshifted training draw must be far from a shifted grid."""
    sampling = flow.SigmaSampling(weighting_scheme="uniform", shift=shift)
    drawn = flow.sample_sigmas(sampling, 200_000, generator=torch.Generator().manual_seed(0))
    scheduler = flow.build_flow_scheduler(T, shift)
    scheduler.set_timesteps(1000)
    grid = scheduler.sigmas[:-1]
    assert ks_distance(drawn, grid) < 0.01
    if shift != 1.0:
        unshifted = flow.sample_sigmas(flow.SigmaSampling(weighting_scheme="uniform"), 200_000,
                                       generator=torch.Generator().manual_seed(0))
        assert ks_distance(unshifted, grid) > 0.1


def test_logit_normal_sigmas_are_diffusers_density_through_the_shift():
    sampling = flow.SigmaSampling(weighting_scheme="logit_normal", logit_mean=0.5, logit_std=0.8, shift=2.0)
    drawn = flow.sample_sigmas(sampling, 1000, generator=torch.Generator().manual_seed(3))
    u = torch.sigmoid(torch.normal(0.5, 0.8, (1000,), generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(drawn, flow.shifted(u, 2.0))
    # logit_mean > 0 favours high σ: the median of u is sigmoid(0.5) before the shift.
    assert abs(u.median().item() - torch.sigmoid(torch.tensor(0.5)).item()) < 0.03


def test_sigma_sampling_reads_null_keys_as_sd3_defaults():
    class Diffusion:  # the four flow keys of DiffusionConfig, as a config with them unset (null) gives them
        flow_shift = weighting_scheme = logit_mean = logit_std = None

    assert flow.SigmaSampling.from_config(Diffusion()) == flow.SigmaSampling("logit_normal", 0.0, 1.0, 1.0)
    Diffusion.flow_shift, Diffusion.weighting_scheme = 3.0, "uniform"
    assert flow.SigmaSampling.from_config(Diffusion()) == flow.SigmaSampling("uniform", 0.0, 1.0, 3.0)


def test_samplers_refuse_the_other_objective_by_name():
    ddpm, flow_config = DDPMScheduler().config, flow.build_flow_scheduler(T, 2.0).config
    assert objective_of(ddpm) == "ddpm" and objective_of(flow_config) == "flow"
    student = LCMScheduler().config  # a consistency student's (ldm distill): the third family, tests/test_distill.py
    for name in SCHEDULERS:
        family = {"flow": flow_config, "ddpm": ddpm, "consistency": student}
        config = family[scheduler_objective(name)]
        other = ddpm if name in FLOW_SCHEDULERS else flow_config
        assert objective_of(make_scheduler(name, config).config) == objective_of(config)
        with pytest.raises(ValueError, match=re.escape(f"--scheduler '{name}' samples a ") + r".* model, and this one is a"):
            make_scheduler(name, other, key="--scheduler")
    # Flow samplers inherit the shift; they take no timestep spacing.
    heun = make_scheduler("flow-heun", flow_config)
    assert isinstance(heun, FlowMatchHeunDiscreteScheduler) and heun.config.shift == 2.0
    assert make_scheduler("flow-euler", heun.config).config.shift == 2.0
    with pytest.raises(ValueError, match="flow-matching samplers take none"):
        make_scheduler("flow-euler", flow_config, "trailing")


def test_noising_helpers_follow_each_family():
    ddpm, fm = DDPMScheduler(), flow.build_flow_scheduler(T, 1.0)
    assert not is_flow_matching(ddpm) and is_flow_matching(fm) and is_flow_matching(FlowMatchHeunDiscreteScheduler())
    assert initial_noise_scale(fm) == 1.0
    x, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    fm.set_timesteps(4)
    t = fm.timesteps[1:2].repeat(2)
    torch.testing.assert_close(noise_latents(fm, x, noise, t), flow.interpolate(x, noise, fm.sigmas[1].repeat(2)))
    torch.testing.assert_close(noise_latents(ddpm, x, noise, torch.tensor([10, 10])),
                               ddpm.add_noise(x, noise, torch.tensor([10, 10])))
    assert scale_model_input(fm, x, t[0]) is x


def test_flow_renoise_has_the_interpolations_marginal():
    """RePaint's jump from σ_l up to σ_h: x_h = (α_h/α_l)·x_l + sqrt(σ_h² − (α_h·σ_l/α_l)²)·ε with α = 1 − σ has
    the law of (1 − σ_h)·x + σ_h·ε: mean α_h·x, std σ_h (200k draws of one point)."""
    x = torch.tensor(1.5)
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    for low, high in [(0.2, 0.7), (0.0, 0.5), (0.6, 1.0), (0.4, 0.4)]:
        x_low = flow.interpolate(x.repeat(n), torch.randn(n, generator=gen), torch.tensor(low).repeat(n))
        x_high = flow_renoise(x_low, high, low, torch.randn(n, generator=gen))
        assert abs(x_high.mean().item() - (1 - high) * 1.5) < 0.01
        assert abs(x_high.std().item() - high) < 0.01
    # From clean latents (σ_l = 0) the jump is the interpolation itself; to the same σ it is the identity.
    z, eps = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(flow_renoise(z, 0.3, 0.0, eps), flow.interpolate(z, eps, torch.tensor(0.3)))
    torch.testing.assert_close(flow_renoise(z, 0.3, 0.3, eps), z)


def test_renoise_on_a_flow_scheduler_uses_its_sigma_table():
    scheduler = flow.build_flow_scheduler(T, 3.0)
    scheduler.set_timesteps(6)
    assert supports_resampling(scheduler)
    assert not supports_resampling(make_scheduler("flow-heun", scheduler.config))  # keeps a half-finished step
    latents = torch.randn(1, 4, 2, 2)
    jumped = renoise(scheduler, latents, 2, 6, generator=torch.Generator().manual_seed(5))  # 6: clean, σ = 0
    eps = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(jumped, flow.interpolate(latents, eps, scheduler.sigmas[2:3]))


def test_flow_scheduler_is_what_build_flow_scheduler_saves():
    scheduler = flow.build_flow_scheduler(500, 2.5)
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    assert (scheduler.config.num_train_timesteps, scheduler.config.shift) == (500, 2.5)


def test_demo_offers_only_the_samplers_that_fit_the_model():
    """The demo is self-contained (no ldm import): its flow rule must be ldm.schedulers.objective_of's."""
    pytest.importorskip("gradio")
    from ldm.demo.serving import is_flow_config, samplers_for
    from ldm.schedulers import names_for

    ddpm, flow_config = DDPMScheduler().config, flow.build_flow_scheduler(T, 2.0).config
    for config in (ddpm, flow_config, make_scheduler("flow-heun", flow_config).config, LCMScheduler().config):
        assert is_flow_config(config) == (objective_of(config) == "flow")
        assert sorted(samplers_for(config)) == sorted(names_for(objective_of(config)))
