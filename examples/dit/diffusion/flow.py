"""Flow matching for the DiT recipe: SiT's linear interpolant with velocity prediction.

SiT (Ma et al., 2024; willisma/SiT, transport/) in its own time convention, t = 0 noise and t = 1 data:

    x_t = t * x1 + (1 - t) * x0        x0 ~ N(0, I) the noise, x1 the data
    u_t = dx_t / dt = x1 - x0          the velocity the model learns

Training minimises the per-sample mean((v(x_t, t) - u_t) ** 2) at t ~ U[0, 1) (SiT's train_eps is 0 for
the linear path with velocity prediction), optionally weighted by the noise level s = 1 - t (dtr.weighting's
flow weights), or at t = 1 - s with s drawn from a flow density (logit-normal, SD3's mode, shifted).
Sampling integrates dx/dt = v(x, t) from t = 0 to t = 1 with torchdiffeq, as SiT does: Euler and Heun on
SiT's grid linspace(0, 1, num_steps) (num_steps points, num_steps - 1 steps), or adaptive dopri5.

The model gets t in [0, 1] unscaled, as SiT feeds its timestep embedder; dtr.wrap reads it with
timestep_kind="unit_reversed" (task round((1 - t) * (T - 1)): data is task 0, as DDPM's t = 0). A model with
a learned-sigma head (2C output channels: the recipe's DiT, SiT's default) has its first C channels read as
the velocity and the rest ignored, as SiT's forward does.
"""

import torch
from torchdiffeq import odeint

from dtr.weighting import StratifiedTimestepSampler, flow_snr, parse_loss_weight_type, quantile_intervals

from .gaussian_diffusion import mean_flat

PREDICTIONS = ("velocity",)
ODE_METHODS = ("euler", "heun2", "dopri5")  # torchdiffeq's names, as SiT's --sampling-method passes them on
FIXED_STEP = ("euler", "heun2")


def velocity_of(model_output, x):
    """The velocity in a model's output: its first C channels (C = x's), the rest being a learned-sigma head."""
    return model_output[:, : x.shape[1]]


def expand_like(t, x):
    """(B,) times viewed as (B, 1, ..., 1) to broadcast over x."""
    return t.view(-1, *([1] * (x.ndim - 1)))


class Flow:
    """SiT's linear interpolant with velocity prediction: training losses and ODE sampling.

    loss_weight_type: dtr.weighting's names ("constant", "min_snr_<gamma>", "p2weight_<gamma>_<k>", "uw"), the
    weight taken at the flow SNR of the noise level s = 1 - t for a velocity target (prediction="flow"); "uw"
    weighs 1 here, its uncertainty weighting is train.py's.
    density: the noise levels' training density, dtr.weighting's ("uniform": SiT's t ~ U[0, 1); "logit_normal"
    with logit_mean / logit_std; SD3's "mode" with mode_scale; each shifted by shift, 1 = none).
    """

    def __init__(self, prediction="velocity", loss_weight_type="constant", density="uniform", **density_keys):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r} is not supported; valid: {', '.join(PREDICTIONS)}")
        self.prediction = prediction
        self.loss_weight_type = loss_weight_type
        self.loss_weight = parse_loss_weight_type(loss_weight_type)
        self.density = dict(density=density, **density_keys)
        plain = density == "uniform" and self.density.get("shift", 1.0) == 1.0
        self.levels = None if plain else StratifiedTimestepSampler([(0.0, 1.0)], **self.density)

    # ----------------------------------------------------------------- training

    def sample_time(self, n, device=None, generator=None):
        """n training times: SiT's t ~ U[0, 1) for the plain uniform density, else t = 1 - s, s from the density."""
        if self.levels is None:
            return torch.rand(n, device=device, generator=generator)
        return 1 - self.levels.sample(n, device=device, generator=generator)

    def stratified(self, k):
        """ANT-UW on the noise level s: k intervals of equal probability under the density (for uniform: ANT's k
        equal intervals of [0, 1]) and the sampler drawing an equal share from each, so batches keep the density."""
        intervals = quantile_intervals(k, **self.density)
        return intervals, StratifiedTimestepSampler(intervals, **self.density)

    def interpolate(self, x1, noise, t):
        """(x_t, u_t): the point at time t between noise (t = 0) and data (t = 1), and its velocity."""
        t = expand_like(t, x1)
        return t * x1 + (1 - t) * noise, x1 - noise

    def mse_weight(self, t):
        """w(t): the loss weighting at the noise level s = 1 - t, for the velocity target; 1 for constant and uw."""
        if self.loss_weight.kind in ("constant", "uw"):
            return torch.ones_like(t)
        return self.loss_weight.weight(flow_snr(1 - t), prediction="flow")

    def training_losses(self, model, x1, model_kwargs=None, t=None, noise=None):
        """{"loss": w(t) * mse, "mse": mean((v - u_t) ** 2)} per sample.

        noise, then t, are drawn from torch's global generator when not given, in SiT's order and places
        (noise like x1, t on the CPU), so that a seeded call draws what SiT's training_losses draws.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        noise = torch.randn_like(x1) if noise is None else noise
        t = self.sample_time(len(x1)).to(x1) if t is None else t
        xt, ut = self.interpolate(x1, noise, t)
        v = velocity_of(model(xt, t, **model_kwargs), x1)
        mse = mean_flat((v - ut) ** 2)
        return {"loss": self.mse_weight(t).to(mse.dtype) * mse, "mse": mse}

    # ----------------------------------------------------------------- sampling

    def sample_ode(self, model, noise, num_steps, method="euler", model_kwargs=None, atol=1e-6, rtol=1e-3):
        """x at t = 1 (data) from noise at t = 0: dx/dt = v(x, t) integrated by torchdiffeq.

        euler / heun2 step over SiT's grid linspace(0, 1, num_steps) (num_steps - 1 steps; Heun evaluates the
        model twice a step); dopri5 adapts its steps to atol / rtol (num_steps does not matter to it).
        """
        if method not in ODE_METHODS:
            raise ValueError(f"method={method!r} is not an ODE sampler; valid: {', '.join(ODE_METHODS)}")
        if method in FIXED_STEP and num_steps < 2:
            raise ValueError(f"num_steps must be >= 2 for {method} (grid points, ends included), got {num_steps}")
        model_kwargs = {} if model_kwargs is None else model_kwargs

        def drift(t, x):
            return velocity_of(model(x, t.repeat(len(x)), **model_kwargs), x).to(x.dtype)

        ends = torch.tensor([0.0, 1.0], device=noise.device)
        if method == "dopri5":  # tolerances as one-element lists, as SiT passes them (torchdiffeq rounds them so)
            return odeint(drift, noise, ends, method=method, atol=[atol], rtol=[rtol])[-1]
        # The steps follow SiT's grid; asking torchdiffeq for the two ends only keeps 2 states, not num_steps.
        grid = torch.linspace(0.0, 1.0, num_steps, device=noise.device)
        return odeint(drift, noise, ends, method=method, options=dict(grid_constructor=lambda *_: grid))[-1]


def create_flow(prediction="velocity", loss_weight_type="constant", density="uniform", **density_keys):
    """The flow-matching process of general.path=flow (SiT's Linear path, velocity prediction); density_keys:
    the density's own (logit_mean and logit_std, or mode_scale) and shift, as dtr.weighting takes them."""
    return Flow(prediction=prediction, loss_weight_type=loss_weight_type, density=density, **density_keys)
