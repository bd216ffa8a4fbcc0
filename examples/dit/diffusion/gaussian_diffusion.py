"""Gaussian diffusion for training and sampling: DDPM / improved DDPM as used by DiT and the DTR paper.

Written after OpenAI's improved-diffusion / guided-diffusion and facebookresearch/DiT. Schedules
and every per-timestep coefficient are computed in float64 numpy and cast when gathered.
Sampling loops take an optional torch.Generator so that runs can be reproduced exactly.
"""

import enum
import functools
import math

import numpy as np
import torch

from dtr.weighting import parse_loss_weight_type, snr_from_alphas_cumprod

from .losses import discretized_gaussian_log_likelihood, normal_kl

#################################################################################
#                                    Helpers                                    #
#################################################################################


def mean_flat(tensor):
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def _extract_into_tensor(arr, timesteps, broadcast_shape, dtype=torch.float32):
    """Gather arr[timesteps] from a 1-D numpy array and view it as [B, 1, ...] expanded to broadcast_shape."""
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].to(dtype)
    res = res.view(-1, *([1] * (len(broadcast_shape) - 1)))
    return res.expand(broadcast_shape)


def _coef_dtype(x):
    """Coefficients are float32 (as in DiT) unless the data are float64, where we keep full precision."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _infer_device(model, noise, device):
    """Device for a sampling loop: explicit, else the start noise's, else the model's, else CPU."""
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    module = getattr(model, "__self__", model)  # a bound method such as model.forward_with_cfg
    if isinstance(module, torch.nn.Module):
        param = next(module.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


def _progress(indices, progress):
    """Wrap indices in a tqdm bar when asked (lazy import: tqdm is optional)."""
    if not progress:
        return indices
    from tqdm.auto import tqdm

    return tqdm(indices)


#################################################################################
#                              Model and loss types                             #
#################################################################################


class ModelMeanType(enum.Enum):
    """What the model's first C output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """How the reverse-process variance is chosen; LEARNED_RANGE interpolates log(beta_t) and log(beta~_t)."""

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE (plus the VB term when variances are learned)
    RESCALED_MSE = enum.auto()  # MSE plus VB term rescaled by T / 1000
    KL = enum.auto()  # the variational lower bound
    RESCALED_KL = enum.auto()  # the VLB scaled by T to estimate the full bound

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


# Name of the model's prediction, as dtr.weighting understands it.
_PREDICTION_NAME = {
    ModelMeanType.EPSILON: "epsilon",
    ModelMeanType.START_X: "x0",
    ModelMeanType.PREVIOUS_X: "epsilon",
}


#################################################################################
#                                 Beta schedules                                #
#################################################################################


def linear_beta_schedule(num_diffusion_timesteps):
    """Ho et al.'s linear betas 1e-4 .. 0.02, scaled by 1000 / T so any T gives the same process."""
    scale = 1000 / num_diffusion_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Betas that discretize a continuous alpha_bar(t), t in [0, 1]; clipped at max_beta near t = 1."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """'linear' (DDPM) or 'cosine' (improved DDPM; 'squaredcos_cap_v2' is its DiT/ANT name)."""
    if schedule_name == "linear":
        return linear_beta_schedule(num_diffusion_timesteps)
    if schedule_name in ("cosine", "squaredcos_cap_v2"):
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(f"unknown beta schedule: {schedule_name!r} (expected 'linear' or 'cosine')")


#################################################################################
#                               Gaussian diffusion                              #
#################################################################################


class GaussianDiffusion:
    """Training losses and samplers for a discrete-time Gaussian diffusion with the given betas.

    loss_weight_type ("constant" | "min_snr_<gamma>" | "p2weight_<gamma>_<k>" | "uw") weights the
    MSE term per sample by w(SNR_t) from dtr.weighting; the VB term is never weighted (as in the
    DTR paper code). "uw" weights are ones here: uncertainty weighting is applied by the trainer.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, loss_weight_type="constant"):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.loss_weight_type = loss_weight_type
        self.loss_weight = parse_loss_weight_type(loss_weight_type)

        betas = np.array(betas, dtype=np.float64)
        assert betas.ndim == 1, "betas must be 1-D"
        assert (betas > 0).all() and (betas <= 1).all(), "betas must lie in (0, 1]"
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0); the log is clipped because the posterior variance is 0 at t = 0.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if self.num_timesteps > 1
            else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        self._set_loss_weights(np.asarray(snr_from_alphas_cumprod(self.alphas_cumprod), dtype=np.float64))

    def _set_loss_weights(self, snr):
        """Tabulate SNR_t and the MSE weight w(SNR_t) for every timestep of this process."""
        self.snr = snr
        prediction = _PREDICTION_NAME[self.model_mean_type]
        weights = self.loss_weight.weight(torch.from_numpy(snr), prediction=prediction)
        self.mse_loss_weights = torch.as_tensor(weights, dtype=torch.float64).numpy()

    def _extract(self, arr, t, x):
        """Gather a per-timestep coefficient for x's batch, in the precision used for x."""
        return _extract_into_tensor(arr, t, x.shape, dtype=_coef_dtype(x))

    # ---------------------------------------------------------------- forward process

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self._extract(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), using `noise` when given."""
        if noise is None:
            noise = torch.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0)."""
        assert x_start.shape == x_t.shape
        posterior_mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        posterior_variance = self._extract(self.posterior_variance, t, x_t)
        posterior_log_variance_clipped = self._extract(self.posterior_log_variance_clipped, t, x_t)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    # ---------------------------------------------------------------- reverse process

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Run the model and return p(x_{t-1} | x_t): 'mean', 'variance', 'log_variance', 'pred_xstart'."""
        if model_kwargs is None:
            model_kwargs = {}
        B, C = x.shape[:2]
        assert t.shape == (B,)
        model_output = model(x, t, **model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            assert model_output.shape == (B, C * 2, *x.shape[2:]), "learned sigma needs 2*C output channels"
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = self._extract(self.posterior_log_variance_clipped, t, x)
                max_log = self._extract(np.log(self.betas), t, x)
                frac = (model_var_values + 1) / 2  # v in [-1, 1] maps to [beta~_t, beta_t]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            # FIXED_LARGE uses beta~_1 at t = 0 for a better decoder likelihood.
            fixed_large = np.append(self.posterior_variance[1], self.betas[1:])
            variance, log_variance = {
                ModelVarType.FIXED_LARGE: (fixed_large, np.log(fixed_large)),
                ModelVarType.FIXED_SMALL: (self.posterior_variance, self.posterior_log_variance_clipped),
            }[self.model_var_type]
            model_variance = self._extract(variance, t, x)
            model_log_variance = self._extract(log_variance, t, x)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        elif self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
        else:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)

        assert model_mean.shape == model_log_variance.shape == pred_xstart.shape == x.shape
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        assert x_t.shape == eps.shape
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        """Invert the posterior mean: x_0 = (xprev - coef2 * x_t) / coef1."""
        assert x_t.shape == xprev.shape
        return (
            self._extract(1.0 / self.posterior_mean_coef1, t, x_t) * xprev
            - self._extract(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / self._extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Classifier guidance (Sohl-Dickstein et al.): shift the mean by variance * grad log p(y | x)."""
        gradient = cond_fn(x, t, **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Classifier guidance on the score (Song et al.), for DDIM."""
        alpha_bar = self._extract(self.alphas_cumprod, t, x)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t, **(model_kwargs or {}))
        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # ---------------------------------------------------------------- DDPM sampling

    def p_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, generator=None
    ):
        """One ancestral step x_t -> x_{t-1}; no noise is added at t = 0."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero_mask = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        generator=None,
    ):
        """Ancestral sampling from pure noise (or `noise`) to x_0; every randn draws from `generator`."""
        final = None
        for out in self.p_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            generator=generator,
        ):
            final = out
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        generator=None,
    ):
        """Like p_sample_loop, but yield each step's p_sample() dict."""
        step = functools.partial(
            self.p_sample,
            model,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            generator=generator,
        )
        yield from self._progressive(step, model, shape, noise, device, progress, generator)

    # ---------------------------------------------------------------- DDIM sampling

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        eta=0.0,
        generator=None,
    ):
        """One DDIM step (Song et al., eq. 12); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # Re-derive eps from x_0 so that any parameterization (and clipping) is honoured.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract(self.alphas_cumprod, t, x)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero_mask = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        generator=None,
    ):
        """DDIM sampling from pure noise (or `noise`) to x_0; same arguments as p_sample_loop plus eta."""
        final = None
        for out in self.ddim_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            eta=eta,
            generator=generator,
        ):
            final = out
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        generator=None,
    ):
        """Like ddim_sample_loop, but yield each step's ddim_sample() dict."""
        step = functools.partial(
            self.ddim_sample,
            model,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            eta=eta,
            generator=generator,
        )
        yield from self._progressive(step, model, shape, noise, device, progress, generator)

    def _progressive(self, step, model, shape, noise, device, progress, generator):
        """The reverse chain shared by DDPM and DDIM: step(x, t) from t = T-1 down to 0, yielding each output."""
        device = _infer_device(model, noise, device)
        assert isinstance(shape, (tuple, list))
        img = noise if noise is not None else torch.randn(*shape, generator=generator, device=device)
        for i in _progress(list(range(self.num_timesteps))[::-1], progress):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step(img, t)
            yield out
            img = out["sample"]

    # ---------------------------------------------------------------- losses

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One VLB term in bits per dim: the decoder NLL at t = 0, else KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        output = torch.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def mse_weight(self, t):
        """Per-sample MSE weight w(SNR_t) for a batch of timesteps of this process (shape [B], float32)."""
        return torch.from_numpy(self.mse_loss_weights).to(t.device)[t].float()

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample training losses at timesteps t: a dict of [B] tensors.

        With learned sigma (the paper's setting) this is the hybrid loss of improved DDPM:
        'mse' on the prediction, 'vb' the VLB term with a stop-gradient on the mean, and
        'loss' = w(t) * mse + vb, where w comes from loss_weight_type.
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, t, **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x_t.shape[:2]
            assert model_output.shape == (B, C * 2, *x_t.shape[2:]), "learned sigma needs 2*C output channels"
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            # The VB term trains the variance only: the mean goes in with a stop-gradient.
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                model=lambda *args, r=frozen_out: r, x_start=x_start, x_t=x_t, t=t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        target = {
            ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0],
            ModelMeanType.START_X: lambda: x_start,
            ModelMeanType.EPSILON: lambda: noise,
        }[self.model_mean_type]()
        assert model_output.shape == target.shape == x_start.shape

        terms["mse"] = mean_flat((target - model_output) ** 2)
        weighted_mse = self.mse_weight(t).to(terms["mse"].dtype) * terms["mse"]
        terms["loss"] = weighted_mse + terms["vb"] if "vb" in terms else weighted_mse
        return terms

    # ---------------------------------------------------------------- likelihood evaluation

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dim: the VLB term no model can change."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)
        return mean_flat(kl_prior) / np.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """The full VLB in bits per dim, with its per-timestep terms and the x_0 / eps MSEs, per sample."""
        vb, xstart_mse, mse = [], [], []
        for i in list(range(self.num_timesteps))[::-1]:
            t = torch.full((x_start.shape[0],), i, device=x_start.device, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start=x_start, x_t=x_t, t=t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }
