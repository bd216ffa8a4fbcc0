"""Train an unconditional UNet2DModel with Denoising Task Routing, the way diffusers' example
``examples/unconditional_image_generation/train_unconditional.py`` trains one: accelerate, an ``EMAModel`` of the
weights, ``DDPMScheduler`` noise, checkpoints with ``accelerator.save_state`` / ``load_state`` (resumable
mid-epoch, bit for bit), and a ``DDPMPipeline`` saved at the end with the EMA weights.  The one DTR line is
``dtr.wrap(model, ...)`` after the model is built: the routing then travels in the UNet's config, so the
checkpoints' ``unet`` and ``unet_ema`` folders and the saved pipeline all carry it, and
``dtr.from_pretrained(DDPMPipeline, output_dir)`` loads the pipeline routed (a plain
``DDPMPipeline.from_pretrained`` would give the trained weights unrouted, with a warning).

The data are scikit-learn's handwritten digits (1797 8x8 grey images, shipped with scikit-learn: nothing to
download), scaled to [-1, 1] and upscaled to ``--resolution``.  A CPU run of a few hundred steps gives digit-like
samples; the test suite runs six steps.

    python examples/train_unconditional_dtr.py --output_dir ddpm-digits-dtr --use_ema --max_train_steps 2000
    accelerate launch examples/train_unconditional_dtr.py --output_dir ddpm-digits-dtr --use_ema \\
        --resume_from_checkpoint latest
    # share it: DDPMPipeline.from_pretrained(...).push_to_hub(...), or `hf upload <repo> ddpm-digits-dtr`

Differences from diffusers' script, each for exact resumption: the data order of an epoch comes from
accelerate's seedable sampler (``seed + epoch``), and each micro-batch draws its noise and timesteps from a
generator seeded by ``(seed, epoch, step)``, so a resumed run draws what the uninterrupted run drew.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from sklearn.datasets import load_digits
from tqdm.auto import tqdm

import dtr

logger = get_logger(__name__, log_level="INFO")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output_dir", default="ddpm-digits-dtr", help="checkpoints, the saved pipeline and samples.png")
    p.add_argument("--resolution", type=int, default=8, help="the digits (8x8) are upscaled to this size")
    p.add_argument("--max_train_samples", type=int, default=None, help="use only the first N digits")
    p.add_argument("--block_out_channels", default="32,64", help="UNet widths, one per resolution level")
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--eval_batch_size", type=int, default=16, help="samples drawn from the saved pipeline")
    p.add_argument("--num_epochs", type=int, default=100)
    p.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_epochs")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--lr_scheduler", default="cosine", help="diffusers.optimization.get_scheduler's names")
    p.add_argument("--lr_warmup_steps", type=int, default=100)
    p.add_argument("--adam_beta1", type=float, default=0.95)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=1e-6)
    p.add_argument("--adam_epsilon", type=float, default=1e-08)
    p.add_argument(
        "--use_ema", action="store_true", help="keep an EMAModel of the weights and save the pipeline with it"
    )
    p.add_argument("--ema_inv_gamma", type=float, default=1.0)
    p.add_argument("--ema_power", type=float, default=3 / 4)
    p.add_argument("--ema_max_decay", type=float, default=0.9999)
    p.add_argument("--ddpm_num_steps", type=int, default=1000)
    p.add_argument("--ddpm_num_inference_steps", type=int, default=1000)
    p.add_argument("--ddpm_beta_schedule", default="linear")
    p.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "sample"])
    p.add_argument("--sharing_ratio", type=float, default=0.8, help="DTR's beta: 1.0 trains the unrouted baseline")
    p.add_argument("--alpha", type=float, default=4.0, help="DTR's alpha: how the channel window moves with t")
    p.add_argument(
        "--checkpointing_steps", type=int, default=500, help="accelerator.save_state every N optimizer steps"
    )
    p.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most N checkpoints")
    p.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint folder, or "latest" in --output_dir')
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.block_out_channels = tuple(int(c) for c in args.block_out_channels.split(","))
    levels = len(args.block_out_channels)
    if args.resolution % 2 ** (levels - 1):
        p.error(
            f"--resolution {args.resolution} must be divisible by {2 ** (levels - 1)} "
            f"({levels} levels of --block_out_channels halve it {levels - 1} times)"
        )
    return args


def digits(resolution: int, max_samples: int | None) -> torch.utils.data.TensorDataset:
    """scikit-learn's digits as (N, 1, resolution, resolution) images in [-1, 1]."""
    images = torch.from_numpy(load_digits().images[:max_samples]).float().unsqueeze(1) / 16.0
    if resolution != images.shape[-1]:
        images = F.interpolate(images, size=resolution, mode="bilinear", align_corners=False)
    return torch.utils.data.TensorDataset(images * 2 - 1)


def build_unet(args: argparse.Namespace) -> UNet2DModel:
    """A small UNet2DModel: ResNet blocks at every level, attention at the lowest resolution."""
    levels = len(args.block_out_channels)
    return UNet2DModel(
        sample_size=args.resolution,
        in_channels=1,
        out_channels=1,
        layers_per_block=args.layers_per_block,
        block_out_channels=args.block_out_channels,
        norm_num_groups=8,
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
    )


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The generator of one micro-batch's noise and timesteps: the same in an uninterrupted and a resumed run."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, step]).generate_state(1)[0]))


def main(argv: list[str] | None = None) -> dict:
    """Train, save the pipeline, load it back routed and sample; returns what the run made (for tests)."""
    args = parse_args(argv)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        project_config=ProjectConfiguration(project_dir=args.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    set_seed(args.seed)

    model = build_unet(args)
    routing = dtr.wrap(model, sharing_ratio=args.sharing_ratio, alpha=args.alpha)  # before EMAModel and prepare
    logger.info(routing.summary())
    ema_model = None
    if args.use_ema:  # made after dtr.wrap: model.config carries the routing, which dtr.save_pretrained(ema) writes
        ema_model = EMAModel(
            model.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=UNet2DModel,
            model_config=model.config,
        )

    def save_model_hook(models, weights, output_dir):
        """The checkpoint's weights as diffusers folders (unet, unet_ema), each with its routing."""
        if accelerator.is_main_process:
            if ema_model is not None:  # EMAModel.save_pretrained would save an unrouted model
                dtr.save_pretrained(ema_model, os.path.join(output_dir, "unet_ema"))
            for saved in models:
                dtr.save_pretrained(accelerator.unwrap_model(saved), os.path.join(output_dir, "unet"))
                weights.pop()  # written above: accelerate need not write them again

    def load_model_hook(models, input_dir):
        if ema_model is not None:
            loaded = dtr.from_pretrained(EMAModel, os.path.join(input_dir, "unet_ema"), model_cls=UNet2DModel)
            ema_model.load_state_dict(loaded.state_dict())
            ema_model.to(accelerator.device)
        for _ in range(len(models)):
            target = accelerator.unwrap_model(models.pop())
            loaded = dtr.from_pretrained(UNet2DModel, input_dir, subfolder="unet")
            if dtr.routing_of(loaded).config != dtr.routing_of(target).config:
                raise ValueError(
                    f"{input_dir} was trained with another routing ({dtr.routing_of(loaded)!r}) than "
                    f"this run's ({dtr.routing_of(target)!r}): pass the same --sharing_ratio/--alpha"
                )
            target.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
    )
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    dataset = digits(args.resolution, args.max_train_samples)
    train_dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, drop_last=True
    )
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    if ema_model is not None:
        ema_model.to(accelerator.device)

    global_step, first_epoch, resume_step = 0, 0, 0
    if args.resume_from_checkpoint:
        path = args.resume_from_checkpoint
        if path == "latest":
            found = sorted(
                (d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-"))
                if os.path.isdir(args.output_dir)
                else [],
                key=lambda d: int(d.split("-")[1]),
            )
            path = os.path.join(args.output_dir, found[-1]) if found else None
        if path is None:
            logger.info("no checkpoint in --output_dir: starting a new run")
        else:
            logger.info(f"resuming from {path}")
            accelerator.load_state(path)
            global_step = int(os.path.basename(os.path.normpath(path)).split("-")[1])
            first_epoch, done = divmod(global_step, steps_per_epoch)
            resume_step = done * args.gradient_accumulation_steps

    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process)
    for epoch in range(first_epoch, num_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)  # the seedable sampler orders epoch `epoch` by seed + epoch
        skip = resume_step if epoch == first_epoch else 0
        batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        for step, (clean_images,) in enumerate(batches, start=skip):
            generator = step_generator(args.seed, epoch, step)
            noise = torch.randn(clean_images.shape, generator=generator).to(clean_images.device)
            timesteps = torch.randint(0, args.ddpm_num_steps, (clean_images.shape[0],), generator=generator)
            timesteps = timesteps.to(clean_images.device)
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)

            with accelerator.accumulate(model):
                prediction = model(noisy_images, timesteps).sample  # routed by each image's own timestep
                target = noise if args.prediction_type == "epsilon" else clean_images
                loss = F.mse_loss(prediction.float(), target)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                if ema_model is not None:
                    ema_model.step(model.parameters())
                global_step += 1
                progress.update(1)
                progress.set_postfix(loss=loss.detach().item(), lr=lr_scheduler.get_last_lr()[0])
                if global_step % args.checkpointing_steps == 0 and accelerator.is_main_process:
                    save_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
                    accelerator.save_state(save_path)
                    prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
                    logger.info(f"saved {save_path}")
            if global_step >= max_train_steps:
                break
        if global_step >= max_train_steps:
            break
    progress.close()

    accelerator.wait_for_everyone()
    unet = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        if ema_model is not None:  # the pipeline is saved with the EMA weights, then training weights come back
            ema_model.store(unet.parameters())
            ema_model.copy_to(unet.parameters())
        DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(args.output_dir)
        if ema_model is not None:
            ema_model.restore(unet.parameters())
    accelerator.wait_for_everyone()
    accelerator.end_training()

    # What a user of the saved folder (or of its Hub repo) does: the pipeline comes back routed.
    pipeline = dtr.from_pretrained(DDPMPipeline, args.output_dir)
    pipeline.set_progress_bar_config(disable=True)
    if accelerator.is_main_process:
        images = pipeline(
            batch_size=args.eval_batch_size,
            num_inference_steps=args.ddpm_num_inference_steps,
            generator=torch.Generator().manual_seed(args.seed),
            output_type="np",
        ).images
        grid(images).save(os.path.join(args.output_dir, "samples.png"))
        logger.info(f"pipeline saved in {args.output_dir}, routed:\n{dtr.routing_of(pipeline.unet).summary()}")
    return {"unet": unet, "ema": ema_model, "routing": routing, "pipeline": pipeline, "global_step": global_step}


def prune_checkpoints(output_dir: str, limit: int | None) -> None:
    """Remove the oldest ``checkpoint-*`` folders beyond ``limit``."""
    if limit is None:
        return
    found = sorted(
        (d for d in os.listdir(output_dir) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1])
    )
    for old in found[: max(0, len(found) - limit)]:
        shutil.rmtree(os.path.join(output_dir, old))


def grid(images: np.ndarray) -> Image.Image:
    """(N, H, W, 1) images in [0, 1] as one grey image, rows of up to 8."""
    n, h, w, _ = images.shape
    cols = min(n, 8)
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * h, cols * w), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = (image[..., 0] * 255).round().astype(np.uint8)
    return Image.fromarray(canvas)  # uint8 (H, W): grey


if __name__ == "__main__":
    main()
