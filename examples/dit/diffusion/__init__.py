"""The DiT recipe's processes: create_diffusion() builds the Gaussian diffusion DiT and the DTR paper use,
create_flow() SiT's flow matching (general.path=flow)."""

from . import gaussian_diffusion as gd
from .flow import create_flow
from .respace import SpacedDiffusion, space_timesteps


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
    loss_weight_type="constant",
):
    """A (possibly respaced) diffusion: eps prediction, learned-range sigma and the hybrid loss by default.

    timestep_respacing: "" or None keeps all `diffusion_steps`; "250" keeps 250 evenly spaced steps;
    "ddim50" uses DDIM's integer stride; "10,15,20" spaces sections separately. The model always sees
    original timesteps. loss_weight_type: "constant" | "min_snr_<gamma>" | "p2weight_<gamma>_<k>" | "uw".
    """
    betas = gd.get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        model_var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        model_var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=model_var_type,
        loss_type=loss_type,
        loss_weight_type=loss_weight_type,
    )


__all__ = ["create_diffusion", "create_flow", "SpacedDiffusion", "space_timesteps", "gd"]
