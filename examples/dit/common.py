"""Pieces train.py, sample.py, sample_ddp.py and extract_latents.py share: processes, models, VAE, sampling."""

import inspect
import logging
import os
import warnings

import torch
import torch.distributed as dist

import config
import dtr
import runs
from models import DiT

#################################################################################
#                                   Processes                                   #
#################################################################################


def setup_distributed(cfg):
    """(rank, world_size, device). Under torchrun: one process per GPU (NCCL) or per CPU slot (gloo).

    Started as plain `python script.py`, the script runs as a single process with no process group.
    """
    want = cfg.general.device
    use_cuda = torch.cuda.is_available() if want == "auto" else want == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("general.device=cuda but no CUDA device is available (use general.device=cpu)")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        device = torch.device("cuda", local_rank + cfg.general.gpu_offset)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convolutions on Ampere and later
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        # device_id (torch >= 2.3) binds NCCL to this rank's GPU at once instead of at the first collective
        bind = use_cuda and "device_id" in inspect.signature(dist.init_process_group).parameters
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", **({"device_id": device} if bind else {}))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value, device):
    """Mean of a float over all processes."""
    if not dist.is_initialized():
        return value
    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


class _TqdmHandler(logging.StreamHandler):
    """Log lines that do not break a running tqdm bar."""

    def emit(self, record):
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record))
        except Exception:
            self.handleError(record)


def create_logger(logging_dir, rank):
    """Rank 0 logs to the terminal and to {logging_dir}/log.txt; other ranks stay silent."""
    logger = logging.getLogger("dit")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if rank != 0:
        logger.addHandler(logging.NullHandler())
        return logger
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers = [_TqdmHandler()]
    if logging_dir is not None:
        handlers.append(logging.FileHandler(os.path.join(logging_dir, "log.txt")))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


def autocast(mixed_precision, device):
    """bf16 autocast on GPU when mixed_precision (general.mixed_precision); a no-op on CPU."""
    enabled = bool(mixed_precision) and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


#################################################################################
#                                     Models                                    #
#################################################################################


def build_model(cfg):
    """The DiT of models.name (with its size overrides) for this data set; not routed yet."""
    depth, hidden, heads, patch = config.architecture(cfg)
    return DiT(
        input_size=config.input_size(cfg),
        patch_size=patch,
        in_channels=config.in_channels(cfg),
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        class_dropout_prob=cfg.models.class_dropout_prob,
        num_classes=cfg.data.num_classes,
        learn_sigma=True,
    )


def route(model, cfg):
    """dtr.wrap the model as models.routing asks; sharing_ratio = 1.0 (the baseline) leaves it untouched.

    Under general.path=flow the model gets SiT's t in [0, 1] (1 = data): timestep_kind="unit_reversed", and
    models.routing.task_axis=logsnr routes its noise level 1 - t to the DDPM task of equal log-SNR.
    """
    if not config.is_routed(cfg):
        return None
    r = cfg.models.routing
    return dtr.wrap(
        model,
        sharing_ratio=r.sharing_ratio,
        alpha=r.alpha,
        method=config.routing_method(cfg),
        num_tasks=r.taskcount,
        seed=r.seed,
        task_axis=str(r.task_axis),
        timestep_kind="unit_reversed" if config.is_flow(cfg) else None,
    )


def load_model_for_sampling(cfg, device, log=print):
    """The trained DiT (EMA weights unless eval.use_ema=false), routed as configured, in eval mode.

    The checkpoint is verified against its digest and its model keys against cfg (ConfigError naming the file).
    """
    path = runs.checkpoint_path(cfg)
    ckpt, note = runs.load_checkpoint(path, mmap=True)
    if note is not None:
        log(note)
    if "model" in ckpt:  # a train.py checkpoint
        if "config" in ckpt:
            runs.check_same_model(cfg, ckpt["config"], path)
        state = ckpt["ema"] if cfg.eval.use_ema else ckpt["model"]
    else:  # a bare state dict
        state = ckpt
    model = build_model(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # a foreign file, or other model keys than the config's
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:])[:300]
        raise config.ConfigError(
            f"{path} does not hold the weights of {cfg.models.name} as configured: {detail}"
        ) from None
    route(model, cfg)
    log(f"Loaded {'EMA ' if cfg.eval.use_ema and 'ema' in ckpt else ''}weights from {path}")
    return model.to(device).eval()


#################################################################################
#                                      VAE                                      #
#################################################################################


def load_vae(cfg, device):
    """diffusers' AutoencoderKL: stabilityai/sd-vae-ft-{ema,mse}, a local folder, or general.vae_config.

    general.vae_config builds the architecture from a JSON config with random weights (seed 0, the
    same on every process and in every script), so the whole recipe runs offline in tests.
    """
    from diffusers.models import AutoencoderKL

    g = cfg.general
    if g.vae_config is not None:
        vae_cfg = AutoencoderKL.load_config(g.vae_config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vae = AutoencoderKL.from_config(vae_cfg)
    else:
        name = f"stabilityai/sd-vae-ft-{g.vae}" if g.vae in config.PRETRAINED_VAES else g.vae
        vae = AutoencoderKL.from_pretrained(name)
    return vae.to(device).eval().requires_grad_(False)


def vae_scaling_factor(vae):
    return float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215)


#################################################################################
#                                    Sampling                                   #
#################################################################################


def sample(model, diffusion, z, y, cfg, generator):
    """Denoise noise z (n, C, s, s) for labels y (n,), with classifier-free guidance when eval.cfg_scale > 1.

    `diffusion` is sampling_diffusion(cfg)'s: DDPM's loop (drawing from generator), or flow's ODE (deterministic).
    """
    using_cfg = cfg.eval.cfg_scale > 1.0 and cfg.data.num_classes > 1
    if using_cfg:
        z = torch.cat([z, z], 0)
        y = torch.cat([y, torch.full_like(y, cfg.data.num_classes)], 0)  # the null class
        kwargs = dict(y=y, cfg_scale=cfg.eval.cfg_scale, guide_channels=cfg.eval.guide_channels)
        fn = model.forward_with_cfg
    else:
        kwargs = dict(y=y)
        fn = model.forward
    e = cfg.eval
    with autocast(cfg.general.mixed_precision, z.device):
        if config.is_flow(cfg):
            out = diffusion.sample_ode(fn, z, e.num_sampling_steps, e.sampler, kwargs, atol=e.atol, rtol=e.rtol)
        else:
            loop = diffusion.ddim_sample_loop if e.sampler == "ddim" else diffusion.p_sample_loop
            out = loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs, device=z.device, generator=generator)
    out = out.float()
    return out.chunk(2, dim=0)[0] if using_cfg else out


@torch.no_grad()
def to_images(x, cfg, vae, chunk=32):
    """Model outputs to (n, H, W, 3) uint8: VAE-decoded for ImageNet, the pixels themselves for digits."""
    if cfg.data.name == "digits":
        from data import digits_to_uint8

        gray = digits_to_uint8(x[:, 0]).cpu()
        return gray[..., None].expand(*gray.shape, 3).contiguous().numpy()
    out = []
    for part in x.split(chunk):
        with autocast(cfg.general.mixed_precision, part.device):
            images = vae.decode(part / vae_scaling_factor(vae)).sample
        images = torch.clamp(127.5 * images.float() + 128.0, 0, 255)
        out.append(images.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8))
    return torch.cat(out).numpy()


def sampling_diffusion(cfg):
    """The process to sample with: the flow (general.path=flow), or the diffusion respaced to the sampler's steps."""
    from diffusion import create_diffusion, create_flow

    if config.is_flow(cfg):
        return create_flow()

    steps = cfg.eval.num_sampling_steps
    respacing = f"ddim{steps}" if cfg.eval.sampler == "ddim" else str(steps)
    try:
        return create_diffusion(respacing, noise_schedule=cfg.general.schedule_name)
    except ValueError:  # DDIM needs an integer stride; fall back to evenly spaced steps
        warnings.warn(
            f"eval.num_sampling_steps={steps}: no integer DDIM stride, using evenly spaced steps", stacklevel=2
        )
        return create_diffusion(str(steps), noise_schedule=cfg.general.schedule_name)
