"""
Denoising Task Routing on a Flux transformer: train a tiny one to draw handwritten digits, on a CPU, in minutes.

    python examples/flux_dtr.py                   # DTR and the unrouted baseline, side by side in flux_dtr/samples.png
    python examples/flux_dtr.py --no-baseline     # DTR only (half the time)
    python examples/flux_dtr.py --weighting uw    # with ANT-UW, the paper's best weighting (others: section 4)
    python examples/flux_dtr.py --sharing-ratio 1.0 --no-baseline   # sharing_ratio 1.0 is no routing at all

Read it top to bottom; each section says what it does and why:

1. Data: scikit-learn's 1797 handwritten digits (8x8 pixels), packed into 2x2-patch tokens as FluxPipeline packs
   its latents. We stay in pixel space (no VAE), so the samples are pictures you can judge by eye.
2. Model: diffusers' FluxTransformer2DModel built from a config (random weights, 0.3 M parameters). In place of
   the T5 and CLIP text encoders, one fixed embedding per digit ("a 3"), in the shapes Flux takes prompts.
3. DTR: the one added line, `dtr.wrap(transformer, sharing_ratio=0.8)`.
4. Training: flow matching as Flux trains: x_s = (1 - s) x0 + s eps, the model predicts the velocity eps - x0,
   noise levels s from a logit-normal density; --weighting picks how the errors are weighed (Min-SNR, ANT-UW, ...).
5. Sampling: Euler steps of the flow ODE from pure noise (s = 1) to an image (s = 0), with classifier-free guidance.
6. Checking: the digits classifier of examples/dit reads every sample; its accuracy says whether the model draws
   the digit it was asked for (10 % is chance).
"""

import argparse
import copy
import os
import sys
import time

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from sklearn.datasets import load_digits
from torchvision.utils import make_grid

import dtr
from dtr.weighting import (
    ContinuousUncertaintyWeighting,
    StratifiedTimestepSampler,
    UncertaintyWeighting,
    flow_snr,
    parse_loss_weight_type,
    quantile_intervals,
)

# The digits classifier lives with the DiT recipe (examples/dit/digits_classifier.py), which trains and caches it.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dit"))
import digits_classifier  # noqa: E402

# -----------------------------------------------------------------------------
# Settings: every knob is a command-line flag.

WEIGHTINGS = '"constant", "min_snr_<gamma>" (e.g. min_snr_5), "p2weight_<gamma>_<k>" (e.g. p2weight_1_1), "uw", "edm2"'
DENSITIES = ("logit_normal", "uniform", "mode")

parser = argparse.ArgumentParser(description="Train a tiny Flux transformer with DTR on digits, then sample it.")
parser.add_argument("--steps", type=int, default=1000, help="training steps per model")
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--width", type=int, default=64, help="the transformer's width (2 attention heads)")
parser.add_argument("--sharing-ratio", type=float, default=0.8, help="DTR's beta: share of channels each task uses")
parser.add_argument(
    "--weighting", default="constant", help=f"how per-sample losses are weighed (section 4): {WEIGHTINGS}"
)
parser.add_argument("--density", default="logit_normal", choices=DENSITIES, help="how noise levels s are drawn")
parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True, help="also train unrouted")
parser.add_argument("--sample-steps", type=int, default=20, help="Euler steps from noise to image")
parser.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance; 1.0 turns it off")
parser.add_argument("--per-digit", type=int, default=10, help="samples of each digit (a row of the grid each)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--threads", type=int, default=1, help="CPU threads (a tiny model runs fastest on one)")
parser.add_argument("--log-every", type=int, default=250)
parser.add_argument("--out", default="flux_dtr", help="folder for samples.png")
parser.add_argument("--classifier", default=None, help="digits classifier weights (default: the recipe's cache)")


def parse_args(argv=None):
    """The flags, checked: bad values stop here with a message naming the flag, not deep inside training."""
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "width", "sample_steps", "per_digit", "threads", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.width % 32:
        parser.error(f"--width must be a multiple of 32 (2 heads, rotary axes of even sizes), got {args.width}")
    if not 0 < args.sharing_ratio <= 1:
        parser.error(f"--sharing-ratio must be in (0, 1], got {args.sharing_ratio}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if not args.cfg_scale >= 0:
        parser.error(f"--cfg-scale must be >= 0, got {args.cfg_scale}")
    if args.weighting != "edm2":
        try:
            parse_loss_weight_type(args.weighting)
        except ValueError:
            hint = " (that is a density: --density)" if args.weighting in DENSITIES else ""
            parser.error(f"--weighting must be one of {WEIGHTINGS}, got {args.weighting!r}{hint}")
    return args


# -----------------------------------------------------------------------------
# 1. Data. Each digit is an 8x8 image in [-1, 1]. Flux does not see images but token sequences: FluxPipeline cuts
# its latents into 2x2 patches and flattens each patch into one token. We do exactly that to the pixels (one
# channel), so an 8x8 digit is 16 tokens of 4 values, at the positions (row, column) given by img_ids.

SIZE, CHANNELS = 8, 1
TOKENS, TOKEN_DIM = (SIZE // 2) ** 2, CHANNELS * 4


def pack(images):
    """(B, 1, 8, 8) images -> (B, 16, 4) tokens, with FluxPipeline's own packing."""
    return FluxPipeline._pack_latents(images, images.shape[0], CHANNELS, SIZE, SIZE)


def unpack(tokens):
    """(B, 16, 4) tokens -> (B, 1, 8, 8) images (FluxPipeline's unpacking, with no VAE in between: scale 1)."""
    return FluxPipeline._unpack_latents(tokens, SIZE, SIZE, vae_scale_factor=1)


def load_data():
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 8 - 1  # pixel values 0..16 -> [-1, 1]
    return pack(images), torch.from_numpy(digits.target)


# -----------------------------------------------------------------------------
# 2. Model. Flux's blocks, at toy size: 1 dual-stream block (text and image tokens with their own weights, joint
# attention) and 2 single-stream blocks (one sequence). No guidance embedding: that is FLUX.1-dev's distillation
# of classifier-free guidance; a model trained from scratch uses real guidance (section 5).
#
# Prompts: Flux reads a prompt as a sequence of T5 token embeddings (encoder_hidden_states) and one pooled CLIP
# vector (pooled_projections). Here a frozen random table stands in for the text encoders: prompt c (c = 0..9) is
# "draw the digit c", and prompt 10 is the empty prompt that classifier-free guidance needs.

TEXT_TOKENS, TEXT_DIM, POOLED_DIM = 4, 32, 32
EMPTY_PROMPT = 10


def build_model(width):
    head_dim = width // 2
    return FluxTransformer2DModel(
        patch_size=1,  # the tokens are already 2x2 patches (packed above)
        in_channels=TOKEN_DIM,
        num_layers=1,
        num_single_layers=2,
        num_attention_heads=2,
        attention_head_dim=head_dim,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=False,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),  # rotary axes (unused, row, col)
    )


def build_prompts(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(11, TEXT_TOKENS, TEXT_DIM, generator=g), torch.randn(11, POOLED_DIM, generator=g)


# Positions for the rotary embedding, as FluxPipeline makes them: text tokens at 0, image token (i, j) at (0, i, j).
IMG_IDS = FluxPipeline._prepare_latent_image_ids(1, SIZE // 2, SIZE // 2, "cpu", torch.float32)
TXT_IDS = torch.zeros(TEXT_TOKENS, 3)


def velocity(model, x, s, prompt, prompts):
    """The model's velocity for tokens x at noise levels s (B,), asked to draw prompts (B,) (digit or empty).

    `timestep=s` in [0, 1] is how FluxPipeline calls the transformer (the scheduler's t / 1000); the transformer
    scales it by 1000 inside, and DTR's Flux adapter reads it the same way: s = 0 (data) is task 0, s = 1 the last."""
    text, pooled = prompts
    return model(
        hidden_states=x,
        timestep=s,
        encoder_hidden_states=text[prompt],
        pooled_projections=pooled[prompt],
        img_ids=IMG_IDS,
        txt_ids=TXT_IDS,
        return_dict=False,
    )[0]


# -----------------------------------------------------------------------------
# 4. Training: flow matching, as diffusers' Flux training scripts do it.
#   - a noise level s per sample, drawn from --density: logit-normal by default (SD3 and Flux: most samples near
#     s = 0.5, where the velocity is hardest to predict),
#   - x_s = (1 - s) * x0 + s * eps: a straight line from the image (s = 0) to noise (s = 1),
#   - the model predicts the velocity along that line, dx_s/ds = eps - x0; its squared error per sample is
#   - combined by --weighting, with dtr.weighting's flow-matching forms of the weightings the DTR paper pairs with
#     routing (each is the paper's epsilon-loss objective, rewritten for the velocity):
#       constant       the plain mean (what Flux does),
#       min_snr_5      Min-SNR-5: w(s) = min(SNR, 5) * s^2, with SNR = ((1 - s) / s)^2,
#       p2weight_1_1   P2 (gamma 1, k 1): w(s) = s^2 / (1 + SNR),
#       uw             ANT-UW: s in 8 intervals of equal probability; every batch takes an equal share of each
#                      (so s still follows --density) and a learned log-variance per interval weighs its loss,
#       edm2           EDM2's continuous form of it: a learned log-variance u(s) of the noise level itself.
# 10 % of the prompts are replaced by the empty prompt, so the model also learns the unconditional velocity.


def train(model, data, prompts, args, label):
    images, labels = data
    weighting = parse_loss_weight_type("constant" if args.weighting == "edm2" else args.weighting)
    intervals = quantile_intervals(8, args.density) if args.weighting == "uw" else [(0.0, 1.0)]
    sampler = StratifiedTimestepSampler(intervals, args.density)  # one interval: s simply follows the density
    learned = None  # the uncertainty weightings learn their weights, with their own learning rate
    if args.weighting == "uw":
        learned = UncertaintyWeighting(intervals=intervals)
    elif args.weighting == "edm2":
        learned = ContinuousUncertaintyWeighting()
    groups = [{"params": model.parameters()}] + ([learned.param_group()] if learned is not None else [])
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)  # the same batches, noise and s for every model: a paired comparison
    model.train()
    start, running = time.time(), 0.0
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(labels), (args.batch_size,), generator=g)
        x0, prompt = images[batch], labels[batch]
        prompt = torch.where(torch.rand(args.batch_size, generator=g) < 0.1, EMPTY_PROMPT, prompt)
        eps = torch.randn(x0.shape, generator=g)
        s = sampler.sample(args.batch_size, generator=g)
        x_s = (1 - s[:, None, None]) * x0 + s[:, None, None] * eps
        error = ((velocity(model, x_s, s, prompt, prompts) - (eps - x0)) ** 2).mean(dim=(1, 2))  # (B,)
        weighted = weighting.weight(flow_snr(s), prediction="flow") * error  # weight 1 for constant, uw, edm2
        if args.weighting == "uw":
            loss = learned(weighted, t=s)  # sum over intervals of 0.5 * (exp(-u_i) * L_i + u_i)
        elif args.weighting == "edm2":
            loss = learned(weighted, s)  # mean of L / exp(u(s)) + u(s)
        else:
            loss = weighted.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += error.mean().item()
        if step % args.log_every == 0 or step == args.steps:
            n = step % args.log_every or args.log_every
            print(
                f"  [{label}] step {step}/{args.steps}  velocity mse {running / n:.4f}  ({time.time() - start:.0f} s)"
            )
            running = 0.0
    if learned is not None:  # what was learned: the weight exp(-u) of each interval (at its middle) or level
        if args.weighting == "uw":
            levels, weights = [(a + b) / 2 for a, b in intervals], learned.weights().tolist()
        else:
            levels = [0.1, 0.3, 0.5, 0.7, 0.9]
            weights = learned.weights(torch.tensor(levels)).tolist()
        pairs = ", ".join(f"{level:.2f}: {w:.2f}" for level, w in zip(levels, weights))
        print(f"  [{label}] learned weight by noise level s: {pairs}")
    return time.time() - start


# -----------------------------------------------------------------------------
# 5. Sampling: integrate the flow ODE dx/ds = v(x, s) backwards, from noise at s = 1 to an image at s = 0, with
# Euler steps on an even grid: x <- x + (s_next - s) * v. (FlowMatchEulerDiscreteScheduler.step is this update.)
# Classifier-free guidance: v = v_empty + cfg * (v_digit - v_empty), both halves in one batch; each sample is
# routed by its own s, so DTR needs nothing special here.


@torch.no_grad()
def sample(model, prompts, args):
    model.eval()
    digit = torch.arange(10).repeat_interleave(args.per_digit)  # row c of the grid: digit c
    n = len(digit)
    x = torch.randn(n, TOKENS, TOKEN_DIM, generator=torch.Generator().manual_seed(args.seed + 1))
    grid = torch.linspace(1.0, 0.0, args.sample_steps + 1)
    for s, s_next in zip(grid[:-1], grid[1:]):
        v_digit, v_empty = velocity(
            model,
            torch.cat([x, x]),
            s.expand(2 * n),
            torch.cat([digit, torch.full((n,), EMPTY_PROMPT)]),
            prompts,
        ).chunk(2)
        x = x + (s_next - s) * (v_empty + args.cfg_scale * (v_digit - v_empty))
    return unpack(x).clamp(-1, 1), digit


# -----------------------------------------------------------------------------
# 6. Checking: does a sample of digit c look like a c? The recipe's digits CNN (99 % on held-out real digits)
# answers for every sample.


@torch.no_grad()
def accuracy(classifier, images, digit):
    return (classifier(images)[1].argmax(1) == digit).float().mean().item()


def save_grids(panels, path):
    """Grids side by side (one row per digit, 4x enlarged), each under its title."""
    from PIL import Image, ImageDraw, ImageFont

    grids = []
    for _, images in panels:
        grid = make_grid((images + 1) / 2, nrow=len(images) // 10, padding=1, pad_value=0.5)
        grids.append(torch.nn.functional.interpolate(grid[None], scale_factor=4, mode="nearest")[0])
    gap, title_height = 16, 24
    width = sum(grid.shape[2] for grid in grids) + gap * (len(grids) - 1)
    picture = Image.new("RGB", (width, title_height + max(grid.shape[1] for grid in grids)), "white")
    draw, x = ImageDraw.Draw(picture), 0
    try:
        font = ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1: the small bitmap font
        font = ImageFont.load_default()
    for (title, _), grid in zip(panels, grids):
        pixels = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        picture.paste(Image.fromarray(pixels), (x, title_height))
        draw.text((x + 2, 3), title, fill="black", font=font)
        x += grid.shape[2] + gap
    picture.save(path)


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    begin = time.time()

    data = load_data()
    prompts = build_prompts(args.seed)
    torch.manual_seed(args.seed)
    model = build_model(args.width)
    print(
        f"Flux transformer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"{len(data[1])} digits as {TOKENS} tokens of {TOKEN_DIM} values"
    )

    # 3. DTR. The baseline starts from the very same weights (a copy taken before routing); then the one line.
    # The Flux adapter routes the image stream of every dual- and single-stream block: each block sees only the
    # window of channels that belongs to the sample's noise level (80 % of them), and the other channels pass by.
    arms = [("DTR", model)]
    if args.baseline:
        arms.append(("baseline", copy.deepcopy(model)))
    routing = dtr.wrap(model, sharing_ratio=args.sharing_ratio)
    print(routing.summary())

    classifier, held_out = digits_classifier.load_classifier(args.classifier)
    print(f"Digits classifier for checking the samples: {held_out:.1%} right on held-out real digits")
    results = {}
    for label, net in arms:
        print(
            f"Training {label} for {args.steps} steps (batch {args.batch_size}, {args.weighting}, s ~ {args.density})"
        )
        seconds = train(net, data, prompts, args, label)
        images, digit = sample(net, prompts, args)
        acc = accuracy(classifier, images, digit)
        results[label] = dict(model=net, images=images, digit=digit, accuracy=acc, train_seconds=seconds)
        print(
            f"{label}: {len(images)} samples ({args.sample_steps} Euler steps, cfg {args.cfg_scale}): "
            f"the digits classifier reads {acc:.0%} of them as the digit asked for (chance: 10 %)"
        )

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "samples.png")
    titles = {"DTR": f"DTR (sharing_ratio {args.sharing_ratio})", "baseline": "baseline (not routed)"}
    save_grids(
        [(f"{titles[label]}: {r['accuracy']:.0%} recognised", r["images"]) for label, r in results.items()], path
    )
    print(f"Wrote {path} (one row per digit) in {time.time() - begin:.0f} s")
    return results


if __name__ == "__main__":
    main()
