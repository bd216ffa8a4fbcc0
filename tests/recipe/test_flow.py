"""The recipe's flow path (examples/dit/diffusion/flow.py) against SiT's own lines and against closed forms.

SiT's loss and ODE sampler are written out in recipe_reference.py (sit_*) from willisma/SiT's transport/; the
flow path must equal them for the same (x1, noise, t) and on the same grid, to float rounding.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import kstest, norm

from diffusion.flow import ODE_METHODS, create_flow
from dtr.weighting import interval_index
from models import DiT
from recipe_reference import (
    euler_heun_by_hand,
    sit_forward,
    sit_forward_with_cfg,
    sit_sample_ode,
    sit_training_loss,
)

C, SIZE, CLASSES = 4, 8, 5


def random_dit(seed=0, learn_sigma=True):
    """A small DiT whose zero-initialised layers are randomised, so that its output depends on x, t and y."""
    torch.manual_seed(seed)
    model = DiT(
        input_size=SIZE,
        patch_size=2,
        in_channels=C,
        hidden_size=32,
        depth=2,
        num_heads=4,
        num_classes=CLASSES,
        learn_sigma=learn_sigma,
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.abs().sum():
                p.normal_(0, 0.1)
    return model.eval()


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, C, SIZE, SIZE, generator=g)
    noise = torch.randn(n, C, SIZE, SIZE, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return x1, noise, y


#################################################################################
#                           Parity with SiT: the loss                           #
#################################################################################


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_loss_equals_sits_for_the_same_x1_noise_and_t(learn_sigma):
    model = random_dit(learn_sigma=learn_sigma)
    x1, noise, y = batch()
    t = torch.tensor([0.0, 1e-6, 0.25, 0.5, 0.9, 1.0 - 2**-24])
    with torch.no_grad():
        ours = create_flow().training_losses(model, x1, dict(y=y), t=t, noise=noise)
        sit = sit_training_loss(lambda x, t, y: sit_forward(model, x, t, y), x1, noise, t, y=y)
    assert ours["loss"].shape == (len(x1),)
    torch.testing.assert_close(ours["loss"], sit, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["mse"], sit, rtol=0, atol=1e-6)


def test_loss_draws_noise_then_t_as_sit_does():
    """Without t and noise, a seeded call draws SiT's: x0 = randn_like(x1), then t = rand(B) on the CPU."""
    model = random_dit()
    x1, _, y = batch()
    with torch.no_grad():
        torch.manual_seed(7)
        ours = create_flow().training_losses(model, x1, dict(y=y))["loss"]
        torch.manual_seed(7)
        x0 = torch.randn_like(x1)
        t = torch.rand((x1.shape[0],)).to(x1)
        sit = sit_training_loss(lambda x, t, y: sit_forward(model, x, t, y), x1, x0, t, y=y)
    torch.testing.assert_close(ours, sit, rtol=0, atol=1e-6)


class GaussianVelocity:
    """The exact velocity E[x1 - x0 | x_t] for data x1 ~ N(mu, s^2) (per element) and noise x0 ~ N(0, 1):
    with D = t^2 s^2 + (1 - t)^2, E[x1 | x_t] = mu + t s^2 (x_t - t mu) / D, E[x0 | x_t] = (1 - t)(x_t - t mu) / D."""

    def __init__(self, mu, s):
        self.mu, self.s = mu, s

    def __call__(self, x, t):
        t = t.view(-1, 1, 1, 1).double()
        d = t**2 * self.s**2 + (1 - t) ** 2
        r = x.double() - t * self.mu
        return (self.mu + t * self.s**2 * r / d - (1 - t) * r / d).to(x.dtype)


@settings(max_examples=20, deadline=None)
@given(t=st.floats(0.0, 1.0, exclude_max=True), mu=st.floats(-2, 2), s=st.floats(0.1, 2.0))
def test_the_loss_of_the_exact_velocity_is_its_conditional_variance(t, mu, s):
    """For Gaussian data the exact velocity's expected loss is Var(x1 - x0 | x_t) =
    (s^2 + 1) - (t s^2 - (1 - t))^2 / (t^2 s^2 + (1 - t)^2): a Monte-Carlo mean over 20000 elements."""
    g = torch.Generator().manual_seed(0)
    x1 = mu + s * torch.randn(200, 1, 10, 10, generator=g, dtype=torch.float64)
    noise = torch.randn(x1.shape, generator=g, dtype=torch.float64)
    times = torch.full((200,), t, dtype=torch.float64)
    loss = create_flow().training_losses(lambda x, t: GaussianVelocity(mu, s)(x, t), x1, t=times, noise=noise)["loss"]
    expected = (s**2 + 1) - (t * s**2 - (1 - t)) ** 2 / (t**2 * s**2 + (1 - t) ** 2)
    assert loss.mean().item() == pytest.approx(expected, rel=0.05, abs=1e-3)


#################################################################################
#                       Parity with SiT: Euler and Heun                         #
#################################################################################


@pytest.mark.parametrize("method", ["euler", "heun2"])
@pytest.mark.parametrize("num_steps", [2, 7, 50])
def test_fixed_step_samples_equal_sits_on_its_grid(method, num_steps):
    model = random_dit()
    _, noise, y = batch()
    with torch.no_grad():
        ours = create_flow().sample_ode(model, noise, num_steps, method=method, model_kwargs=dict(y=y))
        sit = sit_sample_ode(lambda x, t, y: sit_forward(model, x, t, y), noise, num_steps, method, y=y)
        by_hand = euler_heun_by_hand(
            lambda x, t, y: sit_forward(model, x, t, y), noise, num_steps, heun=method == "heun2", y=y
        )
    assert ours.shape == noise.shape
    torch.testing.assert_close(ours, sit, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, by_hand, rtol=0, atol=1e-5)
    assert (ours - noise).abs().max() > 0.1  # the model moved the samples


@pytest.mark.parametrize("method", ["euler", "heun2", "dopri5"])
@pytest.mark.parametrize("guide_channels, sit_guided", [(3, 3), (None, C)])
def test_guided_samples_equal_sits_forward_with_cfg(method, guide_channels, sit_guided):
    """The recipe's cfg (forward_with_cfg on [z; z] with [y; null]) is SiT's: guide_channels=3 its released
    choice, None all latent channels (SiT's commented-out standard line)."""
    model = random_dit()
    _, noise, y = batch(n=3)
    z = torch.cat([noise, noise])
    labels = torch.cat([y, torch.full_like(y, CLASSES)])
    with torch.no_grad():
        ours = create_flow().sample_ode(
            model.forward_with_cfg,
            z,
            9,
            method=method,
            model_kwargs=dict(y=labels, cfg_scale=2.5, guide_channels=guide_channels),
        )
        sit = sit_sample_ode(
            lambda x, t, y: sit_forward_with_cfg(model, x, t, y, 2.5, sit_guided), z, 9, method, y=labels
        )
    torch.testing.assert_close(ours, sit, rtol=0, atol=1e-6)
    if guide_channels is None:  # every channel guided: both halves follow the same velocity
        torch.testing.assert_close(ours[:3], ours[3:], rtol=0, atol=0)


def test_dopri5_equals_sits_and_ignores_the_grid():
    """SiT asks dopri5 for num_steps points but uses the last; its adaptive steps do not depend on them."""
    model = random_dit()
    _, noise, y = batch()
    with torch.no_grad():
        ours = create_flow().sample_ode(model, noise, 250, method="dopri5", model_kwargs=dict(y=y))
        for steps in (2, 250):
            sit = sit_sample_ode(lambda x, t, y: sit_forward(model, x, t, y), noise, steps, "dopri5", y=y)
            torch.testing.assert_close(ours, sit, rtol=0, atol=1e-6)


#################################################################################
#                          The ODE solvers: closed forms                        #
#################################################################################


def decay(x, t):
    """dx/dt = -x: x(1) = x(0) / e."""
    return -x


@pytest.mark.parametrize("num_steps", [2, 5, 101])
def test_euler_and_heun_take_num_steps_minus_one_steps(num_steps):
    """On dx/dt = -x with h = 1 / (N - 1): Euler multiplies by (1 - h) per step, Heun by 1 - h + h^2 / 2."""
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    flow, h, n = create_flow(), 1 / (num_steps - 1), num_steps - 1
    euler = flow.sample_ode(decay, x0, num_steps, method="euler")
    heun = flow.sample_ode(decay, x0, num_steps, method="heun2")
    torch.testing.assert_close(euler, x0 * (1 - h) ** n, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(heun, x0 * (1 - h + h * h / 2) ** n, rtol=1e-6, atol=1e-7)


def test_dopri5_meets_its_tolerance():
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    out = create_flow().sample_ode(decay, x0, 2, method="dopri5", atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(out, x0 * math.exp(-1), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method, num_steps, tol", [("euler", 200, 0.03), ("heun2", 30, 0.02), ("dopri5", 2, 0.02)])
def test_sampling_the_exact_velocity_recovers_gaussian_data(method, num_steps, tol):
    """Noise carried by the exact velocity of N(mu, s^2) data arrives distributed as N(mu, s^2)."""
    mu, s = 0.7, 0.3
    z = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out = create_flow().sample_ode(GaussianVelocity(mu, s), z, num_steps, method=method)
    assert out.mean().item() == pytest.approx(mu, abs=tol)
    assert out.std().item() == pytest.approx(s, abs=tol)


#################################################################################
#                                   Bad input                                   #
#################################################################################


def test_bad_sampler_arguments_are_named():
    flow, x = create_flow(), torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="method='rk4'.*euler, heun2, dopri5"):
        flow.sample_ode(decay, x, 10, method="rk4")
    for method in ("euler", "heun2"):
        with pytest.raises(ValueError, match="num_steps must be >= 2"):
            flow.sample_ode(decay, x, 1, method=method)
    with pytest.raises(ValueError, match="prediction='noise'.*velocity"):
        create_flow(prediction="noise")
    assert ODE_METHODS == ("euler", "heun2", "dopri5")


#################################################################################
#                   Training densities of the noise level s = 1 - t             #
#################################################################################


def test_uniform_density_draws_sits_times():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(create_flow().sample_time(100, generator=g1), torch.rand(100, generator=g2))


@settings(max_examples=10, deadline=None)
@given(mean=st.floats(-1.5, 1.5), std=st.floats(0.3, 2.0))
def test_logit_normal_times_follow_the_density(mean, std):
    """t = 1 - s, s = sigmoid(mean + std * Phi^-1(u)) for the generator's float64 u: the formula draw for draw,
    and s's distribution the logit-normal's (Kolmogorov-Smirnov against its CDF Phi((logit s - mean) / std))."""
    flow = create_flow(density="logit_normal", logit_mean=mean, logit_std=std)
    t = flow.sample_time(2000, generator=torch.Generator().manual_seed(0))
    u = torch.rand(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = torch.sigmoid(mean + std * torch.special.ndtri(u))
    torch.testing.assert_close(t, 1 - s.float(), rtol=0, atol=1e-6)
    assert kstest((1 - t.double()).numpy(), lambda x: norm.cdf((np.log(x / (1 - x)) - mean) / std)).pvalue > 1e-3


def test_recipe_keys_reach_the_density_and_ant_uw(tmp_path):
    """flow.* keys: train.py draws its times from the configured density, and ANT-UW splits s into intervals of
    equal probability under it (uniform: k equal intervals of [0, 1]), an equal share of each batch from each."""
    import config
    import train
    from dtr.weighting import quantile_intervals

    keys = ["data=digits", "general.path=flow", "flow.density=logit_normal", "flow.logit_mean=0.5", "flow.shift=3"]
    cfg = config.load([*keys, "general.loss_weight_type=uw", "general.uw_intervals=4"])
    process = train.training_process(cfg)
    t, level = train.training_times(process, None, 500, torch.device("cpu"), torch.Generator().manual_seed(1))
    u = torch.rand(500, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = torch.sigmoid(0.5 + torch.special.ndtri(u))
    torch.testing.assert_close(t, 1 - (3 * s / (1 + 2 * s)).float(), rtol=0, atol=1e-6)
    assert torch.equal(level, 1 - t)

    intervals, sampler, uw = train.ant_uw(cfg, process, torch.device("cpu"))
    assert intervals == quantile_intervals(4, "logit_normal", logit_mean=0.5, shift=3.0) and uw.num_intervals == 4
    t, level = train.training_times(process, sampler, 8, torch.device("cpu"), torch.Generator().manual_seed(2))
    assert torch.equal(t, 1 - level)
    assert torch.bincount(interval_index(level, intervals), minlength=4).tolist() == [2, 2, 2, 2]
    plain = config.load(["data=digits", "general.path=flow", "general.loss_weight_type=uw", "general.uw_intervals=4"])
    assert train.ant_uw(plain, train.training_process(plain), torch.device("cpu"))[0] == [
        (0.0, 0.25),
        (0.25, 0.5),
        (0.5, 0.75),
        (0.75, 1.0),
    ]


#################################################################################
#                   Routing a flow model: t = 1 data, tasks by t or log-SNR     #
#################################################################################


def logsnr_tasks(t, num_tasks):
    """The task of DiT's linear DDPM schedule over num_tasks steps (betas 1e-4 .. 0.02, scaled by 1000 / T) whose
    log-SNR log(abar / (1 - abar)) is nearest to the flow's 2 log((1 - s) / s) at s = 1 - t."""
    betas = np.linspace(1e-4, 0.02, num_tasks) * 1000 / num_tasks
    abar = np.cumprod(1 - betas)
    ddpm = np.log(abar / (1 - abar))
    s = 1 - t.double().numpy()
    flow = 2 * np.log((1 - s) / s)
    return torch.from_numpy(np.abs(ddpm[None, :] - flow[:, None]).argmin(axis=1))


@pytest.mark.parametrize("task_axis", ["linear", "logsnr"])
def test_a_flow_model_is_routed_by_sits_t(task_axis):
    """common.route under general.path=flow: each block routed by the mask of task round((1 - t)(T - 1)), or with
    models.routing.task_axis=logsnr the DDPM task of equal log-SNR; the t embedder gets t itself."""
    import common
    import config
    from recipe_reference import dtr_masks, routed_forward

    keys = ["data=digits", "models.depth=2", "models.hidden_size=32", "models.routing.alpha=2.0"]
    cfg = config.load([*keys, "general.path=flow", f"models.routing.task_axis={task_axis}"])
    torch.manual_seed(0)
    model = common.build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.abs().sum():
                p.normal_(0, 0.1)
    reference = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    reference.load_state_dict(model.state_dict())
    common.route(model, cfg)
    t = torch.tensor([1e-4, 0.05, 0.3, 0.5, 0.7, 0.95, 0.9999])
    tasks = logsnr_tasks(t, 1000) if task_axis == "logsnr" else torch.round((1 - t.double()) * 999).long()
    x, y = torch.randn(len(t), 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(len(t))
    with torch.no_grad():
        ours = model.eval()(x, t, y)
        expected = routed_forward(reference.eval(), x, t, y, dtr_masks(1000, 32, 0.8, 2.0), tasks)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    if task_axis == "logsnr":  # the two maps differ on these times: the test tells them apart
        assert not torch.equal(tasks, torch.round((1 - t.double()) * 999).long())
