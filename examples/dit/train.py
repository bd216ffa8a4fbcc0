"""
Train a class-conditional DiT with Denoising Task Routing (DTR), with PyTorch DDP.

The paper code's command line (byeongjun-park/DTR), on any number of GPUs or nodes:

    torchrun --nnodes=1 --nproc_per_node=8 train.py general.data_path=<PATH> \
        general.loss_weight_type=uw models.name=DiT-L/2 models.routing.sharing_ratio=0.8

and on a laptop CPU (scikit-learn's digits, pixel space):

    python train.py data=digits

models.routing.sharing_ratio=1.0 trains the baseline (no routing). Checkpoints hold
{model, ema, opt, uw, config, step, rng}. A run never writes into another run's folder:
general.resume=<a run's last checkpoint> continues that run exactly, in its folder; with
general.fork=true any checkpoint continues in a new experiment folder (seed, batch size and data may
then change). Configuration errors exit with code 2 before anything is written; a loss that turns
inf or NaN stops training (exit 1) before it reaches a checkpoint.
"""

import copy
import math
import os
import re
import sys
import time

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
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


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became inf or NaN; training stopped before the optimizer step."""


def all_finite(tensors):
    """True when no tensor holds an inf or a NaN."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


#################################################################################
#                        Experiment folders and resuming                        #
#################################################################################

# Keys a checkpoint's tensors depend on: a resume with other values cannot load it.
STATE_KEYS = (*common.MODEL_KEYS, "general.loss_weight_type")
# Keys an exact continuation depends on: changing them on resume needs general.fork=true.
RUN_KEYS = ("general.global_seed", "general.global_batch_size", "general.data_path", "general.vae", "general.vae_config",
            "general.schedule_name", "general.mixed_precision", "models.class_dropout_prob")
# Keys that take effect from the resumed step on: set on the optimizer (or read by the EMA each step), and logged.
APPLIED_KEYS = ("optim.lr", "optim.weight_decay", "optim.uw_lr", "optim.ema_decay")
CHECKPOINT_KEYS = ("model", "ema", "opt", "uw", "config", "step", "rng")


def new_experiment_dir(cfg):
    """{results_dir}/{model}/{index:03d}, one after the highest existing index (a gap is never filled)."""
    root = os.path.join(cfg.logs.results_dir, common.model_string(cfg))
    taken = [int(name) for name in (os.listdir(root) if os.path.isdir(root) else []) if re.fullmatch(r"\d{3,}", name)]
    return os.path.join(root, f"{max(taken, default=-1) + 1:03d}")


def claim_experiment_dir(cfg):
    """Create the next experiment folder; a run starting at the same moment gets the one after."""
    while True:
        path = new_experiment_dir(cfg)
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue


def checkpoints_in(folder):
    """{step: path} of the checkpoints train.py wrote in folder (a half-written .tmp is not one)."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return {int(n[:-3]): os.path.join(folder, n) for n in names if re.fullmatch(r"\d{7,}\.pt", n)}


def write_once(path, text):
    """Write text to path, or to path-2, path-3, ... (before the extension): a run's files are never rewritten."""
    stem, ext = os.path.splitext(path)
    for n in range(1, 10_000):
        target = path if n == 1 else f"{stem}-{n}{ext}"
        try:
            with open(target, "x") as f:
                f.write(text)
            return target
        except FileExistsError:
            continue
    raise RuntimeError(f"{path}: 10,000 versions exist already")


def check_resume(cfg, ckpt, path):
    """Refuse a resume that would overwrite or silently change a run; returns the run folder, or None to fork.

    Always refused: a file that is not a train.py checkpoint, other model keys (the weights would not
    load). Refused unless general.fork=true: other RUN_KEYS, a checkpoint outside a run's checkpoints/
    folder, a checkpoint that is not its run's last (resuming would overwrite the later ones).
    """
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise config.ConfigError(
            f"general.resume={path} is not a train.py checkpoint: it has no {', '.join(missing)} (expected "
            f"{', '.join(CHECKPOINT_KEYS)}; a bare DiT state dict has no optimizer state to resume)"
        )
    keys = STATE_KEYS + (("general.uw_intervals",) if cfg.general.loss_weight_type == "uw" else ())
    common.check_same_model(cfg, ckpt["config"], path, keys=keys)
    if cfg.general.fork:
        return None
    fork = f"or add general.fork=true to continue from {path} in a new experiment folder"
    saved = OmegaConf.create(ckpt["config"])
    changed = [f"{k}={OmegaConf.select(saved, k, default=None)} (now {OmegaConf.select(cfg, k)})" for k in RUN_KEYS
               if OmegaConf.select(saved, k, default=None) != OmegaConf.select(cfg, k)]
    if changed:
        raise config.ConfigError(f"{path} was trained with {', '.join(changed)}: the run would not continue exactly; "
                                 f"pass its values, {fork}")
    ckpt_dir = os.path.dirname(path) or "."
    run_dir = os.path.dirname(os.path.abspath(ckpt_dir))
    if os.path.basename(os.path.abspath(ckpt_dir)) != "checkpoints" or not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise config.ConfigError(f"general.resume={path} is not in a run's checkpoints/ folder (<run>/checkpoints/, "
                                 f"beside <run>/config.yaml), so there is no run to continue; {fork}")
    later = [p for step, p in sorted(checkpoints_in(ckpt_dir).items()) if step > ckpt["step"]]
    if later:
        names = ", ".join(os.path.basename(p) for p in later[:3]) + (f" and {len(later) - 3} more" if len(later) > 3 else "")
        raise config.ConfigError(f"general.resume={path} is not the last checkpoint of its run: continuing would overwrite "
                                 f"the later {names}; resume from {later[-1]}, {fork}")
    return os.path.dirname(os.path.dirname(os.path.normpath(path))) or "."


def set_optim_keys(cfg, opt, uw):
    """The optimizer's hyperparameters from cfg: a loaded optimizer state would otherwise keep the saved ones."""
    opt.param_groups[0]["lr"] = cfg.optim.lr
    opt.param_groups[0]["weight_decay"] = cfg.optim.weight_decay
    if uw is not None:
        opt.param_groups[1]["lr"] = cfg.optim.uw_lr


#################################################################################
#                                  Training Loop                                #
#################################################################################


def main(cfg):
    """Train as cfg says; returns a summary (experiment folder, final checkpoint, step times)."""
    # Setup processes and seeds; check the resume (nothing is written before the config has passed every check):
    rank, world_size, device = common.setup_distributed(cfg)
    g = cfg.general
    if g.global_batch_size % world_size:
        raise config.ConfigError(f"general.global_batch_size={g.global_batch_size} must be divisible by the {world_size} processes")
    local_batch_size = g.global_batch_size // world_size
    seed = g.global_seed * world_size + rank
    resume, run_dir = None, None
    if g.resume is not None:
        resume = common.load_checkpoint(g.resume)
        run_dir = check_resume(cfg, resume, g.resume)
    elif g.fork:
        raise config.ConfigError("general.fork=true needs general.resume=<checkpoint>: the checkpoint to fork from")

    # Create the model, route it, and make its EMA (after routing: the copy routes by its own inputs):
    torch.manual_seed(g.global_seed)  # the same initial weights on every rank
    model = common.build_model(cfg)
    routing = common.route(model, cfg)
    model.gradient_checkpointing = g.grad_checkpoint
    ema = copy.deepcopy(model).to(device)
    requires_grad(ema, False)
    model = model.to(device)

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
    vae, scale = None, None
    if dataset.kind == "images":
        vae = common.load_vae(cfg, device)
        scale = common.vae_scaling_factor(vae)
    elif dataset.kind == "latents":
        scale = float(dataset.meta["scaling_factor"])

    # Initial state, or the checkpoint's (weights, optimizer, UW, step and every random generator):
    generator = torch.Generator(device).manual_seed(seed)  # timesteps, noise, flips, latent samples
    torch.manual_seed(seed)  # label dropout
    train_steps, notes = 0, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["opt"])
        set_optim_keys(cfg, opt, uw)
        if uw is not None:
            uw.load_state_dict(resume["uw"])
        train_steps = resume["step"]
        saved = OmegaConf.create(resume["config"])
        for key in APPLIED_KEYS:
            if OmegaConf.select(saved, key, default=None) != OmegaConf.select(cfg, key):
                notes.append(f"{key}: {OmegaConf.select(saved, key, default=None)} -> {OmegaConf.select(cfg, key)} from step {train_steps + 1} on")
        states = resume["rng"]
        if saved.general.global_seed != g.global_seed:  # a fork with a new seed: fresh random streams
            notes.append(f"general.global_seed: {saved.general.global_seed} -> {g.global_seed}: random streams start from the new seed")
        elif len(states) == world_size:
            set_rng_state(states[rank], generator, device)
        else:
            notes.append(f"checkpoint written by {len(states)} processes, resuming on {world_size}: the run continues, but not bit-exactly")
        del resume
    else:
        update_ema(ema, model, decay=0)  # the EMA starts as a copy of the (synced) weights

    # The experiment folder: the resumed run's, or a new one (never an existing one); one config file per segment.
    if run_dir is not None:
        experiment_dir = run_dir
    else:
        experiment_dir = claim_experiment_dir(cfg) if rank == 0 else None
        if dist.is_initialized():  # every rank agrees on rank 0's folder
            holder = [experiment_dir]
            dist.broadcast_object_list(holder, src=0)
            experiment_dir = holder[0]
    checkpoint_dir, config_file = os.path.join(experiment_dir, "checkpoints"), None
    if rank == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
        name = "config.yaml" if run_dir is None else f"config-{train_steps:07d}.yaml"
        config_file = write_once(os.path.join(experiment_dir, name), config.to_yaml(cfg))
    common.barrier()
    logger = common.create_logger(experiment_dir if rank == 0 else None, rank)
    logger.info(f"Experiment directory: {experiment_dir} ({world_size} process(es), {device})")
    if g.resume is not None:
        how = "Resumed" if run_dir is not None else "Forked"
        logger.info(f"{how} from {os.path.abspath(g.resume)} at step {train_steps}; this segment's config: {config_file}")
    for note in notes:
        logger.info(note)
    logger.info(f"DiT parameters: {sum(p.numel() for p in model.parameters()):,}")
    logger.info(routing.summary() if routing is not None else "No routing (models.routing.sharing_ratio=1.0: the baseline)")
    logger.info(f"Dataset: {len(dataset):,} samples ({dataset.kind}), {epoch_steps} steps per epoch")

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
        """Save the training state at `step`: only a finite one, and never over an existing checkpoint."""
        path = os.path.join(checkpoint_dir, f"{step:07d}.pt")
        if not all_finite(model.parameters()):  # the same weights on every rank: all ranks stop
            raise diverged(f"the weights are not finite after step {step}")
        states = gather_rng_states(generator, device)
        if rank == 0:
            if os.path.exists(path):
                raise RuntimeError(f"{path} exists: another run is writing into {experiment_dir}")
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
        return path

    def diverged(what):
        """Stop: log why, and where training can go on from (nothing non-finite was saved)."""
        last = f"the last checkpoint, {last_ckpt}, is intact" if last_ckpt is not None else "no checkpoint was written"
        message = f"training diverged: {what}; {last}. Resume from it with a lower optim.lr, or check the data"
        logger.error(message)
        if writer is not None:
            writer.close()
        return TrainingDiverged(message)

    logger.info(f"Training from step {train_steps} to {g.iterations}...")
    data_iter = batches(loader, sampler, train_steps, local_batch_size, epoch_steps)
    running_loss, running_norm, log_steps, start_time = 0.0, 0.0, 0, time.time()
    step_times, last_ckpt, avg_loss = [], g.resume, float("nan")
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
        # The norm of the (DDP-averaged, so the same on every rank) gradients; max_norm=inf: measured, not clipped.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float("inf"))
        loss_value, norm_value = torch.stack([loss.detach(), grad_norm]).tolist()
        # A non-finite loss on any rank makes every rank's (averaged) gradient norm non-finite: all ranks stop together.
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            progress.close()
            raise diverged(f"at step {train_steps + 1} the loss is {loss_value} and the gradient norm {norm_value}; "
                           "stopped before the optimizer step")
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
            avg_norm, lr = running_norm / log_steps, opt.param_groups[0]["lr"]
            message = (f"(step={train_steps:07d}, epoch={epoch}) Train Loss: {avg_loss:.4f}, Grad Norm: {avg_norm:.4f}, "
                       f"LR: {lr:.4g}, Train Steps/Sec: {steps_per_sec:.2f}")
            if uw is not None:
                message += f", UW weights: {[round(w, 3) for w in uw.weights().tolist()]}"
            logger.info(message)
            progress.set_postfix(loss=f"{avg_loss:.4f}")
            if writer is not None:
                writer.add_scalar("train/loss", avg_loss, train_steps)
                writer.add_scalar("train/grad_norm", avg_norm, train_steps)
                writer.add_scalar("train/lr", lr, train_steps)
                writer.add_scalar("train/steps_per_sec", steps_per_sec, train_steps)
                if uw is not None:
                    for i, w in enumerate(uw.weights().tolist()):
                        writer.add_scalar(f"uw/weight_{i}", w, train_steps)
            running_loss, running_norm, log_steps, start_time = 0.0, 0.0, 0, time.time()

        # Save checkpoints:
        if train_steps % cfg.logs.ckpt_every == 0 or train_steps == g.iterations:
            last_ckpt = checkpoint(train_steps)
    progress.close()

    model.eval()
    if writer is not None:
        writer.close()
    logger.info("Done!")
    common.cleanup()
    return {"experiment_dir": experiment_dir, "checkpoint": last_ckpt, "step": train_steps, "loss": avg_loss, "step_times": step_times}


if __name__ == "__main__":
    try:
        config.run(main)
    except TrainingDiverged as err:
        sys.exit(f"error: {err}")
