"""Gaussian diffusion of the DiT recipe (examples/dit/diffusion) against closed forms."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from diffusion import create_diffusion
from diffusion.gaussian_diffusion import get_named_beta_schedule
from diffusion.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from diffusion.respace import space_timesteps

T = 1000


#################################################################################
#                 Independent closed forms (written out, not imported)          #
#################################################################################


def linear_betas(num_steps=T):
    """beta_i = s * (1e-4 + i * (0.02 - 1e-4) / (T - 1)), s = 1000 / T."""
    s = 1000.0 / num_steps
    i = np.arange(num_steps, dtype=np.float64)
    return s * (1e-4 + i * (0.02 - 1e-4) / (num_steps - 1))


def cosine_betas(num_steps=T):
    """beta_i = min(1 - f((i + 1) / T) / f(i / T), 0.999), f(u) = cos((u + 0.008) / 1.008 * pi / 2)^2."""
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    i = np.arange(num_steps, dtype=np.float64)
    return np.minimum(1 - f((i + 1) / num_steps) / f(i / num_steps), 0.999)


ALPHAS_CUMPROD = np.cumprod(1.0 - linear_betas())


def snr(t):
    return ALPHAS_CUMPROD[t] / (1 - ALPHAS_CUMPROD[t])


class Recorder:
    """A stand-in model that records the timesteps and kwargs it receives and predicts zero eps, v = 0."""

    def __init__(self):
        self.ts, self.kwargs = [], []

    def __call__(self, x, t, **kwargs):
        self.ts.append(t.clone())
        self.kwargs.append(kwargs)
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)


class GaussianDataEps:
    """Exact E[eps | x_t] for data x_0 ~ N(mu_c, s_c^2) per channel c, plus a constant variance value v.

    With x_t = sqrt(a) x_0 + sqrt(1 - a) eps: E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a).
    """

    def __init__(self, mu, s, v=0.0):
        self.mu = torch.tensor(mu).view(1, -1, 1, 1)
        self.s2 = torch.tensor(s).view(1, -1, 1, 1) ** 2
        self.v = v

    def __call__(self, x, t):
        a = torch.from_numpy(ALPHAS_CUMPROD)[t].to(x.dtype).view(-1, 1, 1, 1)
        eps = torch.sqrt(1 - a) * (x - torch.sqrt(a) * self.mu) / (a * self.s2 + 1 - a)
        return torch.cat([eps, torch.full_like(eps, self.v)], dim=1)


#################################################################################
#                                 Beta schedules                                #
#################################################################################


@pytest.mark.parametrize("num_steps", [1000, 250])
def test_linear_schedule_matches_formula(num_steps):
    betas = get_named_beta_schedule("linear", num_steps)
    assert betas.dtype == np.float64
    np.testing.assert_allclose(betas, linear_betas(num_steps), rtol=0, atol=1e-15)
    assert betas[0] == pytest.approx(1e-4 * 1000 / num_steps) and betas[-1] == pytest.approx(0.02 * 1000 / num_steps)


def test_cosine_schedule_matches_formula():
    betas = get_named_beta_schedule("cosine", T)
    np.testing.assert_allclose(betas, cosine_betas(), rtol=1e-12, atol=1e-15)
    assert betas[-1] == 0.999 and betas.max() == 0.999  # the improved-DDPM clip
    np.testing.assert_array_equal(get_named_beta_schedule("squaredcos_cap_v2", T), betas)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        get_named_beta_schedule("quadratic", T)


def test_create_diffusion_defaults():
    diffusion = create_diffusion("")
    assert diffusion.num_timesteps == T and diffusion.timestep_map == list(range(T))
    np.testing.assert_allclose(diffusion.alphas_cumprod, ALPHAS_CUMPROD, rtol=1e-13)
    assert create_diffusion(None).num_timesteps == T
    cosine = create_diffusion("", noise_schedule="cosine")
    np.testing.assert_allclose(cosine.betas, cosine_betas(), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="min_snr"):  # a bad weighting fails when the diffusion is built
        create_diffusion("", loss_weight_type="min_snr")


#################################################################################
#                                Forward process                                #
#################################################################################


def test_q_sample_exact_with_given_noise():
    diffusion = create_diffusion("")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
    noise = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    a = torch.from_numpy(ALPHAS_CUMPROD[t.numpy()]).view(-1, 1, 1, 1)
    expected = a.sqrt() * x0 + (1 - a).sqrt() * noise
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise=noise), expected, rtol=1e-13, atol=1e-13)


def test_q_sample_monte_carlo_mean_and_variance():
    diffusion = create_diffusion("")
    n = 100_000
    torch.manual_seed(0)
    for step in (10, 500, 999):
        x0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
        xt = diffusion.q_sample(x0, torch.full((n,), step)).flatten()
        mean, var = math.sqrt(ALPHAS_CUMPROD[step]) * 0.7, 1 - ALPHAS_CUMPROD[step]
        # 5 standard errors of the sample mean and of the sample variance of a Gaussian.
        assert abs(xt.mean().item() - mean) < 5 * math.sqrt(var / n)
        assert abs(xt.var().item() - var) < 5 * var * math.sqrt(2 / (n - 1))
        m, v, logv = diffusion.q_mean_variance(x0[:1], torch.tensor([step]))
        assert m.item() == pytest.approx(mean, rel=1e-12) and v.item() == pytest.approx(var, rel=1e-12)
        assert logv.item() == pytest.approx(math.log(var), rel=1e-12)


def test_q_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x_0): the product of N(sqrt(a_prev) x0, 1 - a_prev) and N(x_t; sqrt(alpha) x_{t-1}, beta)."""
    diffusion = create_diffusion("")
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    xt = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 2, 400, 999])
    betas = linear_betas()
    mean, var, logvar = diffusion.q_posterior_mean_variance(x0, xt, t)
    for b, step in enumerate(t.tolist()):
        a_prev, beta = ALPHAS_CUMPROD[step - 1], betas[step]
        precision = 1 / (1 - a_prev) + (1 - beta) / beta
        post_var = 1 / precision
        post_mean = post_var * (math.sqrt(a_prev) * x0[b] / (1 - a_prev) + math.sqrt(1 - beta) * xt[b] / beta)
        torch.testing.assert_close(mean[b], post_mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(var[b], torch.full_like(var[b], post_var), rtol=1e-9, atol=0)
        torch.testing.assert_close(logvar[b], torch.full_like(var[b], math.log(post_var)), rtol=1e-9, atol=0)
    # At t = 0 the posterior is a point mass at x_0; the log-variance is clipped to that of t = 1.
    mean0, var0, logvar0 = diffusion.q_posterior_mean_variance(x0, xt, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(mean0, x0, rtol=1e-12, atol=1e-12)
    assert (var0 == 0).all()
    torch.testing.assert_close(logvar0, torch.full_like(x0, diffusion.posterior_log_variance_clipped[1]))


#################################################################################
#                                     Losses                                    #
#################################################################################


def test_normal_kl_closed_form():
    m = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    logv = torch.tensor([0.0, -2.0, 1.5], dtype=torch.float64)
    assert torch.equal(normal_kl(m, logv, m, logv), torch.zeros(3, dtype=torch.float64))
    m2 = torch.tensor([-0.5, 0.2, 2.0], dtype=torch.float64)
    logv2 = torch.tensor([1.0, -1.0, -0.5], dtype=torch.float64)
    s1, s2 = torch.exp(0.5 * logv), torch.exp(0.5 * logv2)
    expected = torch.log(s2 / s1) + (s1**2 + (m - m2) ** 2) / (2 * s2**2) - 0.5
    torch.testing.assert_close(normal_kl(m, logv, m2, logv2), expected, rtol=1e-12, atol=1e-14)
    # Scalars broadcast: KL to the standard normal prior.
    torch.testing.assert_close(normal_kl(m, logv, 0.0, 0.0), 0.5 * (torch.exp(logv) + m**2 - 1 - logv))


def test_approx_normal_cdf_is_close_to_exact():
    z = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    np.testing.assert_allclose(approx_standard_normal_cdf(z).numpy(), norm.cdf(z.numpy()), atol=2e-4)


@pytest.mark.parametrize("mean,scale", [(0.0, 0.01), (0.1, 0.3), (-0.95, 0.05), (0.999, 2.0)])
def test_discretized_likelihood_sums_to_one_over_bins(mean, scale):
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the 256 bin centres of 8-bit data
    log_p = discretized_gaussian_log_likelihood(
        x, means=torch.full_like(x, mean), log_scales=torch.full_like(x, math.log(scale))
    )
    assert (log_p <= 0).all()
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


#################################################################################
#                                   Respacing                                   #
#################################################################################


def test_space_timesteps_strides():
    kept = sorted(space_timesteps(T, "250"))
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == T - 1
    assert kept == [round(i * 999 / 249) for i in range(250)]
    assert kept[:6] == [0, 4, 8, 12, 16, 20]
    assert sorted(space_timesteps(T, "ddim50")) == list(range(0, T, 20))
    sections = sorted(space_timesteps(300, "10,15,20"))
    assert len(sections) == 45
    assert sections[:10] == [round(i * 99 / 9) for i in range(10)]
    assert sections[10] == 100 and sections[24] == 199 and sections[25] == 200 and sections[-1] == 299
    # DiT accumulates the float stride 99/14: step 7 of section 2 lands at 149 (7 * 99/14 = 49.5 would round to 150).
    assert sections[10 + 7] == 149
    assert space_timesteps(T, [T]) == set(range(T))
    with pytest.raises(ValueError, match="cannot divide section of 10 steps into 11"):
        space_timesteps(10, "11")
    with pytest.raises(ValueError, match="cannot create exactly 600 steps"):
        space_timesteps(T, "ddim600")  # strides 1 and 2 give 1000 and 500 steps


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("respacing", ["250", "ddim50", "10", "10,15,20"])
def test_respaced_alphas_cumprod_match_original(schedule, respacing):
    original = create_diffusion("", noise_schedule=schedule)
    spaced = create_diffusion(respacing, noise_schedule=schedule)
    kept = sorted(space_timesteps(T, respacing))
    assert spaced.timestep_map == kept and spaced.num_timesteps == len(kept)
    np.testing.assert_allclose(spaced.alphas_cumprod, original.alphas_cumprod[kept], rtol=0, atol=1e-12)


def test_respaced_sampling_passes_original_timesteps_and_kwargs():
    spaced = create_diffusion("10")
    kept = sorted(space_timesteps(T, "10"))
    for loop in (spaced.p_sample_loop, spaced.ddim_sample_loop):
        model = Recorder()
        y = torch.tensor([3, 7])
        loop(model, (2, 1, 2, 2), clip_denoised=False, model_kwargs=dict(y=y, cfg_scale=1.5))
        assert [t.tolist() for t in model.ts] == [[s, s] for s in kept[::-1]]
        assert all(kw["cfg_scale"] == 1.5 and torch.equal(kw["y"], y) for kw in model.kwargs)
        assert all(t.dtype == torch.long for t in model.ts)


def test_respaced_training_passes_original_timesteps():
    spaced = create_diffusion("250")
    model = Recorder()
    t = torch.tensor([0, 1, 100, 249])
    spaced.training_losses(model, torch.zeros(4, 1, 2, 2), t, model_kwargs=dict(y=torch.zeros(4)))
    assert model.ts[0].tolist() == [spaced.timestep_map[i] for i in t.tolist()] == [0, 4, 401, 999]


#################################################################################
#                                 Hybrid loss                                   #
#################################################################################


def test_hybrid_loss_of_perfect_model_is_closed_form_minimum():
    """True eps and v = -1 (the posterior log-variance): mse = 0, KL = 0, and at t = 0 the decoder NLL."""
    diffusion = create_diffusion("")
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, 256, (4, 3, 4, 4), generator=gen).double() / 127.5 - 1  # 8-bit grid, incl. +-1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    model = lambda x, t: torch.cat([noise, -torch.ones_like(noise)], dim=1)  # noqa: E731
    terms = diffusion.training_losses(model, x0, t, noise=noise)
    assert set(terms) == {"mse", "vb", "loss"} and all(v.shape == (4,) for v in terms.values())
    assert torch.equal(terms["mse"], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(terms["vb"][1:], torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-9)
    # Decoder at t = 0: mean x_0, variance beta~_1 = beta_1 (1 - abar_0) / (1 - abar_1); 8-bit bins of half-width 1/255.
    betas = linear_betas()
    sigma = math.sqrt(betas[1] * (1 - ALPHAS_CUMPROD[0]) / (1 - ALPHAS_CUMPROD[1]))
    z = (1 / 255) / sigma
    interior, edge = norm.cdf(z) - norm.cdf(-z), norm.cdf(z)
    x = x0[0].numpy()
    prob = np.where(np.abs(x) > 0.999, edge, interior)
    expected_bits = -np.log(prob).mean() / math.log(2)
    assert terms["vb"][0].item() == pytest.approx(expected_bits, rel=2e-3)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_vb_term_does_not_train_the_mean():
    diffusion = create_diffusion("")
    x0 = torch.rand(2, 2, 3, 3) * 2 - 1
    out = torch.randn(2, 4, 3, 3).requires_grad_()
    terms = diffusion.training_losses(lambda x, t: out, x0, torch.tensor([0, 300]))
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert torch.equal(grad_vb[:, :2], torch.zeros_like(grad_vb[:, :2])) and grad_vb[:, 2:].abs().sum() > 0
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert grad_mse[:, :2].abs().sum() > 0 and torch.equal(grad_mse[:, 2:], torch.zeros_like(grad_mse[:, 2:]))


def test_min_snr_weight_multiplies_mse_only():
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(6, 2, 3, 3, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 3, 50, 200, 600, 999])
    model = lambda x, t: torch.cat([0.5 * x, torch.full_like(x, 0.3)], dim=1)  # noqa: E731
    plain = create_diffusion("").training_losses(model, x0, t, noise=noise)
    weighted = create_diffusion("", loss_weight_type="min_snr_5").training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(weighted["mse"], plain["mse"])
    torch.testing.assert_close(weighted["vb"], plain["vb"])
    s = snr(t.numpy())
    w = torch.from_numpy(np.minimum(s, 5.0) / s)
    assert w[0] < 1e-3 and w[-1] == 1.0
    torch.testing.assert_close(weighted["loss"], w * plain["mse"] + plain["vb"], rtol=1e-6, atol=0)
    torch.testing.assert_close(plain["loss"], plain["mse"] + plain["vb"])
    uw = create_diffusion("", loss_weight_type="uw").training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(uw["loss"], plain["loss"])  # UW itself is applied by the trainer


def test_respaced_loss_weight_uses_original_snr():
    spaced = create_diffusion("250", loss_weight_type="min_snr_5")
    t = torch.arange(250)
    s = snr(np.array(spaced.timestep_map))
    np.testing.assert_allclose(spaced.mse_weight(t).numpy(), np.minimum(s, 5.0) / s, rtol=1e-6)


#################################################################################
#                                    Sampling                                   #
#################################################################################

MU, STD = [0.3, -0.2], [0.5, 0.8]


def _check_gaussian(samples, tol_std, tol_mean=0.03):
    for c in range(2):
        values = samples[:, c].flatten()
        assert values.mean().item() == pytest.approx(MU[c], abs=tol_mean)
        assert values.std().item() == pytest.approx(STD[c], rel=tol_std)


# Few steps under-disperse (about 10% low at 50 steps for these data, a property of the
# discretization, not of the code); with the full chain, or 250 DDIM steps, the std is within 5%.
@pytest.mark.parametrize("v", [-1.0, 1.0])
@pytest.mark.parametrize("respacing,tol_std", [("50", 0.15), ("", 0.05)])
def test_ddpm_sampling_recovers_gaussian_data(v, respacing, tol_std):
    diffusion = create_diffusion(respacing)
    gen = torch.Generator().manual_seed(4)
    n = 2000 if respacing else 800
    samples = diffusion.p_sample_loop(GaussianDataEps(MU, STD, v=v), (n, 2, 2, 2), clip_denoised=False, generator=gen)
    _check_gaussian(samples, tol_std)


@pytest.mark.parametrize("respacing,eta,tol_std", [("ddim50", 0.0, 0.15), ("ddim50", 1.0, 0.15), ("250", 0.0, 0.05)])
def test_ddim_sampling_recovers_gaussian_data(respacing, eta, tol_std):
    diffusion = create_diffusion(respacing)
    gen = torch.Generator().manual_seed(5)
    samples = diffusion.ddim_sample_loop(
        GaussianDataEps(MU, STD), (2000, 2, 2, 2), clip_denoised=False, eta=eta, generator=gen
    )
    _check_gaussian(samples, tol_std)


@pytest.mark.parametrize("sampler", ["p_sample_loop", "ddim_sample_loop"])
def test_generator_makes_sampling_reproducible(sampler):
    diffusion = create_diffusion("10")
    model = GaussianDataEps(MU, STD)
    kwargs = dict(eta=1.0) if sampler == "ddim_sample_loop" else {}
    loop = getattr(diffusion, sampler)
    global_state = torch.get_rng_state()
    a = loop(model, (3, 2, 2, 2), generator=torch.Generator().manual_seed(7), **kwargs)
    b = loop(model, (3, 2, 2, 2), generator=torch.Generator().manual_seed(7), **kwargs)
    c = loop(model, (3, 2, 2, 2), generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(torch.get_rng_state(), global_state)  # every draw came from the generator
    # An explicit start noise is used as x_T.
    start = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(9))
    d = loop(model, start.shape, noise=start, generator=torch.Generator().manual_seed(7), **kwargs)
    e = loop(model, start.shape, noise=start, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(d, e) and not torch.allclose(d, a)


def test_progress_bar_and_progressive_steps(capsys):
    diffusion = create_diffusion("5")
    model = Recorder()
    steps = list(diffusion.p_sample_loop_progressive(model, (1, 1, 2, 2), progress=True))
    assert len(steps) == 5 and all(set(s) == {"sample", "pred_xstart"} for s in steps)
    assert "5/5" in capsys.readouterr().err  # the tqdm bar
