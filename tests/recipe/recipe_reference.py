"""Independent references for the recipe's tests, written here from the formulas, not imported from the recipe.

- `dtr_masks`: DTR's task masks (the paper's window schedule) and `routed_forward`: DiT's forward with every
  block routed as `block(m * x, c) + (1 - m) * x`.
- `ReferenceTraining`: the training step as facebookresearch/DiT's train.py and the DTR paper code take it: the
  model in train mode (label dropout), the hybrid loss of improved DDPM (MSE + VB term) weighted once by w(t)
  (constant or Min-SNR), or ANT-UW's stratified timesteps and uncertainty weighting with its own learning rate,
  AdamW, and the EMA `ema = decay * ema + (1 - decay) * model`; over any number of simulated DDP ranks. With
  path="flow": SiT's loss at t ~ U[0, 1) instead, routed by task round((1 - t)(T - 1)), Min-SNR as its epsilon
  objective written for the velocity, min((1 - s)^2, gamma s^2) at the noise level s = 1 - t, ANT-UW on k equal
  intervals of s.
- `ddim_sample`: deterministic DDIM (eta = 0) with classifier-free guidance on all channels.
- `sit_*`: SiT's flow matching (willisma/SiT, transport/ and models.py), the lines the flow path must equal,
  written out: the Linear path's loss with velocity prediction, its ODE sampler over torchdiffeq, SiT's forward
  (the learned-sigma half dropped) and forward_with_cfg.

Only the DiT modules themselves (models.py, tested on their own in test_models.py) and torch's AdamW are shared
with the recipe. Random numbers are drawn in the order the recipe draws them (data order, then per step: timesteps,
noise, label dropout), since that order is what makes a run and its resumed continuation repeat exactly.
"""

import copy
import math
import os
import re

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from models import DiT
from recipe_helpers import DIGITS

T = 1000  # diffusion steps


#################################################################################
#                               Routing and the DiT                             #
#################################################################################


def dtr_masks(num_tasks, channels, sharing_ratio, alpha):
    """(num_tasks, channels) float 0/1: task t keeps channels [s_t, s_t + C_b),
    s_t = round((t / (T - 1))^alpha (C - C_b)), C_b = int(C * sharing_ratio)."""
    active = int(channels * sharing_ratio)
    start = np.round(np.linspace(0, 1, num_tasks) ** alpha * (channels - active)).astype(np.int64)
    c = np.arange(channels)
    return torch.from_numpy((c >= start[:, None]) & (c < start[:, None] + active)).float()


def routed_forward(model, x, t, y, masks, tasks=None):
    """DiT's forward (x_embedder + pos_embed, c = t_emb + y_emb, blocks, final layer), each block routed by
    masks[tasks] (tasks = t, the DDPM timesteps, unless given)."""
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, model.training)
    m = None if masks is None else masks[t if tasks is None else tasks].to(h.dtype)[:, None, :]
    for block in model.blocks:
        h = block(h, c) if m is None else block(m * h, c) + (1 - m) * h
    return model.unpatchify(model.final_layer(h, c))


#################################################################################
#                                 Gaussian diffusion                            #
#################################################################################


class Schedule:
    """DDPM's linear schedule over T steps (float64) and the posterior q(x_{t-1} | x_t, x_0)."""

    def __init__(self):
        self.betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        prev = np.append(1.0, self.alphas_cumprod[:-1])
        variance = self.betas * (1.0 - prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance = np.log(np.append(variance[1], variance[1:]))  # t = 0's is 0: use t = 1's
        self.coef_x0 = self.betas * np.sqrt(prev) / (1.0 - self.alphas_cumprod)
        self.coef_xt = (1.0 - prev) * np.sqrt(1.0 - self.betas) / (1.0 - self.alphas_cumprod)
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def at(self, values, t):
        """values[t] as float32, shaped (B, 1, 1, 1) to broadcast over images."""
        return torch.from_numpy(np.asarray(values))[t].float().view(-1, 1, 1, 1)


def standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF that ADM's discretized likelihood uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_log_likelihood(x, mean, log_scale):
    """log P(x) of 8-bit data in [-1, 1] (bins of width 2/255, the edge bins open) under N(mean, exp(log_scale)^2)."""
    inv = torch.exp(-log_scale)
    cdf_plus = standard_normal_cdf(inv * (x - mean + 1.0 / 255))
    cdf_min = standard_normal_cdf(inv * (x - mean - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def hybrid_loss(out, x0, x_t, t, noise, s):
    """Per-sample (mse, vb) of improved DDPM's hybrid loss for an eps + learned-range-variance output.

    vb is KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) in bits per dim (the decoder NLL at t = 0), with the
    predicted mean's gradient stopped: the VB term trains the variance only.
    """
    C = x0.shape[1]
    eps, v = out[:, :C], out[:, C:]
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    frac = (v + 1) / 2
    log_var = frac * s.at(np.log(s.betas), t) + (1 - frac) * s.at(s.posterior_log_variance, t)
    ac = s.alphas_cumprod
    x0_pred = s.at(np.sqrt(1 / ac), t) * x_t - s.at(np.sqrt(1 / ac - 1), t) * eps.detach()
    mean = s.at(s.coef_x0, t) * x0_pred + s.at(s.coef_xt, t) * x_t
    true_mean = s.at(s.coef_x0, t) * x0 + s.at(s.coef_xt, t) * x_t
    true_log_var = s.at(s.posterior_log_variance, t)
    kl = 0.5 * (
        -1 + log_var - true_log_var + torch.exp(true_log_var - log_var) + (true_mean - mean) ** 2 * torch.exp(-log_var)
    )
    kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = -discretized_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    return mse, torch.where(t == 0, nll, kl)


#################################################################################
#                                 The training step                             #
#################################################################################


def digits():
    """scikit-learn's digits in [-1, 1] (value v in 0..16 -> v / 8 - 1), (N, 1, 8, 8), and labels."""
    d = load_digits()
    return torch.from_numpy(d.images / 8.0 - 1.0).float().unsqueeze(1), torch.from_numpy(d.target).long()


class ReferenceTraining:
    """DiT training on the digits from the formulas, over `world_size` simulated DDP ranks (gradients averaged)."""

    def __init__(
        self,
        *,
        hidden,
        depth,
        heads,
        dropout,
        seed,
        batch,
        world_size=1,
        weighting="constant",
        sharing_ratio=1.0,
        alpha=4.0,
        num_tasks=T,
        uw_intervals=8,
        lr=1e-4,
        weight_decay=0.0,
        uw_lr=0.025,
        ema_decay=0.9999,
        path="ddpm",
    ):
        torch.manual_seed(seed)  # the same initial weights as the recipe's (models.py's initialisation)
        self.model = DiT(
            input_size=8,
            patch_size=2,
            in_channels=1,
            hidden_size=hidden,
            depth=depth,
            num_heads=heads,
            class_dropout_prob=dropout,
            num_classes=10,
            learn_sigma=True,
        )
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.masks = dtr_masks(num_tasks, hidden, sharing_ratio, alpha) if sharing_ratio < 1 else None
        self.weighting, self.s, self.path, self.num_tasks = weighting, Schedule(), path, num_tasks
        self.k = uw_intervals
        self.bounds = [i * T // uw_intervals for i in range(uw_intervals + 1)]
        groups = [{"params": list(self.model.parameters())}]
        self.log_vars = None
        if weighting == "uw":
            self.log_vars = torch.zeros(uw_intervals, requires_grad=True)
            groups.append({"params": [self.log_vars], "lr": uw_lr, "weight_decay": 0.0})
        self.opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        self.ema_decay = ema_decay
        self.x, self.y = digits()
        self.seed, self.world_size, self.local_batch = seed, world_size, batch // world_size
        self.step_count, self.losses, self.grad_norms = 0, [], []
        self.generators, self.cpu_states = [], []
        for rank in range(world_size):
            self.generators.append(torch.Generator().manual_seed(seed * world_size + rank))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * world_size + rank)  # label dropout draws from torch's global generator
                self.cpu_states.append(torch.get_rng_state())

    def set(self, lr, weight_decay, uw_lr, ema_decay):
        """New hyperparameters from the next step on (what a resume with other optim keys does)."""
        self.opt.param_groups[0]["lr"], self.opt.param_groups[0]["weight_decay"] = lr, weight_decay
        if self.log_vars is not None:
            self.opt.param_groups[1]["lr"] = uw_lr
        self.ema_decay = ema_decay

    def batch(self, rank):
        """This rank's indices at the current step: DistributedSampler's shuffled order (seed + epoch), dropping the
        tail so that every rank gets as many samples, then consecutive local batches."""
        n, w, b = len(self.y), self.world_size, self.local_batch
        per_rank = n // w
        epoch, i = divmod(self.step_count, per_rank // b)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        mine = order[: per_rank * w][rank::w]
        return torch.tensor(mine[i * b : (i + 1) * b])

    def timesteps(self, generator):
        """(timesteps, ANT-UW interval of each or None): DDPM timesteps in [0, T), or flow times t in [0, 1)."""
        if self.weighting != "uw":
            if self.path == "flow":
                return torch.rand(self.local_batch, generator=generator), None
            return torch.randint(0, T, (self.local_batch,), generator=generator), None
        # ANT: an equal share of the batch from every interval (the remainder to distinct random intervals),
        # uniform inside the interval: of the timesteps, or (flow) of the noise levels s in k equal intervals of
        # [0, 1], with t = 1 - s.
        counts = [self.local_batch // self.k] * self.k
        if self.local_batch % self.k:
            for i in torch.randperm(self.k, generator=generator)[: self.local_batch % self.k].tolist():
                counts[i] += 1
        u = torch.rand(self.local_batch, generator=generator, dtype=torch.float64).tolist()
        t, interval, j = [], [], 0
        for i, count in enumerate(counts):
            lo, size = self.bounds[i], self.bounds[i + 1] - self.bounds[i]
            for _ in range(count):
                t.append((i + u[j]) / self.k if self.path == "flow" else lo + min(int(u[j] * size), size - 1))
                interval.append(i)
                j += 1
        if self.path == "flow":  # t holds s, drawn in float64: rounded to float32, then t = 1 - s
            return 1 - torch.tensor(t, dtype=torch.float64).float(), torch.tensor(interval)
        return torch.tensor(t), torch.tensor(interval)

    def rank_loss(self, rank):
        """This rank's loss at the current step (the model in train mode: labels dropped at random)."""
        index = self.batch(rank)
        x0, y = self.x[index], self.y[index]
        t, interval = self.timesteps(self.generators[rank])
        noise = torch.randn(x0.shape, generator=self.generators[rank])
        torch.set_rng_state(self.cpu_states[rank])
        per_sample = self.flow_loss(x0, y, t, noise) if self.path == "flow" else self.ddpm_loss(x0, y, t, noise)
        self.cpu_states[rank] = torch.get_rng_state()
        if self.log_vars is None:
            return per_sample.mean()
        loss = 0.0
        for i in range(self.k):
            if (interval == i).any():
                interval_loss = per_sample[interval == i].mean() / self.k
                loss = loss + 0.5 * (torch.exp(-self.log_vars[i]) * interval_loss + self.log_vars[i])
        return loss

    def ddpm_loss(self, x0, y, t, noise):
        """Per-sample w(t) * mse + vb of improved DDPM at timesteps t."""
        ac = self.s.alphas_cumprod
        x_t = self.s.at(np.sqrt(ac), t) * x0 + self.s.at(np.sqrt(1 - ac), t) * noise
        out = routed_forward(self.model, x_t, t, y, self.masks)
        mse, vb = hybrid_loss(out, x0, x_t, t, noise, self.s)
        if self.weighting.startswith("min_snr_"):
            gamma = float(self.weighting[len("min_snr_") :])
            w = torch.from_numpy(np.minimum(self.s.snr, gamma) / self.s.snr)[t].float()
        else:
            w = torch.ones(len(t))
        return w * mse + vb

    def flow_loss(self, x1, y, t, noise):
        """Per-sample w(s) * SiT's loss at times t (t = 1 data), s = 1 - t, the velocity the first C channels."""
        tt = t.view(-1, 1, 1, 1)
        x_t, u = tt * x1 + (1 - tt) * noise, x1 - noise
        tasks = torch.round((1 - t.double()) * (self.num_tasks - 1)).long()
        v = routed_forward(self.model, x_t, t, y, self.masks, tasks)[:, : x1.shape[1]]
        mse = ((v - u) ** 2).mean(dim=(1, 2, 3))
        if self.weighting.startswith("min_snr_"):
            gamma, s = float(self.weighting[len("min_snr_") :]), 1 - t.double()
            return torch.minimum((1 - s) ** 2, gamma * s**2).float() * mse
        return mse

    def step(self):
        self.model.train()
        with torch.random.fork_rng(devices=[]):
            losses = [self.rank_loss(rank) for rank in range(self.world_size)]
        self.opt.zero_grad(set_to_none=True)
        (sum(losses) / self.world_size).backward()  # DDP: every rank steps with the mean of the ranks' gradients
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        self.losses.append(float(sum(loss.detach() for loss in losses)) / self.world_size)
        self.opt.step()
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                e.copy_(self.ema_decay * e + (1 - self.ema_decay) * p)
        self.step_count += 1


#################################################################################
#                         train.py compared with the reference                  #
#################################################################################


# train.py's keys for the runs compared with ReferenceTraining (built by `reference`): off their defaults wherever
# the recipe allows, so that a value the recipe drops (or replaces by its default) shows as a difference.
HIDDEN, DEPTH, HEADS = 32, 2, 4  # DiT-T/2 with models.hidden_size=32, models.depth=2
REFERENCE_KEYS = [
    *DIGITS,
    "general.global_batch_size=8",
    "general.global_seed=3",
    "models.class_dropout_prob=0.5",
    "optim.lr=0.002",
    "optim.weight_decay=0.01",
    "optim.ema_decay=0.8",
    "optim.uw_lr=0.05",
    "general.uw_intervals=3",
    "models.routing.alpha=2.0",
    "models.routing.taskcount=1200",
    "logs.results_dir=res",
    "logs.log_every=100",
    "logs.ckpt_every=2",
    "general.iterations=4",
]
# On resume (after step 2): every key that takes effect from the next step on.
CHANGED = {"lr": 0.001, "weight_decay": 0.03, "uw_lr": 0.01, "ema_decay": 0.6}


def reference(weighting, sharing_ratio, changed_after=None, steps=4, world_size=1, batch=8, path="ddpm"):
    """The reference run of REFERENCE_KEYS (this weighting, sharing ratio and path), CHANGED after `changed_after`
    steps."""
    ref = ReferenceTraining(
        hidden=HIDDEN,
        depth=DEPTH,
        heads=HEADS,
        dropout=0.5,
        seed=3,
        batch=batch,
        world_size=world_size,
        weighting=weighting,
        sharing_ratio=sharing_ratio,
        alpha=2.0,
        num_tasks=1200,
        uw_intervals=3,
        lr=0.002,
        weight_decay=0.01,
        uw_lr=0.05,
        ema_decay=0.8,
        path=path,
    )
    for step in range(steps):
        if step == changed_after:
            ref.set(**CHANGED)
        ref.step()
    return ref


def assert_matches_reference(ckpt, ref, log_line=None, first_logged_step=0):
    """The checkpoint's weights, EMA, UW log-variances and AdamW state are the reference's; so is the logged loss."""
    close = dict(rtol=1e-4, atol=1e-6)
    assert ckpt["step"] == ref.step_count
    for key, module in (("model", ref.model), ("ema", ref.ema)):
        state = module.state_dict()
        assert ckpt[key].keys() == state.keys()
        for name, value in state.items():
            torch.testing.assert_close(ckpt[key][name], value, **close, msg=lambda m, n=f"{key}.{name}": f"{n}: {m}")
    if ref.log_vars is None:
        assert ckpt["uw"] is None
    else:
        torch.testing.assert_close(ckpt["uw"]["log_vars"], ref.log_vars.detach(), **close)
    opt = ref.opt.state_dict()
    assert ckpt["opt"]["state"].keys() == opt["state"].keys()
    for i, state in opt["state"].items():
        for name, value in state.items():  # step, exp_avg, exp_avg_sq
            tol = dict(rtol=1e-4, atol=1e-12) if name == "exp_avg_sq" else close
            torch.testing.assert_close(
                ckpt["opt"]["state"][i][name], value, **tol, msg=lambda m, n=f"{i}.{name}": f"opt {n}: {m}"
            )
    for saved, ours in zip(ckpt["opt"]["param_groups"], opt["param_groups"], strict=True):
        assert (saved["lr"], saved["weight_decay"]) == (ours["lr"], ours["weight_decay"])
    if log_line is not None:  # the log's columns: loss and gradient norm averaged over the steps since the last line
        loss, norm = (float(v) for v in re.search(r"Train Loss: ([\d.]+), Grad Norm: ([\d.]+)", log_line).groups())
        steps = slice(first_logged_step, None)
        assert loss == pytest.approx(sum(ref.losses[steps]) / len(ref.losses[steps]), abs=2e-4)
        assert norm == pytest.approx(sum(ref.grad_norms[steps]) / len(ref.grad_norms[steps]), abs=2e-4)


def last_log_line(experiment_dir):
    with open(os.path.join(experiment_dir, "log.txt")) as f:
        return [line for line in f if "Train Loss" in line][-1]


#################################################################################
#                                     Sampling                                  #
#################################################################################


def kept_timesteps(sampler, steps):
    """The timesteps a respaced sampler visits: DDIM's integer stride (0, s, 2s, ...), else `steps` evenly
    spaced from 0 to T - 1 (rounded half to even)."""
    if sampler == "ddim":
        stride = next(s for s in range(1, T) if len(range(0, T, s)) == steps)
        return list(range(0, T, stride))
    return [int(v) for v in np.round(np.linspace(0, T - 1, steps))]


def guided(model, x, t, y, masks, cfg_scale, num_classes):
    """(eps, v) for x: eps = uncond + cfg_scale * (cond - uncond) on every channel (the null class is num_classes),
    v (the variance output) the conditional one's."""
    C = x.shape[1]
    cond = routed_forward(model, x, t, y, masks)
    if cfg_scale <= 1:
        return cond[:, :C], cond[:, C:]
    uncond = routed_forward(model, x, t, torch.full_like(y, num_classes), masks)
    return uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C]), cond[:, C:]


@torch.no_grad()
def sample(model, z, y, generator, *, sampler, steps, cfg_scale, num_classes, masks=None):
    """Denoise z (B, C, s, s) for labels y over the kept timesteps t_K > ... > t_1 (a_j = alphas_cumprod[t_j],
    a_0 = 1 after the last):

    x0 = (x - sqrt(1 - a_j) eps) / sqrt(a_j); DDIM (eta = 0): x <- sqrt(a_{j-1}) x0 + sqrt(1 - a_{j-1}) eps;
    DDPM: x <- mean + sigma * noise with the posterior of the respaced step (beta_j = 1 - a_j / a_{j-1}) and
    log sigma^2 = f log beta_j + (1 - f) log beta~_j, f = (v + 1) / 2 (beta~ of the first step: the second's).
    Every step draws its noise from generator for the guided batch (cond and uncond halves: 2B) and uses the
    conditional half, as the recipe's sampler does; DDIM and the last step draw it without using it.
    """
    ts, a = kept_timesteps(sampler, steps), Schedule().alphas_cumprod
    a_at = [float(a[t]) for t in ts]
    a_prev = [1.0, *a_at[:-1]]
    beta = [1 - a_at[j] / a_prev[j] for j in range(len(ts))]
    beta_tilde = [beta[j] * (1 - a_prev[j]) / (1 - a_at[j]) for j in range(len(ts))]
    beta_tilde[0] = beta_tilde[1] if len(ts) > 1 else beta[0]
    x, draws = z, 2 if cfg_scale > 1 else 1
    for j in reversed(range(len(ts))):
        eps, v = guided(model, x, torch.full((len(x),), ts[j], dtype=torch.long), y, masks, cfg_scale, num_classes)
        x0 = (x - math.sqrt(1 - a_at[j]) * eps) / math.sqrt(a_at[j])
        noise = torch.randn((draws * len(x), *x.shape[1:]), generator=generator)[: len(x)]
        if sampler == "ddim":
            x = math.sqrt(a_prev[j]) * x0 + math.sqrt(1 - a_prev[j]) * eps
            continue
        mean = (
            beta[j] * math.sqrt(a_prev[j]) / (1 - a_at[j]) * x0
            + (1 - a_prev[j]) * math.sqrt(1 - beta[j]) / (1 - a_at[j]) * x
        )
        frac = (v + 1) / 2
        log_var = frac * math.log(beta[j]) + (1 - frac) * math.log(beta_tilde[j])
        x = mean + (torch.exp(0.5 * log_var) * noise if j > 0 else 0)
    return x


def to_uint8_digits(x):
    """Digits in [-1, 1] (B, 1, 8, 8) to the (B, 8, 8, 3) gray uint8 images written: round((x + 1) * 127.5)."""
    gray = ((x[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return gray[..., None].expand(*gray.shape, 3).numpy()


def sample_ddp(model, shape, n, world_size, batch, seed, draw=sample, **kwargs):
    """sample_ddp.py's samples: rank r draws samples r, r + W, ... in batches, from a generator seeded
    seed * W + r (noise of `shape` per sample, then labels, then the sampler's draws), each batch denoised by
    draw(model, z, y, generator, **kwargs) (`sample`, or `flow_sample`). Returns (x, labels) in sample order."""
    xs, labels = [None] * n, [None] * n
    for rank in range(world_size):
        generator = torch.Generator().manual_seed(seed * world_size + rank)
        mine = list(range(rank, n, world_size))
        for start in range(0, len(mine), batch):
            index = mine[start : start + batch]
            z = torch.randn((len(index), *shape), generator=generator)
            y = torch.randint(0, kwargs["num_classes"], (len(index),), generator=generator)
            out = draw(model, z, y, generator, **kwargs)
            for i, k in enumerate(index):
                xs[k], labels[k] = out[i], int(y[i])
    return torch.stack(xs), np.array(labels)


#################################################################################
#            SiT's flow matching (willisma/SiT transport/), written out         #
#################################################################################
# SiT's Linear path (ICPlan: alpha_t = t, sigma_t = 1 - t, t = 1 data) with velocity prediction, where
# create_transport sets train_eps = sample_eps = 0, so training times are U[0, 1) and the ODE runs over [0, 1].


def sit_forward(model, x, t, y):
    """SiT's forward: the DiT's output with its learned-sigma half dropped (`x, _ = x.chunk(2, dim=1)`)."""
    out = routed_forward(model, x, t, y, None)
    return out.chunk(2, dim=1)[0] if model.learn_sigma else out


def sit_forward_with_cfg(model, x, t, y, cfg_scale, guided_channels=3):
    """SiT's forward_with_cfg: the first half of x twice, guidance uncond + s (cond - uncond) on the first
    `guided_channels` output channels (SiT's 3; `in_channels` is its commented-out standard choice)."""
    half = x[: len(x) // 2]
    out = sit_forward(model, torch.cat([half, half], 0), t, y)
    eps, rest = out[:, :guided_channels], out[:, guided_channels:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([half_eps, half_eps], 0), rest], dim=1)


def sit_training_loss(forward, x1, x0, t, **model_kwargs):
    """Transport.training_losses' "loss" for (t, x0 noise, x1 data): ICPlan.plan, then mean_flat((v - u_t)^2)."""
    tt = t.view(t.size(0), *([1] * (x1.ndim - 1)))  # expand_t_like_x
    alpha_t, d_alpha_t = tt, 1  # ICPlan.compute_alpha_t
    sigma_t, d_sigma_t = 1 - tt, -1  # ICPlan.compute_sigma_t
    xt = alpha_t * x1 + sigma_t * x0
    ut = d_alpha_t * x1 + d_sigma_t * x0
    out = forward(xt, t, **model_kwargs)
    return torch.mean((out - ut) ** 2, dim=list(range(1, x1.ndim)))


def sit_sample_ode(forward, x, num_steps, method, atol=1e-6, rtol=1e-3, **model_kwargs):
    """Sampler.sample_ode(...)(x, forward, **kwargs)[-1]: torchdiffeq's odeint over linspace(0, 1, num_steps),
    the model called at t = ones(B) * t."""
    from torchdiffeq import odeint

    def fn(t, x):
        return forward(x, torch.ones(x.size(0)).to(x.device) * t, **model_kwargs)

    grid = torch.linspace(0, 1, num_steps).to(x.device)
    return odeint(fn, x, grid, method=method, atol=[atol], rtol=[rtol])[-1]


def euler_heun_by_hand(forward, x, num_steps, heun, **model_kwargs):
    """Euler, or Heun's method (x + dt/2 (k1 + k2), k2 at the Euler point of the next time), over
    linspace(0, 1, num_steps): what torchdiffeq's "euler" and "heun2" compute on SiT's grid."""
    grid = torch.linspace(0, 1, num_steps)
    for t0, t1 in zip(grid[:-1].tolist(), grid[1:].tolist()):
        dt = t1 - t0
        k1 = forward(x, torch.full((len(x),), t0), **model_kwargs)
        if not heun:
            x = x + dt * k1
            continue
        k2 = forward(x + dt * k1, torch.full((len(x),), t1), **model_kwargs)
        x = x + dt / 2 * (k1 + k2)
    return x


@torch.no_grad()
def flow_sample(model, z, y, generator, *, sampler, steps, cfg_scale, num_classes, masks=None, num_tasks=T):
    """A flow model's samples: Euler or Heun over linspace(0, 1, steps) from z (t = 0) to data (t = 1), the
    velocity the first C output channels, uncond + cfg_scale * (cond - uncond) on all of them, every block routed
    by task round((1 - t)(T - 1)). Draws nothing from generator (the ODE is deterministic)."""
    C = z.shape[1]

    def velocity(x, t, y):
        tasks = torch.round((1 - t.double()) * (num_tasks - 1)).long()
        cond = routed_forward(model, x, t, y, masks, tasks)[:, :C]
        if cfg_scale <= 1:
            return cond
        uncond = routed_forward(model, x, t, torch.full_like(y, num_classes), masks, tasks)[:, :C]
        return uncond + cfg_scale * (cond - uncond)

    return euler_heun_by_hand(velocity, z, steps, heun=sampler == "heun2", y=y)
