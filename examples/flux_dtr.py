"""DTR on an MMDiT: fine-tune a tiny routed Flux transformer with Flux's flow-matching loss, then sample with it.

The training step is the one diffusers' Flux fine-tuning scripts take (examples/dreambooth/train_dreambooth_flux.py):
latents from the VAE, shifted and scaled; a noise level sigma drawn per sample (logit-normal by default, with
``diffusers.training_utils``); ``x_sigma = (1 - sigma) * latents + sigma * noise``; the transformer, called as
FluxPipeline calls it (``timestep=sigma``, packed 2x2 latents, guidance embedding), predicts the velocity
``noise - latents``.  The one DTR line is ``dtr.wrap(transformer)``: the Flux adapter routes the image stream of
every dual-stream and single-stream block, and reads ``timestep`` as flow matching's sigma in [0, 1].

Offline and on a CPU in seconds, everything is tiny and built from configs: scikit-learn's digits as the images,
a random 2-level VAE, and, in place of the T5 and CLIP text encoders, one fixed random prompt embedding per digit
(a real run precomputes them with the pipeline's ``encode_prompt``).

    python examples/flux_dtr.py                      # 200 steps, writes flux_dtr/samples.png
    python examples/flux_dtr.py --sharing-ratio 1.0  # the same run without routing
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from sklearn.datasets import load_digits
from torchvision.utils import save_image

import dtr

SIZE, TEXT_LEN, TEXT_DIM, POOLED_DIM = 16, 8, 32, 16  # 16x16 px images, prompts of 8 tokens


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits as (N, 3, 16, 16) images in [-1, 1], and their labels."""
    data = load_digits()
    x = torch.from_numpy(data.images).float()[:, None] / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x * 2 - 1).clamp(-1, 1), torch.from_numpy(data.target)


def components(width: int, seed: int):
    """A tiny Flux transformer (1 dual-stream block, 2 single-stream blocks), a 2-level VAE, the training scheduler."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=width // 2,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, width // 2 - 4),
    )
    vae = (
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            block_out_channels=[8, 8],
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=SIZE,
            shift_factor=0.0,
            scaling_factor=1.0,
        )
        .eval()
        .requires_grad_(False)
    )
    # FLUX.1-dev's scheduler: shifted sigmas, resolution-dependent at sampling time
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return transformer, vae, scheduler


def prompts(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """In place of the text encoders' outputs: a fixed (TEXT_LEN, TEXT_DIM) embedding and pooled vector per digit."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(10, TEXT_LEN, TEXT_DIM, generator=g), torch.randn(10, POOLED_DIM, generator=g)


def packed(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents as FluxPipeline passes them: 2x2 patches, (B, H/2 * W/2, 4C) tokens."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpacked(tokens: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    b = tokens.shape[0]
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def train_step(transformer, vae, scheduler, images, labels, text, pooled, args, generator) -> torch.Tensor:
    """One flow-matching step as diffusers' Flux scripts take it; returns the loss."""
    latents = (vae.encode(images).latent_dist.sample(generator) - vae.config.shift_factor) * vae.config.scaling_factor
    b, c, h, w = latents.shape
    noise = torch.randn(latents.shape, generator=generator)
    u = compute_density_for_timestep_sampling(
        args.weighting_scheme, b, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=generator
    )
    index = (u * scheduler.config.num_train_timesteps).long()
    sigmas = scheduler.sigmas[index].view(b, 1, 1, 1)  # the training scheduler's shifted sigmas
    noisy = (1 - sigmas) * latents + sigmas * noise
    pred = transformer(
        hidden_states=packed(noisy),
        timestep=sigmas.flatten(),
        guidance=torch.full((b,), args.guidance),
        pooled_projections=pooled[labels],
        encoder_hidden_states=text[labels],
        txt_ids=torch.zeros(TEXT_LEN, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
        return_dict=False,
    )[0]
    weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)
    return (weighting * (unpacked(pred, c, h, w) - (noise - latents)) ** 2).mean()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=32, help="the transformer's width (2 heads)")
    parser.add_argument("--sharing-ratio", type=float, default=0.8)
    parser.add_argument("--weighting-scheme", default="logit_normal", choices=["logit_normal", "mode", "none"])
    parser.add_argument("--guidance", type=float, default=3.5, help="the distilled guidance the model is told")
    parser.add_argument("--sample-steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (a tiny model runs best on one)")
    parser.add_argument("--out", default="flux_dtr")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    images, labels = digits()
    transformer, vae, scheduler = components(args.width, args.seed)
    text, pooled = prompts(args.seed)
    routing = dtr.wrap(transformer, sharing_ratio=args.sharing_ratio)  # the DTR line
    print(routing.summary().replace("modules:", "routed blocks:"))

    opt = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    transformer.train()
    start = time.time()
    for step in range(args.steps):
        batch = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        loss = train_step(transformer, vae, scheduler, images[batch], labels[batch], text, pooled, args, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step < 5 or (step + 1) % 20 == 0 or step == args.steps - 1:
            print(f"step {step + 1} loss {loss.item():.4f} ({time.time() - start:.1f}s)", flush=True)

    # Sampling: FluxPipeline with the routed transformer, prompts given as embeddings (no text encoders).
    transformer.eval()
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    digits_to_draw = torch.arange(10)
    with torch.no_grad():
        out = pipe(
            prompt_embeds=text[digits_to_draw],
            pooled_prompt_embeds=pooled[digits_to_draw],
            height=SIZE,
            width=SIZE,
            num_inference_steps=args.sample_steps,
            guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(args.seed),
            output_type="pt",
        )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "samples.png")
    save_image(out.images, path, nrow=10)
    print(f"wrote {path}: one sample per digit prompt, {args.sample_steps} steps of FluxPipeline")


if __name__ == "__main__":
    main()
