"""Timestep respacing: sample (or train) with a subset of the original timesteps.

The model always sees ORIGINAL timesteps (integers in 0 .. T-1), as in DiT (rescale_timesteps=False):
a network trained on 1000 steps, and the DTR masks indexed by its timestep, work unchanged.
"""

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """The set of original timesteps to keep.

    section_counts is a list of step counts, one per equal-size section of [0, T) (e.g. [10, 15, 20]),
    the same as a comma-separated string ("250" = 250 evenly spaced steps, first 0 and last T-1),
    or "ddimN": the DDIM paper's integer stride giving exactly N steps starting at 0.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired_count} steps from {num_timesteps} with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulate the float stride (not i * stride) so the kept steps match DiT's exactly.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion process that keeps only `use_timesteps` of a base process built from kwargs.

    New betas are chosen so that alphas_cumprod at the kept steps equal the original ones. Models
    passed to any method receive the original timesteps; loss weights use the original SNR.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base_diffusion = GaussianDiffusion(**kwargs)
        self.timestep_map = sorted(self.use_timesteps)
        assert self.timestep_map[0] >= 0 and self.timestep_map[-1] < self.original_num_steps
        kept_alphas_cumprod = base_diffusion.alphas_cumprod[self.timestep_map]
        last_alphas_cumprod = np.append(1.0, kept_alphas_cumprod[:-1])
        kwargs["betas"] = 1.0 - kept_alphas_cumprod / last_alphas_cumprod
        super().__init__(**kwargs)
        self._set_loss_weights(base_diffusion.snr[self.timestep_map])

    def _wrap_model(self, model):
        """Wrap a model (or cond_fn) so it receives original timesteps."""
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)


class _WrappedModel:
    """Calls model(x, timestep_map[t], **kwargs): respaced indices in, original timesteps out."""

    def __init__(self, model, timestep_map):
        self.model = model
        self.timestep_map = timestep_map

    def __call__(self, x, ts, **kwargs):
        map_tensor = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        return self.model(x, map_tensor[ts], **kwargs)
