"""
Train a class-conditional DiT with Denoising Task Routing (DTR), with PyTorch DDP.

The paper code's command line (byeongjun-park/DTR), on any number of GPUs or nodes:

    torchrun --nnodes=1 --nproc_per_node=8 train.py general.data_path=<PATH> \
        general.loss_weight_type=uw models.name=DiT-L/2 models.routing.sharing_ratio=0.8

and on a laptop CPU (scikit-learn's digits, pixel space):

    python train.py data=digits

models.routing.sharing_ratio=1.0 trains the baseline (no routing). Checkpoints hold
{model, ema, opt, uw, config, step, rng}; general.resume=<ckpt> continues a run exactly.
"""

import copy
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

import common
import config
from data import ResumableSampler, build_dataset, steps_per_epoch
from diffusion import create_diffusion
from dtr.weighting import StratifiedTimestepSampler, UncertaintyWeighting, interval_index, uniform_intervals

#################################################################################
#                             Training Helper Functions                         #
#################################################################################


@torch.no_grad()
def update_ema(ema_model, model, decay=0.9999):
    """Step the EMA model towards the current model: ema = decay * ema + (1 - decay) * model."""
    ema_params = list(ema_model.parameters())
    model_params = list(model.parameters())
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, model_params, alpha=1 - decay)


def requires_grad(model, flag=True):
    for p in model.parameters():
        p.requires_grad = flag


def save_checkpoint(checkpoint, path):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a checkpoint."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state(generator, device):
    """This process's random state: torch's global generators (label dropout) and the training generator."""
    state = {"cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, generator, device):
    torch.set_rng_state(state["cpu"])
    generator.set_state(state["generator"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(generator, device):
    """Every rank's random state, as a list indexed by rank (all ranks must call this)."""
    state = rng_state(generator, device)
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def batches(loader, sampler, start_step, local_batch_size, epoch_steps):
    """Endless (epoch, x, y) batches, starting at batch `start_step` of the epoch-by-epoch order."""
    epoch, skip = divmod(start_step, epoch_steps)
    while True:
        sampler.set_epoch(epoch, skip * local_batch_size)
        for x, y in loader:
            yield epoch, x, y
        epoch, skip = epoch + 1, 0


@torch.no_grad()
def to_model_input(x, kind, vae, scale, generator):
    """A data batch to what the DiT denoises: random horizontal flip, then a VAE latent sample.

    "pixels" (digits) are used as they are. "images" are flipped and encoded by the VAE;
    "latents" (extract_latents.py) hold both flips' posterior mean and std: pick one, sample.
    All randomness comes from `generator`, so runs and resumed runs repeat exactly.
    """
    if kind == "pixels":
        return x
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    if kind == "images":
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        posterior = vae.encode(x).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()
    else:
        chosen = x[torch.arange(x.shape[0], device=x.device), flip.long()].float()  # (B, 2, C, s, s)
        mean, std = chosen[:, 0], chosen[:, 1]
    noise = torch.randn(mean.shape, generator=generator, device=mean.device)
    return (mean + std * noise) * scale


#################################################################################
#                                  Training Loop                                #
#################################################################################


def main(cfg):
    """Train as cfg says; returns a summary (experiment folder, final checkpoint, step times)."""
    # Setup processes, seeds and the experiment folder:
    rank, world_size, device = common.setup_distributed(cfg)
    g = cfg.general
    if g.global_batch_size % world_size:
        raise config.ConfigError(f"general.global_batch_size={g.global_batch_size} must be divisible by the {world_size} processes")
    local_batch_size = g.global_batch_size // world_size
    seed = g.global_seed * world_size + rank
    resume = common.load_checkpoint(g.resume) if g.resume is not None else None
    if resume is not None:
        common.check_same_model(cfg, resume["config"], g.resume, keys=(*common.MODEL_KEYS, "general.loss_weight_type"))
        experiment_dir = os.path.dirname(os.path.dirname(os.path.normpath(g.resume))) or "."  # .../NNN/checkpoints/x.pt
    else:
        experiment_dir = config.new_experiment_dir(cfg) if rank == 0 else None
    if dist.is_initialized():  # every rank agrees on rank 0's folder
        holder = [experiment_dir]
        dist.broadcast_object_list(holder, src=0)
        experiment_dir = holder[0]
    checkpoint_dir = os.path.join(experiment_dir, "checkpoints")
    if rank == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
        with open(os.path.join(experiment_dir, "config.yaml"), "w") as f:
            f.write(config.to_yaml(cfg))
    common.barrier()
    logger = common.create_logger(experiment_dir if rank == 0 else None, rank)
    logger.info(f"Experiment directory: {experiment_dir} ({world_size} process(es), {device})")

    # Create the model, route it, and make its EMA (after routing: the copy routes by its own inputs):
    torch.manual_seed(g.global_seed)  # the same initial weights on every rank
    model = common.build_model(cfg)
    routing = common.route(model, cfg)
    model.gradient_checkpointing = g.grad_checkpoint
    ema = copy.deepcopy(model).to(device)
    requires_grad(ema, False)
    model = model.to(device)
    logger.info(f"DiT parameters: {sum(p.numel() for p in model.parameters()):,}")
    logger.info(routing.summary() if routing is not None else "No routing (models.routing.sharing_ratio=1.0: the baseline)")

    # Diffusion, loss weighting and optimizer (AdamW, constant lr; ANT-UW's log-variances get their own group):
    diffusion = create_diffusion(timestep_respacing="", noise_schedule=g.schedule_name, loss_weight_type=g.loss_weight_type)
    uw, stratified, intervals = None, None, None
    param_groups = [{"params": model.parameters()}]
    if g.loss_weight_type == "uw":
        intervals = uniform_intervals(diffusion.num_timesteps, g.uw_intervals)
        stratified = StratifiedTimestepSampler(intervals)
        uw = UncertaintyWeighting(g.uw_intervals).to(device)
        param_groups.append(uw.param_group(lr=cfg.optim.uw_lr))
    opt = torch.optim.AdamW(param_groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)

    # Data: a resumable DistributedSampler; each rank loads global_batch_size / world_size per step.
    dataset = build_dataset(cfg)
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, seed=g.global_seed)
    loader = DataLoader(
        dataset,
        batch_size=local_batch_size,
        sampler=sampler,
        num_workers=g.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=g.num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # keeps the loader off torch's global generator
    )
    epoch_steps = steps_per_epoch(len(dataset), world_size, local_batch_size)
    if epoch_steps == 0:
        raise config.ConfigError(f"general.global_batch_size={g.global_batch_size} is larger than the data set ({len(dataset)} samples)")
    logger.info(f"Dataset: {len(dataset):,} samples ({dataset.kind}), {epoch_steps} steps per epoch")
    vae, scale = None, None
    if dataset.kind == "images":
        vae = common.load_vae(cfg, device)
        scale = common.vae_scaling_factor(vae)
    elif dataset.kind == "latents":
        scale = float(dataset.meta["scaling_factor"])

    # Initial state, or the checkpoint's (weights, optimizer, UW, step and every random generator):
    generator = torch.Generator(device).manual_seed(seed)  # timesteps, noise, flips, latent samples
    torch.manual_seed(seed)  # label dropout
    train_steps = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["opt"])
        if uw is not None:
            uw.load_state_dict(resume["uw"])
        train_steps = resume["step"]
        states = resume["rng"]
        if len(states) == world_size:
            set_rng_state(states[rank], generator, device)
        else:
            logger.warning(f"checkpoint written by {len(states)} processes, resuming on {world_size}: the run continues, but not bit-exactly")
        logger.info(f"Resumed from {g.resume} at step {train_steps}")
        del resume
    else:
        update_ema(ema, model, decay=0)  # the EMA starts as a copy of the (synced) weights

    # DDP, then compile (routing hooks are already in place):
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if dist.is_initialized() else model
    train_model = torch.compile(ddp_model) if g.compile else ddp_model
    model.train()  # enables label dropout for classifier-free guidance
    ema.eval()

    writer = None
    if rank == 0 and cfg.logs.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(experiment_dir, "tensorboard"))

    def checkpoint(step):
        states = gather_rng_states(generator, device)
        if rank == 0:
            path = os.path.join(checkpoint_dir, f"{step:07d}.pt")
            save_checkpoint({
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "uw": uw.state_dict() if uw is not None else None,
                "config": config.to_container(cfg),
                "step": step,
                "rng": states,
            }, path)
            logger.info(f"Saved checkpoint to {path}")
        common.barrier()
        return os.path.join(checkpoint_dir, f"{step:07d}.pt")

    logger.info(f"Training from step {train_steps} to {g.iterations}...")
    data_iter = batches(loader, sampler, train_steps, local_batch_size, epoch_steps)
    running_loss, log_steps, start_time = 0.0, 0, time.time()
    step_times, last_ckpt, avg_loss = [], None, float("nan")
    progress = tqdm(total=g.iterations, initial=train_steps, dynamic_ncols=True, disable=None if rank == 0 else True)
    while train_steps < g.iterations:
        epoch, x, y = next(data_iter)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with common.autocast(cfg, device):
            x = to_model_input(x, dataset.kind, vae, scale, generator)
        if stratified is not None:
            t = stratified.sample(x.shape[0], device=device, generator=generator)
        else:
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device, generator=generator)
        noise = torch.randn(x.shape, device=device, generator=generator)
        with common.autocast(cfg, device):
            loss_dict = diffusion.training_losses(train_model, x, t, model_kwargs=dict(y=y), noise=noise)
        per_sample = loss_dict["loss"].float()
        loss = uw(per_sample, interval_index(t, intervals)) if uw is not None else per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if uw is not None and dist.is_initialized():  # average UW's gradient over ranks, as DDP does for the model's
            dist.all_reduce(uw.log_vars.grad)
            uw.log_vars.grad /= world_size
        opt.step()
        update_ema(ema, model, decay=cfg.optim.ema_decay)

        # Log loss values:
        running_loss += loss.item()
        log_steps += 1
        train_steps += 1
        step_times.append(time.perf_counter())
        progress.update(1)
        if train_steps % cfg.logs.log_every == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            steps_per_sec = log_steps / (time.time() - start_time)
            avg_loss = common.all_reduce_mean(running_loss / log_steps, device)
            message = f"(step={train_steps:07d}, epoch={epoch}) Train Loss: {avg_loss:.4f}, Train Steps/Sec: {steps_per_sec:.2f}"
            if uw is not None:
                message += f", UW weights: {[round(w, 3) for w in uw.weights().tolist()]}"
            logger.info(message)
            progress.set_postfix(loss=f"{avg_loss:.4f}")
            if writer is not None:
                writer.add_scalar("train/loss", avg_loss, train_steps)
                writer.add_scalar("train/steps_per_sec", steps_per_sec, train_steps)
                if uw is not None:
                    for i, w in enumerate(uw.weights().tolist()):
                        writer.add_scalar(f"uw/weight_{i}", w, train_steps)
            running_loss, log_steps, start_time = 0.0, 0, time.time()

        # Save checkpoints:
        if train_steps % cfg.logs.ckpt_every == 0 or train_steps == g.iterations:
            last_ckpt = checkpoint(train_steps)
    progress.close()
    if last_ckpt is None:  # nothing left to train (resumed at or past general.iterations)
        last_ckpt = g.resume

    model.eval()
    if writer is not None:
        writer.close()
    logger.info("Done!")
    common.cleanup()
    return {"experiment_dir": experiment_dir, "checkpoint": last_ckpt, "step": train_steps, "loss": avg_loss, "step_times": step_times}


if __name__ == "__main__":
    config.run(main)
