"""
Train a class-conditional DiT with Denoising Task Routing (DTR), with PyTorch DDP.

The paper code's command line (byeongjun-park/DTR), on any number of GPUs or nodes:

    torchrun --nnodes=1 --nproc_per_node=8 train.py general.data_path=<PATH> \
        general.loss_weight_type=uw models.name=DiT-L/2 models.routing.sharing_ratio=0.8

and on a laptop CPU (scikit-learn's digits, pixel space):

    python train.py data=digits

general.path=flow trains the same DiT with SiT's flow matching instead (diffusion/flow.py), with the same keys.

models.routing.sharing_ratio=1.0 trains the baseline (no routing). The run's folder, its checkpoints and
resuming (general.resume, general.fork) are runs.py's. Configuration errors exit with code 2 before anything
is written; a loss that turns inf or NaN stops training (exit 1) before it reaches a checkpoint.
"""

import copy
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

import common
import config
import runs
from data import ResumableSampler, build_dataset, steps_per_epoch
from diffusion import create_diffusion, create_flow
from diffusion.flow import Flow
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


def training_process(cfg):
    """What the model learns: SiT's flow (general.path=flow) or the paper's 1000-step Gaussian diffusion, with the
    loss weighting of general.loss_weight_type."""
    g = cfg.general
    if config.is_flow(cfg):
        return create_flow(loss_weight_type=g.loss_weight_type, **config.flow_density(cfg))
    return create_diffusion("", noise_schedule=g.schedule_name, loss_weight_type=g.loss_weight_type)


def ant_uw(cfg, process, device):
    """ANT-UW's (intervals, stratified sampler, uncertainty weighting); Nones for other weightings.

    DDPM: general.uw_intervals uniform intervals of the timesteps [0, T). Flow: as many intervals of the noise
    level s, of equal probability under the flow density (uniform: equal intervals of [0, 1]).
    """
    g = cfg.general
    if g.loss_weight_type != "uw":
        return None, None, None
    if isinstance(process, Flow):
        intervals, sampler = process.stratified(g.uw_intervals)
    else:
        intervals = uniform_intervals(process.num_timesteps, g.uw_intervals)
        sampler = StratifiedTimestepSampler(intervals)
    return intervals, sampler, UncertaintyWeighting(g.uw_intervals).to(device)


def training_times(process, stratified, n, device, generator):
    """(t for the model, the level ANT-UW's intervals split) of one batch, drawn from generator.

    DDPM: timesteps in [0, T), uniform or stratified, both. Flow: SiT's t in [0, 1) and the noise level s = 1 - t
    (ANT-UW draws s stratified, and t = 1 - s).
    """
    flow = isinstance(process, Flow)
    if stratified is not None:
        level = stratified.sample(n, device=device, generator=generator)
        return (1 - level if flow else level), level
    if flow:
        t = process.sample_time(n, device=device, generator=generator)
        return t, 1 - t
    t = torch.randint(0, process.num_timesteps, (n,), device=device, generator=generator)
    return t, t


def data_loader(dataset, sampler, local_batch_size, num_workers, seed, device):
    """Full batches in the sampler's order; the loader's own generator keeps it off torch's global one."""
    return DataLoader(
        dataset,
        batch_size=local_batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def latent_scale(dataset, vae):
    """The factor that scales VAE latents to unit variance: the VAE's for images, the one stored with precomputed
    latents (extract_latents.py), None for pixels."""
    if dataset.kind == "images":
        return common.vae_scaling_factor(vae)
    return float(dataset.meta["scaling_factor"]) if dataset.kind == "latents" else None


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became inf or NaN; training stopped before the optimizer step."""


def all_finite(tensors):
    """True when no tensor holds an inf or a NaN."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def diverged(logger, writer, what, last_ckpt):
    """Stop: log why, and where training can go on from (nothing non-finite was saved)."""
    last = f"the last checkpoint, {last_ckpt}, is intact" if last_ckpt is not None else "no checkpoint was written"
    message = f"training diverged: {what}; {last}. Resume from it with a lower optim.lr, or check the data"
    logger.error(message)
    if writer is not None:
        writer.close()
    return TrainingDiverged(message)


def tensorboard_writer(experiment_dir):
    """Scalars in {experiment_dir}/tensorboard (logs.tensorboard=true)."""
    from torch.utils.tensorboard import SummaryWriter  # tensorboard is needed only when logs.tensorboard=true

    return SummaryWriter(os.path.join(experiment_dir, "tensorboard"))


def log_progress(logger, writer, step, epoch, loss, grad_norm, lr, steps_per_sec, uw_weights):
    """One log line (and the tensorboard scalars) for the steps since the last one."""
    message = (
        f"(step={step:07d}, epoch={epoch}) Train Loss: {loss:.4f}, Grad Norm: {grad_norm:.4f}, "
        f"LR: {lr:.4g}, Train Steps/Sec: {steps_per_sec:.2f}"
    )
    if uw_weights is not None:
        message += f", UW weights: {[round(w, 3) for w in uw_weights]}"
    logger.info(message)
    if writer is not None:
        for name, value in (("loss", loss), ("grad_norm", grad_norm), ("lr", lr), ("steps_per_sec", steps_per_sec)):
            writer.add_scalar(f"train/{name}", value, step)
        for i, w in enumerate(uw_weights or []):
            writer.add_scalar(f"uw/weight_{i}", w, step)


#################################################################################
#                                  Training Loop                                #
#################################################################################


def main(cfg):
    """Train as cfg says; returns a summary (experiment folder, final checkpoint, step times)."""
    # Setup processes and seeds; check the resume (nothing is written before the config has passed every check):
    rank, world_size, device = common.setup_distributed(cfg)
    g = cfg.general
    if g.global_batch_size % world_size:
        raise config.ConfigError(
            f"general.global_batch_size={g.global_batch_size} must be divisible by the {world_size} processes"
        )
    local_batch_size = g.global_batch_size // world_size
    seed = g.global_seed * world_size + rank
    resume, run_dir, notes = runs.prepare_resume(cfg)  # (None, None, []) for a fresh run

    # Create the model, route it, and make its EMA (after routing: the copy routes by its own inputs):
    torch.manual_seed(g.global_seed)  # the same initial weights on every rank
    model = common.build_model(cfg)
    routing = common.route(model, cfg)
    model.gradient_checkpointing = g.grad_checkpoint
    ema = copy.deepcopy(model).to(device)
    requires_grad(ema, False)
    model = model.to(device)

    # Process, loss weighting and optimizer (AdamW, constant lr; ANT-UW's log-variances get their own group):
    process = training_process(cfg)
    intervals, stratified, uw = ant_uw(cfg, process, device)
    param_groups = [{"params": model.parameters()}] + ([uw.param_group(lr=cfg.optim.uw_lr)] if uw is not None else [])
    opt = torch.optim.AdamW(param_groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    state = dict(model=model, ema=ema, opt=opt, uw=uw)  # what a checkpoint holds, besides config, step and rng

    # Data: a resumable DistributedSampler; each rank loads global_batch_size / world_size per step.
    dataset = build_dataset(cfg)
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, seed=g.global_seed)
    loader = data_loader(dataset, sampler, local_batch_size, g.num_workers, seed, device)
    epoch_steps = steps_per_epoch(len(dataset), world_size, local_batch_size)
    if epoch_steps == 0:
        raise config.ConfigError(
            f"general.global_batch_size={g.global_batch_size} is larger than the data set ({len(dataset)} samples)"
        )
    vae = common.load_vae(cfg, device) if dataset.kind == "images" else None
    scale = latent_scale(dataset, vae)

    # Initial state, or the checkpoint's (weights, optimizer, UW, step and every random generator):
    generator = torch.Generator(device).manual_seed(seed)  # timesteps, noise, flips, latent samples
    torch.manual_seed(seed)  # label dropout
    train_steps = 0
    if resume is not None:
        train_steps, resumed = runs.restore(resume, cfg, **state, generator=generator, rank=rank, world_size=world_size)
        notes += resumed
        del resume
    else:
        update_ema(ema, model, decay=0)  # the EMA starts as a copy of the (synced) weights

    # The experiment folder (the resumed run's, or a new one: never another run's) and the log:
    experiment_dir, config_file = runs.open_experiment(cfg, run_dir, train_steps, rank)
    checkpoint_dir = os.path.join(experiment_dir, "checkpoints")
    logger = common.create_logger(experiment_dir if rank == 0 else None, rank)
    logger.info(f"Experiment directory: {experiment_dir} ({world_size} process(es), {device})")
    if g.resume is not None:
        how = "Resumed" if run_dir is not None else "Forked"
        logger.info(
            f"{how} from {os.path.abspath(g.resume)} at step {train_steps}; this segment's config: {config_file}"
        )
    for note in notes:
        logger.info(note)
    logger.info(f"DiT parameters: {sum(p.numel() for p in model.parameters()):,}")
    logger.info(
        routing.summary() if routing is not None else "No routing (models.routing.sharing_ratio=1.0: the baseline)"
    )
    logger.info(f"Dataset: {len(dataset):,} samples ({dataset.kind}), {epoch_steps} steps per epoch")

    # DDP, then compile (the model is routed already):
    ddp_model = (
        DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if dist.is_initialized() else model
    )
    train_model = torch.compile(ddp_model) if g.compile else ddp_model
    model.train()  # enables label dropout for classifier-free guidance
    ema.eval()
    writer = tensorboard_writer(experiment_dir) if rank == 0 and cfg.logs.tensorboard else None

    logger.info(f"Training from step {train_steps} to {g.iterations}...")
    data_iter = batches(loader, sampler, train_steps, local_batch_size, epoch_steps)
    running_loss, running_norm, log_steps, start_time = 0.0, 0.0, 0, time.time()
    step_times, last_ckpt, avg_loss = [], g.resume, float("nan")
    progress = tqdm(total=g.iterations, initial=train_steps, dynamic_ncols=True, disable=None if rank == 0 else True)
    while train_steps < g.iterations:
        epoch, x, y = next(data_iter)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with common.autocast(g.mixed_precision, device):
            x = to_model_input(x, dataset.kind, vae, scale, generator)
        t, level = training_times(process, stratified, x.shape[0], device, generator)
        noise = torch.randn(x.shape, device=device, generator=generator)
        with common.autocast(g.mixed_precision, device):
            loss_dict = process.training_losses(train_model, x, t=t, model_kwargs=dict(y=y), noise=noise)
        per_sample = loss_dict["loss"].float()  # weighted by w(t) (general.loss_weight_type) in the process
        loss = uw(per_sample, interval_index(level, intervals)) if uw is not None else per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if uw is not None and dist.is_initialized():  # average UW's gradient over ranks, as DDP does for the model's
            dist.all_reduce(uw.log_vars.grad)
            uw.log_vars.grad /= world_size
        # The norm of the (DDP-averaged, so the same on every rank) gradients; max_norm=inf: measured, not clipped.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float("inf"))
        loss_value, norm_value = torch.stack([loss.detach(), grad_norm]).tolist()
        # A non-finite loss on any rank makes every rank's (averaged) gradient norm non-finite: all ranks stop together.
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            progress.close()
            what = f"at step {train_steps + 1} the loss is {loss_value} and the gradient norm {norm_value}"
            raise diverged(logger, writer, f"{what}; stopped before the optimizer step", last_ckpt)
        opt.step()
        update_ema(ema, model, decay=cfg.optim.ema_decay)

        # Log loss values, the gradient norm and the learning rate (every log_every steps and at the last step):
        running_loss += loss_value
        running_norm += norm_value
        log_steps += 1
        train_steps += 1
        step_times.append(time.perf_counter())
        progress.update(1)
        if train_steps % cfg.logs.log_every == 0 or train_steps == g.iterations:
            if device.type == "cuda":
                torch.cuda.synchronize()
            steps_per_sec = log_steps / (time.time() - start_time)
            avg_loss = common.all_reduce_mean(running_loss / log_steps, device)
            uw_weights = uw.weights().tolist() if uw is not None else None
            lr = opt.param_groups[0]["lr"]
            log_progress(
                logger, writer, train_steps, epoch, avg_loss, running_norm / log_steps, lr, steps_per_sec, uw_weights
            )
            progress.set_postfix(loss=f"{avg_loss:.4f}")
            running_loss, running_norm, log_steps, start_time = 0.0, 0.0, 0, time.time()

        # Save checkpoints: only finite weights (the same on every rank: all ranks stop), never over another file.
        if train_steps % cfg.logs.ckpt_every == 0 or train_steps == g.iterations:
            if not all_finite(model.parameters()):
                raise diverged(logger, writer, f"the weights are not finite after step {train_steps}", last_ckpt)
            rng = runs.gather_rng_states(generator)
            last_ckpt = runs.checkpoint_file(checkpoint_dir, train_steps)
            if rank == 0:
                runs.save_checkpoint(last_ckpt, **state, cfg=cfg, step=train_steps, rng=rng)
                logger.info(f"Saved checkpoint to {last_ckpt}")
            common.barrier()
    progress.close()

    model.eval()
    if writer is not None:
        writer.close()
    logger.info("Done!")
    common.cleanup()
    return {
        "experiment_dir": experiment_dir,
        "checkpoint": last_ckpt,
        "step": train_steps,
        "loss": avg_loss,
        "step_times": step_times,
    }


def cli(argv=None):
    """The command line: exit 0 when done, 1 (with the message) when training diverged, 2 on a config error."""
    try:
        config.run(main, argv)
    except TrainingDiverged as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
