"""Tiny, offline diffusers transformer families: models, pipeline-style calls, real pipelines, declared block facts.

A plain module (no tests): each `Family` in `FAMILIES` builds a tiny model from its config with every weight
perturbed (so zero-initialised gates and projections cannot hide routing), calls it exactly as its own pipeline
calls it, builds that pipeline from tiny components (no Hub, no tokenizer: `prompt_embeds` are passed), runs it
for 2 steps and records the `timestep` the transformer receives. Each family also declares, per routed block
class, which argument is the hidden (image) stream, which output element carries it back, how the model passes
it, and whether the block is a pure residual `x + F(x)` on that stream. docs/adapters.md tabulates them with
what dtr routes (tests/family_checks.py generates its tables).

Line numbers ("file:line") refer to the installed diffusers 0.42.1, relative to its package folder.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from torch import nn

NUM_TASKS = 1000
TEXT_LEN = 6  # prompt tokens passed as precomputed embeddings

# What the `timestep` a family's pipeline passes to the transformer means (checked by running the pipeline).
CONVENTIONS = {
    "index": "DDPM step index t in [0, 1000) (scheduler.timesteps; 0 = least noise), int64 or cast to float",
    "sigma1000": "flow-matching sigma * 1000, float in [0, 1000] (scheduler.timesteps; 1000 = pure noise)",
    "sigma": "flow-matching sigma in [0, 1] (1 = pure noise)",
    "one_minus_sigma": "1 - sigma in [0, 1] (1 = data, 0 = pure noise)",
    "one_minus_sigma1000": "(1 - sigma) * 1000, float in [0, 1000] (1000 = data, 0 = pure noise)",
}
# The dtr timestep_kind that reads each convention as its noise level (docs/adapters.md, "Timesteps").
DTR_KIND = {
    "index": "index",
    "sigma1000": "index",
    "sigma": "unit",
    "one_minus_sigma": "unit_reversed",
    "one_minus_sigma1000": "index_reversed",
}


def task_index(t: torch.Tensor, convention: str, num_tasks: int = NUM_TASKS) -> torch.Tensor:
    """The DDPM-like task in [0, num_tasks) (0 = least noise) that a pipeline timestep of `convention` means."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if convention in ("index", "sigma1000"):
        task = torch.round(t).clamp(max=num_tasks - 1)  # sigma*1000 = 1000.0 (pure noise) is the last task
    elif convention == "sigma":
        task = torch.round(t * (num_tasks - 1))
    elif convention == "one_minus_sigma":
        task = torch.round((1 - t) * (num_tasks - 1))
    elif convention == "one_minus_sigma1000":
        task = torch.round(1000 - t).clamp(max=num_tasks - 1)
    else:
        raise ValueError(f"unknown convention {convention!r}; one of {sorted(CONVENTIONS)}")
    return task.long()


def expected_timesteps(scheduler, convention: str, steps: int) -> torch.Tensor:
    """What the transformer must receive at the first `steps` steps, from the scheduler's own state after a run."""
    if type(scheduler).__name__ == "SCMScheduler":  # TrigFlow angle s: the rectified-flow sigma is sin/(sin+cos)
        s = scheduler.timesteps[:steps].double()
        return torch.sin(s) / (torch.sin(s) + torch.cos(s))
    if convention in ("index", "sigma1000", "one_minus_sigma1000"):  # the scheduler's values (DPM-Solver truncates)
        return scheduler.timesteps[:steps].double()
    sigmas = scheduler.sigmas[:steps].double()
    return {"sigma": sigmas, "one_minus_sigma": 1 - sigmas}[convention]


def flow_sigmas(scheduler, steps: int) -> torch.Tensor:
    """The rectified-flow noise level sigma in [0, 1] (1 = noise) of the first `steps` steps of a flow scheduler."""
    if type(scheduler).__name__ == "SCMScheduler":
        return expected_timesteps(scheduler, "sigma", steps)
    if scheduler.config.get("invert_sigmas", False):  # Mochi: the scheduler stores 1 - sigma
        return 1 - scheduler.sigmas[:steps].double()
    return scheduler.sigmas[:steps].double()


# --------------------------------------------------------------------------------------------------------------
# Declarations


@dataclass(frozen=True)
class BlockSpec:
    """One routed block class of a family, as its source and a probe of its calls show it."""

    pattern: str  # regex matched in full against dotted module names, e.g. r"transformer_blocks\.\d+"
    cls: str  # the block's class name
    params: tuple[str, ...]  # its forward's parameters after self, in order
    stream: str  # the parameter that carries the hidden (image) stream; its position is params.index(stream)
    called: str  # how the model passes the stream without gradient checkpointing: "keyword" or "positional"
    returns: int | None  # None: forward returns the stream tensor; k: a tuple whose element k is the stream
    pure_residual: bool  # output stream == input stream + F(input stream), nothing else on the skip path
    stream_tokens: str = "image"  # what the stream holds: "image", or "text+image" for joined sequences
    note: str = ""


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline that drives the family's model, and the timestep convention it passes."""

    cls: str
    convention: str  # a key of CONVENTIONS
    source: str  # where the pipeline computes the value it passes, "file:line: code"
    build: Callable[[nn.Module], Any]  # transformer -> the pipeline, tiny components, offline
    run_kwargs: Callable[[], dict]  # the keyword arguments of a 2-step tiny run
    per_token: str | None = None  # the (B, N) timestep shape, where the pipeline passes one per token
    note: str = ""


@dataclass(frozen=True)
class Family:
    name: str
    model_cls: str
    config: dict
    blocks: tuple[BlockSpec, ...]
    timestep: tuple[int, str]  # (position, name) of the timestep argument in the model's forward
    make_inputs: Callable[[int, torch.Tensor], tuple[tuple, dict]]  # (batch, timestep (B,) or (B, N)) -> (args, kwargs)
    pipelines: tuple[PipelineSpec, ...] = ()
    timestep_dtype: torch.dtype = torch.float32  # what the main pipeline passes
    per_token_shape: Callable[[int], tuple[int, ...]] | None = None  # batch -> (B, N) where per-token timesteps work
    notes: str = ""
    uninitialised: tuple[str, ...] = ()  # parameters the class leaves as torch.empty: zeroed before the perturbation

    def make(self) -> nn.Module:
        """The tiny model in eval mode, every parameter perturbed by 0.1 * N(0, 1) from a fixed generator."""
        torch.manual_seed(0)
        model = getattr(diffusers, self.model_cls)(**self.config)
        with torch.no_grad():
            for name in self.uninitialised:
                model.get_parameter(name).zero_()
        return perturb(model).eval()

    def inputs(self, batch: int, t) -> tuple[tuple, dict]:
        """Arguments of the pipeline's call for `batch` samples at timestep `t` (a scalar, (B,) or (B, N))."""
        t = t if torch.is_tensor(t) else torch.tensor(t, dtype=self.timestep_dtype)  # a tensor keeps its dtype
        if t.ndim == 0:
            t = t.expand(batch)
        return self.make_inputs(batch, t)

    def call(self, model: nn.Module, t, batch: int = 2) -> torch.Tensor:
        """The model's prediction for `batch` fixed samples at timestep `t`, called as the pipeline calls it."""
        args, kwargs = self.inputs(batch, t)
        with torch.no_grad():
            out = model(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out.sample

    def block_names(self, model: nn.Module) -> dict[str, BlockSpec]:
        """Dotted module name -> the BlockSpec whose pattern matches it (every routed block of `model`)."""
        found = {}
        for name, _ in model.named_modules():
            for spec in self.blocks:
                if re.fullmatch(spec.pattern, name):
                    found[name] = spec
        return found


def perturb(module: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Add scale * N(0, 1) from a fixed generator to every parameter (zero-initialised gates become live)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------
# Pipelines: tiny components, 2 steps, the timesteps the transformer receives


def tiny_vae(latent_channels: int = 4, levels: int = 2, **config) -> nn.Module:
    """An AutoencoderKL of `levels` resolutions (spatial factor 2 ** (levels - 1)), width 8, from config."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[8] * levels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
        **config,
    ).eval()


def scheduler(name: str, **config):
    """A diffusers scheduler from its class defaults plus `config` (what the family's checkpoint ships)."""
    return getattr(diffusers, name)(**config)


def build(cls: str, **components):
    """The pipeline `cls` from the given components (text encoders and tokenizers None unless given)."""
    pipe_cls = getattr(diffusers, cls)
    params = inspect.signature(pipe_cls.__init__).parameters
    for name, p in params.items():
        if name != "self" and name not in components and p.default is inspect.Parameter.empty:
            components[name] = None
    pipe = pipe_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def record_timesteps(transformer: nn.Module, position: int, name: str):
    """Collect (a clone of) the timestep argument of every call of `transformer` into the yielded list."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        t = kwargs[name] if name in kwargs else args[position]
        seen.append(torch.as_tensor(t).detach().clone())

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def run_pipeline(family: Family, spec: PipelineSpec, steps: int = 2):
    """Build `spec`'s pipeline around `family.make()`, run it `steps` steps: (pipe, output, timesteps seen)."""
    pipe = spec.build(family.make())
    with record_timesteps(pipe.transformer, *family.timestep) as seen, torch.no_grad():
        out = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **spec.run_kwargs())
    return pipe, out, seen


def text(dim: int, batch: int = 1, length: int = TEXT_LEN, seed: int = 1) -> torch.Tensor:
    """Fixed stand-in text encoder output (batch, length, dim)."""
    return _randn(batch, length, dim, seed=seed)


# --------------------------------------------------------------------------------------------------------------
# Families. Width 16 (2 heads of 8), 1-2 blocks of each kind, latents 8x8 (video: 2-3 latent frames of 4x4).

BASIC_PARAMS = (
    "hidden_states",
    "attention_mask",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "timestep",
    "cross_attention_kwargs",
    "class_labels",
    "added_cond_kwargs",
)
JOINT_PARAMS = ("hidden_states", "encoder_hidden_states", "temb", "joint_attention_kwargs")
FLUX_PARAMS = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs")


def _dit_inputs(batch, t):
    return (_randn(batch, 4, 8, 8),), {"timestep": t, "class_labels": torch.arange(batch) % 10}


DIT = Family(
    name="DiT",
    model_cls="DiTTransformer2DModel",
    config=dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    ),
    blocks=(
        BlockSpec(
            r"transformer_blocks\.\d+",
            "BasicTransformerBlock",
            BASIC_PARAMS,
            "hidden_states",
            "positional",
            None,
            True,
            note="adaLN-Zero from the raw timestep and class label, which the block receives",
        ),
    ),
    timestep=(1, "timestep"),
    make_inputs=_dit_inputs,
    timestep_dtype=torch.int64,
    pipelines=(
        PipelineSpec(
            "DiTPipeline",
            "index",
            "pipelines/dit/pipeline_dit.py:202: self.transformer(latent_model_input, timestep=timesteps, ...).sample "
            "(timesteps = scheduler.timesteps[i] int64 expanded to the batch, :199)",
            lambda tr: build("DiTPipeline", transformer=tr, vae=tiny_vae(), scheduler=scheduler("DDIMScheduler")),
            lambda: dict(class_labels=[1], guidance_scale=1.0, output_type="np"),
            note="checkpoint scheduler: DDIM (facebook/DiT-XL-2-*); any DDPM-family scheduler passes indices",
        ),
    ),
)


def _pixart_inputs(batch, t):
    return (_randn(batch, 4, 8, 8),), dict(
        encoder_hidden_states=text(32, batch),
        encoder_attention_mask=torch.ones(batch, TEXT_LEN),
        timestep=t,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )


_PIXART_RUN = lambda: dict(
    prompt_embeds=text(32),
    prompt_attention_mask=torch.ones(1, TEXT_LEN),
    guidance_scale=1.0,
    height=16,
    width=16,
    use_resolution_binning=False,
    output_type="np",
)
PIXART = Family(
    name="PixArt-alpha/sigma",
    model_cls="PixArtTransformer2DModel",
    config=dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        caption_channels=32,
    ),
    blocks=(
        BlockSpec(
            r"transformer_blocks\.\d+",
            "BasicTransformerBlock",
            BASIC_PARAMS,
            "hidden_states",
            "positional",
            None,
            True,
            note="ada_norm_single: `timestep` is the model's (B, 6*C) adaLN embedding, not the raw timestep",
        ),
    ),
    timestep=(2, "timestep"),
    make_inputs=_pixart_inputs,
    timestep_dtype=torch.int64,
    pipelines=(
        PipelineSpec(
            "PixArtAlphaPipeline",
            "index",
            "pipelines/pixart_alpha/pipeline_pixart_alpha.py:936: timestep=current_timestep "
            "(scheduler.timesteps[i] int64 expanded, :918-929)",
            lambda tr: build(
                "PixArtAlphaPipeline",
                transformer=tr,
                vae=tiny_vae(),
                scheduler=scheduler("DPMSolverMultistepScheduler"),
            ),
            _PIXART_RUN,
        ),
        PipelineSpec(
            "PixArtSigmaPipeline",
            "index",
            "pipelines/pixart_alpha/pipeline_pixart_sigma.py:865: timestep=current_timestep (int64, :847-858)",
            lambda tr: build(
                "PixArtSigmaPipeline",
                transformer=tr,
                vae=tiny_vae(),
                scheduler=scheduler("DPMSolverMultistepScheduler"),
            ),
            _PIXART_RUN,
        ),
    ),
)


def _sd3_inputs(batch, t):
    return (), dict(
        hidden_states=_randn(batch, 4, 8, 8),
        timestep=t,
        encoder_hidden_states=text(32, batch),
        pooled_projections=_randn(batch, 16, seed=2),
        joint_attention_kwargs=None,
        return_dict=False,
    )


SD3 = Family(
    name="SD3/SD3.5",
    model_cls="SD3Transformer2DModel",
    config=dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=8,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ),
    blocks=(
        BlockSpec(
            r"transformer_blocks\.\d+",
            "JointTransformerBlock",
            JOINT_PARAMS,
            "hidden_states",
            "keyword",
            1,
            True,
            note="returns (encoder_hidden_states, hidden_states); the last block has context_pre_only=True "
            "and returns (None, hidden_states); SD3.5 `dual_attention_layers` add a 2nd image-only "
            "attention (attn2) inside the same residual",
        ),
    ),
    timestep=(3, "timestep"),
    make_inputs=_sd3_inputs,
    pipelines=(
        PipelineSpec(
            "StableDiffusion3Pipeline",
            "sigma1000",
            "pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py:1076: timestep=timestep "
            "(t.expand(B) of FlowMatchEulerDiscreteScheduler.timesteps = sigmas * 1000, :1069)",
            lambda tr: build(
                "StableDiffusion3Pipeline",
                transformer=tr,
                vae=tiny_vae(shift_factor=0.0),
                scheduler=scheduler("FlowMatchEulerDiscreteScheduler", shift=3.0),
            ),
            lambda: dict(
                prompt_embeds=text(32),
                pooled_prompt_embeds=_randn(1, 16, seed=2),
                guidance_scale=1.0,
                height=16,
                width=16,
                output_type="np",
            ),
        ),
    ),
)


def _flux_inputs(batch, t, guidance=False):
    img_ids = diffusers.FluxPipeline._prepare_latent_image_ids(batch, 4, 4, "cpu", torch.float32)
    return (), dict(
        hidden_states=_randn(batch, 16, 16),
        timestep=t,
        guidance=torch.full((batch,), 3.5) if guidance else None,
        pooled_projections=_randn(batch, 16, seed=2),
        encoder_hidden_states=text(32, batch),
        txt_ids=torch.zeros(TEXT_LEN, 3),
        img_ids=img_ids,
        joint_attention_kwargs=None,
        return_dict=False,
    )


FLUX = Family(
    name="Flux",
    model_cls="FluxTransformer2DModel",
    config=dict(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ),
    blocks=(
        BlockSpec(
            r"transformer_blocks\.\d+",
            "FluxTransformerBlock",
            FLUX_PARAMS,
            "hidden_states",
            "keyword",
            1,
            True,
            note="returns (encoder_hidden_states, hidden_states)",
        ),
        BlockSpec(
            r"single_transformer_blocks\.\d+",
            "FluxSingleTransformerBlock",
            FLUX_PARAMS,
            "hidden_states",
            "keyword",
            1,
            True,
            note="takes image and text separately, runs one residual on cat([text, image], 1) and splits it "
            "back: returns (text, image), image tokens only in and out",
        ),
    ),
    timestep=(3, "timestep"),
    make_inputs=lambda b, t: _flux_inputs(b, t, guidance=True),
    pipelines=(
        PipelineSpec(
            "FluxPipeline",
            "sigma",
            "pipelines/flux/pipeline_flux.py:903: timestep=timestep / 1000 (timestep = scheduler.timesteps[i] = "
            "sigma * 1000, :898); the model multiplies it by 1000 again inside (transformer_flux.py, forward)",
            lambda tr: build(
                "FluxPipeline",
                transformer=tr,
                vae=tiny_vae(shift_factor=0.0),
                scheduler=scheduler(
                    "FlowMatchEulerDiscreteScheduler",
                    shift=3.0,
                    use_dynamic_shifting=True,
                    base_shift=0.5,
                    max_shift=1.15,
                ),
            ),
            lambda: dict(
                prompt_embeds=text(32),
                pooled_prompt_embeds=_randn(1, 16, seed=2),
                guidance_scale=3.5,
                height=16,
                width=16,
                output_type="np",
            ),
            note="FLUX.1-dev scheduler (dynamic shifting); guidance_scale feeds the distilled guidance embedding, "
            "one transformer call per step",
        ),
    ),
    notes="in_channels 16 = 4 latent channels packed 2x2; tokens (B, H/2*W/2, 16); img_ids/txt_ids 2-d",
)


def _aura_inputs(batch, t):
    return (_randn(batch, 4, 8, 8),), dict(
        encoder_hidden_states=text(32, batch), timestep=t, return_dict=False, attention_kwargs=None
    )


AURAFLOW = Family(
    name="AuraFlow",
    model_cls="AuraFlowTransformer2DModel",
    config=dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=64,
    ),
    blocks=(
        BlockSpec(
            r"joint_transformer_blocks\.\d+",
            "AuraFlowJointTransformerBlock",
            ("hidden_states", "encoder_hidden_states", "temb", "attention_kwargs"),
            "hidden_states",
            "keyword",
            1,
            True,
            note="returns (encoder_hidden_states, hidden_states); out = x + gate_mlp * ff(norm2(x + gate_msa "
            "* attn)): the attention result reaches the output only through the MLP",
        ),
        BlockSpec(
            r"single_transformer_blocks\.\d+",
            "AuraFlowSingleTransformerBlock",
            ("hidden_states", "temb", "attention_kwargs"),
            "hidden_states",
            "keyword",
            None,
            True,
            stream_tokens="registers+text+image",
            note="runs on cat([8 register tokens + text, image], 1), returns that joined tensor; the model "
            "keeps the last N (image) tokens after the last one",
        ),
    ),
    timestep=(2, "timestep"),
    make_inputs=_aura_inputs,
    pipelines=(
        PipelineSpec(
            "AuraFlowPipeline",
            "sigma",
            "pipelines/aura_flow/pipeline_aura_flow.py:622: timestep = torch.tensor([t / 1000]).expand(B) "
            "(t = FlowMatchEulerDiscreteScheduler.timesteps[i] = sigma * 1000)",
            lambda tr: build(
                "AuraFlowPipeline",
                transformer=tr,
                vae=tiny_vae(),
                scheduler=scheduler("FlowMatchEulerDiscreteScheduler", shift=1.73),
            ),
            lambda: dict(
                prompt_embeds=text(32),
                prompt_attention_mask=torch.ones(1, TEXT_LEN),
                guidance_scale=1.0,
                height=16,
                width=16,
                output_type="np",
            ),
        ),
    ),
    notes="the encoder stream of the joint blocks starts with 8 learned register tokens",
)


def _hunyuan_inputs(batch, t):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    grid = 8 // 2  # latent 8x8, patch 2 (the pipeline assumes a VAE factor of 8: height // 8 // patch_size)
    rope = get_2d_rotary_pos_embed(
        8, get_resize_crop_region_for_grid((grid, grid), 512 // 8 // 2), (grid, grid), output_type="pt"
    )
    return (_randn(batch, 4, 8, 8), t), dict(
        encoder_hidden_states=text(16, batch),
        text_embedding_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long),
        encoder_hidden_states_t5=text(32, batch, seed=2),
        text_embedding_mask_t5=torch.ones(batch, TEXT_LEN, dtype=torch.long),
        image_meta_size=torch.tensor([[1024.0, 1024, 64, 64, 0, 0]]).repeat(batch, 1),
        style=torch.zeros(batch, dtype=torch.long),
        image_rotary_emb=rope,
        return_dict=False,
    )


HUNYUAN_DIT = Family(
    name="HunyuanDiT",
    model_cls="HunyuanDiT2DModel",
    config=dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        patch_size=2,
        sample_size=8,
        hidden_size=16,
        num_layers=4,
        cross_attention_dim=16,
        cross_attention_dim_t5=32,
        pooled_projection_dim=16,
        text_len=TEXT_LEN,
        text_len_t5=TEXT_LEN,
    ),
    blocks=(
        BlockSpec(
            r"blocks\.\d+",
            "HunyuanDiTBlock",
            ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "skip"),
            "hidden_states",
            "positional",
            None,
            True,
            note="blocks 0..L/2: pure residual; see HUNYUAN_LONG_SKIP for the blocks with skip_linear",
        ),
    ),
    timestep=(1, "timestep"),
    make_inputs=_hunyuan_inputs,
    pipelines=(
        PipelineSpec(
            "HunyuanDiTPipeline",
            "index",
            "pipelines/hunyuandit/pipeline_hunyuandit.py:840: t_expand = torch.tensor([t] * B).to(latents.dtype), "
            "passed positionally at :847 (DDPMScheduler.timesteps, integers cast to float32)",
            lambda tr: build(
                "HunyuanDiTPipeline",
                transformer=tr,
                vae=tiny_vae(levels=4),
                scheduler=scheduler("DDPMScheduler"),
                requires_safety_checker=False,
            ),
            lambda: dict(
                prompt_embeds=text(16),
                prompt_attention_mask=torch.ones(1, TEXT_LEN, dtype=torch.long),
                prompt_embeds_2=text(32, seed=2),
                prompt_attention_mask_2=torch.ones(1, TEXT_LEN, dtype=torch.long),
                guidance_scale=1.0,
                height=64,
                width=64,
                use_resolution_binning=False,
                output_type="np",
            ),
            note="the pipeline hard-codes a VAE factor of 8 for the rotary grid (:792), so the tiny VAE has 4 levels",
        ),
    ),
    notes="blocks with index > num_layers // 2 take skip= (a long skip from block num_layers - 2 - index) and "
    "start with hidden_states = skip_linear(skip_norm(cat([hidden_states, skip], -1))) before the residual: "
    "their output is h + F(h) with h = skip_linear(...), not x + F(x)",
)
# The long-skip blocks of HunyuanDiT, declared apart: not a pure residual on their stream argument.
HUNYUAN_LONG_SKIP = BlockSpec(
    r"blocks\.(\d+)",
    "HunyuanDiTBlock",
    HUNYUAN_DIT.blocks[0].params,
    "hidden_states",
    "positional",
    None,
    False,
    note="index > num_layers // 2: skip_linear(skip_norm(cat([x, skip], -1))) replaces x before the residual",
)


def hunyuan_long_skip_blocks(model) -> list[str]:
    """Names of the HunyuanDiT blocks that take a long skip (index > num_layers // 2), as its forward decides."""
    return [f"blocks.{i}" for i in range(len(model.blocks)) if i > model.config.num_layers // 2]


SANA_PARAMS = (
    "hidden_states",
    "attention_mask",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "timestep",
    "height",
    "width",
)
SANA_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=8,
    cross_attention_dim=16,
    caption_channels=32,
    sample_size=8,
    patch_size=1,
)


def tiny_dc_ae() -> nn.Module:
    """A 3-level AutoencoderDC (Sana's VAE), factor 4 (Sana asks for 32-px multiples), width 8, from config."""
    torch.manual_seed(0)
    types, qkv = ("ResBlock", "ResBlock", "EfficientViTBlock"), ((), (), (5,))
    return diffusers.AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=types,
        decoder_block_types=types,
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=qkv,
        decoder_qkv_multiscales=qkv,
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        scaling_factor=0.41407,
    ).eval()


def _sana_inputs(batch, t, guidance=False):
    kwargs = dict(
        encoder_hidden_states=text(32, batch),
        encoder_attention_mask=torch.ones(batch, TEXT_LEN),
        timestep=t,
        return_dict=False,
        attention_kwargs=None,
    )
    if guidance:  # SanaSprintPipeline: guidance = guidance_scale * transformer.config.guidance_embeds_scale
        kwargs["guidance"] = torch.full((batch,), 4.5 * 0.1)
    return (_randn(batch, 4, 8, 8),), kwargs


_SANA_RUN = dict(
    prompt_attention_mask=torch.ones(1, TEXT_LEN), height=32, width=32, use_resolution_binning=False, output_type="np"
)
SANA_BLOCK = BlockSpec(
    r"transformer_blocks\.\d+",
    "SanaTransformerBlock",
    SANA_PARAMS,
    "hidden_states",
    "positional",
    None,
    True,
    note="`timestep` is the (B, 6*C) adaLN embedding; height/width reshape tokens for the conv FFN",
)
SANA = Family(
    name="Sana",
    model_cls="SanaTransformer2DModel",
    config=SANA_CONFIG,
    blocks=(SANA_BLOCK,),
    timestep=(2, "timestep"),
    make_inputs=_sana_inputs,
    pipelines=(
        PipelineSpec(
            "SanaPipeline",
            "sigma1000",
            "pipelines/sana/pipeline_sana.py:914: timestep = t.expand(B) * transformer.config.timestep_scale "
            "(timestep_scale 1.0; t = DPMSolverMultistepScheduler(use_flow_sigmas).timesteps = sigma * 1000)",
            lambda tr: build(
                "SanaPipeline",
                transformer=tr,
                vae=tiny_dc_ae(),
                scheduler=scheduler(
                    "DPMSolverMultistepScheduler",
                    flow_shift=3.0,
                    use_flow_sigmas=True,
                    prediction_type="flow_prediction",
                ),
            ),
            lambda: dict(prompt_embeds=text(32), guidance_scale=1.0, **_SANA_RUN),
            note="checkpoint scheduler: DPM-Solver++ with flow sigmas (shift 3); the class default (epsilon, no flow "
            "sigmas) would pass integer DDPM indices instead",
        ),
    ),
    notes="SanaTransformer2DModel also serves SanaSprintPipeline (see SANA_SPRINT): the class alone cannot tell them "
    "apart except by config.guidance_embeds",
)
SANA_SPRINT = Family(
    name="Sana-Sprint",
    model_cls="SanaTransformer2DModel",
    config=dict(SANA_CONFIG, guidance_embeds=True, qk_norm="rms_norm_across_heads"),
    blocks=(SANA_BLOCK,),
    timestep=(2, "timestep"),
    make_inputs=lambda b, t: _sana_inputs(b, t, guidance=True),
    pipelines=(
        PipelineSpec(
            "SanaSprintPipeline",
            "sigma",
            "pipelines/sana/pipeline_sana_sprint.py:792: scm_timestep = sin(t) / (cos(t) + sin(t)) of the SCMScheduler "
            "TrigFlow angle t in [0, pi/2]: the rectified-flow sigma in [0, 1], passed at :805",
            lambda tr: build(
                "SanaSprintPipeline", transformer=tr, vae=tiny_dc_ae(), scheduler=scheduler("SCMScheduler")
            ),
            lambda: dict(prompt_embeds=text(32), guidance_scale=4.5, **_SANA_RUN),
            note="2 steps: angles [max_timesteps=1.5708, intermediate_timesteps=1.3]; the first sigma is 1 - 1e-6",
        ),
    ),
    notes="same class as Sana; Sana-Sprint checkpoints set guidance_embeds=True (and qk_norm)",
)


def _lumina_next_inputs(batch, t):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    rope = get_2d_rotary_pos_embed_lumina(8, 384, 384, linear_factor=1.0, ntk_factor=1.0)
    # as LuminaPipeline at its default size (sample_size 16 * VAE factor 2 = 32 px): base length (32 // 16) ** 2
    return (), dict(
        hidden_states=_randn(batch, 4, 16, 16),
        timestep=t,
        encoder_hidden_states=text(32, batch),
        encoder_mask=torch.ones(batch, TEXT_LEN),
        image_rotary_emb=rope,
        cross_attention_kwargs={"base_sequence_length": 4},
        return_dict=False,
    )


LUMINA_NEXT = Family(
    name="Lumina-Next",
    model_cls="LuminaNextDiT2DModel",
    config=dict(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        hidden_size=16,
        num_layers=2,
        num_attention_heads=2,
        num_kv_heads=2,
        multiple_of=16,
        cross_attention_dim=32,
    ),
    blocks=(
        BlockSpec(
            r"layers\.\d+",
            "LuminaNextDiTBlock",
            (
                "hidden_states",
                "attention_mask",
                "image_rotary_emb",
                "encoder_hidden_states",
                "encoder_mask",
                "temb",
                "cross_attention_kwargs",
            ),
            "hidden_states",
            "positional",
            None,
            True,
            note="x + tanh(gate) * norm(attn) then + tanh(gate) * norm(ffn): residual with tanh gates",
        ),
    ),
    timestep=(1, "timestep"),
    make_inputs=_lumina_next_inputs,
    pipelines=(
        PipelineSpec(
            "LuminaPipeline",
            "one_minus_sigma",
            "pipelines/lumina/pipeline_lumina.py:850: current_timestep = 1 - current_timestep / "
            "scheduler.config.num_train_timesteps (FlowMatchEuler timesteps = sigma * 1000): 1 = data",
            lambda tr: build(
                "LuminaPipeline", transformer=tr, vae=tiny_vae(), scheduler=scheduler("FlowMatchEulerDiscreteScheduler")
            ),
            lambda: dict(
                prompt_embeds=text(32),
                prompt_attention_mask=torch.ones(1, TEXT_LEN),
                guidance_scale=1.0,
                height=32,
                width=32,
                output_type="np",
            ),
            note="proportional attention (default) takes log base (default_size // 16) ** 2: a default size under "
            "32 px divides by zero, so this family is 16x16 latents",
        ),
    ),
    notes="learn_sigma: output has 2 * in_channels, the pipeline keeps the first half; pad_token is torch.empty "
    "(never initialised by the class)",
    uninitialised=("pad_token",),
)


def _lumina2_inputs(batch, t):
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
    mask[1:, TEXT_LEN - 2 :] = False  # captions of different lengths: the joined sequence is padded per sample
    return (), dict(
        hidden_states=_randn(batch, 4, 8, 8),
        timestep=t,
        encoder_hidden_states=text(32, batch),
        encoder_attention_mask=mask,
        return_dict=False,
        attention_kwargs=None,
    )


LUMINA2 = Family(
    name="Lumina 2",
    model_cls="Lumina2Transformer2DModel",
    config=dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=16,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=(4, 2, 2),
        axes_lens=(32, 16, 16),
        cap_feat_dim=32,
    ),
    blocks=(
        BlockSpec(
            r"noise_refiner\.\d+",
            "Lumina2TransformerBlock",
            ("hidden_states", "attention_mask", "image_rotary_emb", "temb"),
            "hidden_states",
            "positional",
            None,
            True,
            note="image tokens only, before the joint layers",
        ),
        BlockSpec(
            r"layers\.\d+",
            "Lumina2TransformerBlock",
            ("hidden_states", "attention_mask", "image_rotary_emb", "temb"),
            "hidden_states",
            "positional",
            None,
            True,
            stream_tokens="text+image",
            note="joined [caption; image] per sample, caption length varies by sample, padded to the longest",
        ),
    ),
    timestep=(1, "timestep"),
    make_inputs=_lumina2_inputs,
    pipelines=(
        PipelineSpec(
            "Lumina2Pipeline",
            "one_minus_sigma",
            "pipelines/lumina2/pipeline_lumina2.py:673: current_timestep = 1 - t / "
            "scheduler.config.num_train_timesteps (FlowMatchEuler timesteps = sigma * 1000): 1 = data",
            lambda tr: build(
                "Lumina2Pipeline",
                transformer=tr,
                vae=tiny_vae(shift_factor=0.0),
                scheduler=scheduler("FlowMatchEulerDiscreteScheduler"),
            ),
            lambda: dict(
                prompt_embeds=text(32),
                prompt_attention_mask=torch.ones(1, TEXT_LEN, dtype=torch.long),
                guidance_scale=1.0,
                height=16,
                width=16,
                output_type="np",
            ),
        ),
    ),
    notes="context_refiner.N (caption only, modulation=False, no timestep) is not a routing target",
)


def _cogvideox_inputs(batch, t):
    return (), dict(
        hidden_states=_randn(batch, 2, 4, 4, 4),
        encoder_hidden_states=text(32, batch),
        timestep=t,
        image_rotary_emb=None,
        attention_kwargs=None,
        return_dict=False,
    )


def tiny_cogvideox_vae() -> nn.Module:
    """A 3-level AutoencoderKLCogVideoX: spatial factor 4, temporal factor 4 (5 frames -> 2 latent frames)."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        sample_height=16,
        sample_width=16,
    ).eval()


COGVIDEOX = Family(
    name="CogVideoX",
    model_cls="CogVideoXTransformer3DModel",
    config=dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=32,
        num_layers=2,
        sample_width=4,
        sample_height=4,
        sample_frames=5,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT_LEN,
    ),
    blocks=(
        BlockSpec(
            r"transformer_blocks\.\d+",
            "CogVideoXBlock",
            ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "attention_kwargs"),
            "hidden_states",
            "keyword",
            0,
            True,
            note="returns (hidden_states, encoder_hidden_states): image FIRST, unlike Flux/SD3; one "
            "feed-forward runs on cat([text, image]) and is split back, each stream keeps its residual",
        ),
    ),
    timestep=(2, "timestep"),
    make_inputs=_cogvideox_inputs,
    timestep_dtype=torch.int64,
    pipelines=(
        PipelineSpec(
            "CogVideoXPipeline",
            "index",
            "pipelines/cogvideo/pipeline_cogvideox.py:734: timestep=timestep (t.expand(B) of "
            "CogVideoXDDIMScheduler.timesteps, int64, :727)",
            lambda tr: build(
                "CogVideoXPipeline",
                transformer=tr,
                vae=tiny_cogvideox_vae(),
                scheduler=scheduler("CogVideoXDDIMScheduler"),
            ),
            lambda: dict(
                prompt_embeds=text(32), guidance_scale=1.0, height=16, width=16, num_frames=5, output_type="np"
            ),
        ),
    ),
    notes="hidden_states (B, F, C, H, W) frames-first; CogVideoX 1.0 sinusoidal positions (no RoPE) in this config",
)


def _ltx_inputs(batch, t):
    # LTXPipeline at 32x32 px, 5 frames: latents 2 x 8 x 8 packed to (B, 128, 4) (VAE factors 4, 4; patch 1)
    return (), dict(
        hidden_states=_randn(batch, 128, 4),
        encoder_hidden_states=text(32, batch),
        timestep=t,
        encoder_attention_mask=torch.ones(batch, TEXT_LEN),
        num_frames=2,
        height=8,
        width=8,
        rope_interpolation_scale=(4 / 25, 4, 4),
        attention_kwargs=None,
        return_dict=False,
    )


def tiny_ltx_vae() -> nn.Module:
    """A 4-level AutoencoderKLLTXVideo, 2 of them scaling space and time: factors 4 and 4."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKLLTXVideo(
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    ).eval()


def _ltx_scheduler():
    # LTX-Video checkpoint scheduler: resolution-dependent shift, terminal sigma 0.1
    return scheduler(
        "FlowMatchEulerDiscreteScheduler",
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )


def _tiny_image(size: int = 32):
    """A fixed RGB PIL image (the conditioning frame of the image-to-video pipelines)."""
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())


_LTX_RUN = lambda: dict(
    prompt_embeds=text(32),
    prompt_attention_mask=torch.ones(1, TEXT_LEN),
    guidance_scale=1.0,
    height=32,
    width=32,
    num_frames=5,
    output_type="np",
)
LTX = Family(
    name="LTX-Video",
    model_cls="LTXVideoTransformer3DModel",
    config=dict(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=2,
        caption_channels=32,
    ),
    blocks=(
        BlockSpec(
            r"transformer_blocks\.\d+",
            "LTXVideoTransformerBlock",
            ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "encoder_attention_mask"),
            "hidden_states",
            "keyword",
            None,
            True,
            note="temb is (B, 1, 6*C) or per token (B, N, 6*C) when the timestep is (B, N)",
        ),
    ),
    timestep=(2, "timestep"),
    make_inputs=_ltx_inputs,
    per_token_shape=lambda b: (b, 128),
    pipelines=(
        PipelineSpec(
            "LTXPipeline",
            "sigma1000",
            "pipelines/ltx/pipeline_ltx.py:768: timestep = t.expand(B) (FlowMatchEuler timesteps = sigma * 1000), "
            "passed at :774",
            lambda tr: build("LTXPipeline", transformer=tr, vae=tiny_ltx_vae(), scheduler=_ltx_scheduler()),
            _LTX_RUN,
        ),
        PipelineSpec(
            "LTXImageToVideoPipeline",
            "sigma1000",
            "pipelines/ltx/pipeline_ltx_image2video.py:840-841: timestep = t.expand(B).unsqueeze(-1) * "
            "(1 - conditioning_mask): (B, N), 0 on the conditioning (first latent frame) tokens",
            lambda tr: build("LTXImageToVideoPipeline", transformer=tr, vae=tiny_ltx_vae(), scheduler=_ltx_scheduler()),
            lambda: dict(_LTX_RUN(), image=_tiny_image()),
            per_token="(B, N) float32, N = latent frames * h * w tokens; first latent frame's 64 tokens are 0",
        ),
    ),
    notes="tokens packed (B, F*H*W, C) by the pipeline; LTXConditionPipeline (not run here) passes (B, 1) or "
    "(B, N) = min(t, (1 - conditioning_mask) * 1000) (pipeline_ltx_condition.py:1197-1199)",
)


def _wan_inputs(batch, t):
    return (), dict(
        hidden_states=_randn(batch, 4, 2, 4, 4),
        timestep=t,
        encoder_hidden_states=text(32, batch),
        attention_kwargs=None,
        return_dict=False,
    )


def tiny_wan_vae() -> nn.Module:
    """An AutoencoderKLWan of base width 3, 4 latent channels: spatial factor 8, temporal factor 4."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(
        base_dim=3,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()


def _wan_scheduler():
    # Wan checkpoints ship UniPC with flow sigmas (the pipeline's annotation says FlowMatchEulerDiscreteScheduler)
    return scheduler("UniPCMultistepScheduler", prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


_WAN_RUN = lambda: dict(prompt_embeds=text(32), guidance_scale=1.0, height=32, width=32, num_frames=5, output_type="np")
WAN = Family(
    name="Wan",
    model_cls="WanTransformer3DModel",
    config=dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    ),
    blocks=(
        BlockSpec(
            r"blocks\.\d+",
            "WanTransformerBlock",
            ("hidden_states", "encoder_hidden_states", "temb", "rotary_emb"),
            "hidden_states",
            "positional",
            None,
            True,
            note="temb (B, 6, C), or (B, N, 6, C) per token when the timestep is (B, N) (Wan 2.2 TI2V)",
        ),
    ),
    timestep=(1, "timestep"),
    make_inputs=_wan_inputs,
    timestep_dtype=torch.int64,  # UniPC's int64 timesteps; (B, N) per-token timesteps are float32
    per_token_shape=lambda b: (b, 8),
    pipelines=(
        PipelineSpec(
            "WanPipeline",
            "sigma1000",
            "pipelines/wan/pipeline_wan.py:613: timestep = t.expand(B) (UniPC flow timesteps = sigma * 1000)",
            lambda tr: build("WanPipeline", transformer=tr, vae=tiny_wan_vae(), scheduler=_wan_scheduler()),
            _WAN_RUN,
        ),
        PipelineSpec(
            "WanPipeline",
            "sigma1000",
            "pipelines/wan/pipeline_wan.py:609-611 (expand_timesteps=True, Wan 2.2 TI2V text-to-video): "
            "timestep = (mask[0][0][:, ::2, ::2] * t).flatten() expanded to (B, N); the mask is all ones",
            lambda tr: build(
                "WanPipeline", transformer=tr, vae=tiny_wan_vae(), scheduler=_wan_scheduler(), expand_timesteps=True
            ),
            _WAN_RUN,
            per_token="(B, N) float32, N = latent frames * (h/2) * (w/2); every token equal to t",
        ),
        PipelineSpec(
            "WanImageToVideoPipeline",
            "sigma1000",
            "pipelines/wan/pipeline_wan_i2v.py:768-770 (expand_timesteps=True, Wan 2.2 TI2V image-to-video): "
            "timestep = (first_frame_mask[0][0][:, ::2, ::2] * t).flatten() expanded to (B, N)",
            lambda tr: build(
                "WanImageToVideoPipeline",
                transformer=tr,
                vae=tiny_wan_vae(),
                scheduler=_wan_scheduler(),
                expand_timesteps=True,
            ),
            lambda: dict(_WAN_RUN(), image=_tiny_image()),
            per_token="(B, N) float32; the first latent frame's tokens are 0 (the clean conditioning image)",
        ),
    ),
    notes="hidden_states (B, C, F, H, W); Wan 2.2 A14B adds transformer_2 for low-noise steps (boundary_ratio), "
    "switched by the pipeline, same class",
)


def _cogview4_inputs(batch, t):
    size = torch.tensor([[16.0, 16.0]]).repeat(batch, 1)  # original_size, target_size in pixels (16x16 image)
    return (), dict(
        hidden_states=_randn(batch, 4, 8, 8),
        encoder_hidden_states=text(32, batch),
        timestep=t,
        original_size=size,
        target_size=size,
        crop_coords=torch.zeros(batch, 2),
        attention_kwargs=None,
        return_dict=False,
    )


COGVIEW4 = Family(
    name="CogView4",
    model_cls="CogView4Transformer2DModel",
    config=dict(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        text_embed_dim=32,
        time_embed_dim=8,
        condition_dim=4,
        pos_embed_max_size=16,
        sample_size=8,
        rope_axes_dim=(8, 8),
    ),
    blocks=(
        BlockSpec(
            r"transformer_blocks\.\d+",
            "CogView4TransformerBlock",
            (
                "hidden_states",
                "encoder_hidden_states",
                "temb",
                "image_rotary_emb",
                "attention_mask",
                "attention_kwargs",
            ),
            "hidden_states",
            "positional",
            0,
            True,
            note="returns (hidden_states, encoder_hidden_states): image first; called positionally",
        ),
    ),
    timestep=(2, "timestep"),
    make_inputs=_cogview4_inputs,
    pipelines=(
        PipelineSpec(
            "CogView4Pipeline",
            "sigma1000",
            "pipelines/cogview4/pipeline_cogview4.py:587-606: timesteps linspace(1000, 1, n) truncated to integers, "
            "sigmas = timesteps / 1000, then shifted by mu; timestep = t.expand(B) (:622) is the shifted sigma * 1000",
            lambda tr: build(
                "CogView4Pipeline",
                transformer=tr,
                vae=tiny_vae(),
                scheduler=scheduler(
                    "FlowMatchEulerDiscreteScheduler",
                    base_shift=0.25,
                    max_shift=0.75,
                    base_image_seq_len=256,
                    use_dynamic_shifting=True,
                    time_shift_type="linear",
                ),
            ),
            lambda: dict(prompt_embeds=text(32), guidance_scale=1.0, height=16, width=16, output_type="np"),
        ),
    ),
)


def _chroma_inputs(batch, t):
    img_ids = diffusers.FluxPipeline._prepare_latent_image_ids(batch, 4, 4, "cpu", torch.float32)
    mask = torch.ones(batch, TEXT_LEN + 16, dtype=torch.bool)  # prompt mask extended over the image tokens
    return (), dict(
        hidden_states=_randn(batch, 16, 16),
        timestep=t,
        encoder_hidden_states=text(32, batch),
        txt_ids=torch.zeros(TEXT_LEN, 3),
        img_ids=img_ids,
        attention_mask=mask,
        joint_attention_kwargs=None,
        return_dict=False,
    )


CHROMA = Family(
    name="Chroma",
    model_cls="ChromaTransformer2DModel",
    config=dict(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(2, 2, 4),
        approximator_num_channels=8,
        approximator_hidden_dim=16,
        approximator_layers=1,
    ),
    blocks=(
        BlockSpec(
            r"transformer_blocks\.\d+",
            "ChromaTransformerBlock",
            (
                "hidden_states",
                "encoder_hidden_states",
                "temb",
                "image_rotary_emb",
                "attention_mask",
                "joint_attention_kwargs",
            ),
            "hidden_states",
            "keyword",
            1,
            True,
            note="returns (encoder_hidden_states, hidden_states); temb is a slice of the distilled "
            "modulation vector, per block",
        ),
        BlockSpec(
            r"single_transformer_blocks\.\d+",
            "ChromaSingleTransformerBlock",
            ("hidden_states", "temb", "image_rotary_emb", "attention_mask", "joint_attention_kwargs"),
            "hidden_states",
            "keyword",
            None,
            True,
            stream_tokens="text+image",
            note="unlike Flux in 0.42: runs on the joined cat([text, image], 1) tensor and returns it",
        ),
    ),
    timestep=(2, "timestep"),
    make_inputs=_chroma_inputs,
    pipelines=(
        PipelineSpec(
            "ChromaPipeline",
            "sigma",
            "pipelines/chroma/pipeline_chroma.py:860: timestep=timestep / 1000 "
            "(FlowMatchEuler timesteps = sigma * 1000)",
            lambda tr: build(
                "ChromaPipeline",
                transformer=tr,
                vae=tiny_vae(shift_factor=0.0),
                scheduler=scheduler(
                    "FlowMatchEulerDiscreteScheduler",
                    shift=3.0,
                    use_dynamic_shifting=True,
                    base_shift=0.5,
                    max_shift=1.15,
                ),
            ),
            lambda: dict(
                prompt_embeds=text(32),
                prompt_attention_mask=torch.ones(1, TEXT_LEN),
                guidance_scale=1.0,
                height=16,
                width=16,
                output_type="np",
            ),
        ),
    ),
)


def _mochi_inputs(batch, t):
    return (), dict(
        hidden_states=_randn(batch, 12, 2, 8, 8),
        encoder_hidden_states=text(32, batch),
        timestep=t,
        encoder_attention_mask=torch.ones(batch, TEXT_LEN),
        attention_kwargs=None,
        return_dict=False,
    )


def tiny_mochi_vae() -> nn.Module:
    """An AutoencoderKLMochi of width 32 (its GroupNorms have 32 groups) and 12 latent channels (MochiPipeline
    hard-codes 12): spatial factor 8, temporal factor 6."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKLMochi(
        latent_channels=12,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
        add_attention_block=(False,) * 5,
        latents_mean=(0.0,) * 12,
        latents_std=(1.0,) * 12,
    ).eval()


MOCHI = Family(
    name="Mochi",
    model_cls="MochiTransformer3DModel",
    config=dict(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=12,
        text_embed_dim=32,
        time_embed_dim=4,
        max_sequence_length=TEXT_LEN,
    ),
    blocks=(
        BlockSpec(
            r"transformer_blocks\.\d+",
            "MochiTransformerBlock",
            ("hidden_states", "encoder_hidden_states", "temb", "encoder_attention_mask", "image_rotary_emb"),
            "hidden_states",
            "keyword",
            0,
            True,
            note="returns (hidden_states, encoder_hidden_states): image first; the last block is "
            "context_pre_only (no text residual update)",
        ),
    ),
    timestep=(2, "timestep"),
    make_inputs=_mochi_inputs,
    pipelines=(
        PipelineSpec(
            "MochiPipeline",
            "one_minus_sigma1000",
            "pipelines/mochi/pipeline_mochi.py:617-650: sigmas = linear_quadratic_schedule(n, 0.025) and the scheduler "
            "inverts them (invert_sigmas=True); timestep = t.expand(B) is (1 - sigma) * 1000: 1000 = data",
            lambda tr: build(
                "MochiPipeline",
                transformer=tr,
                vae=tiny_mochi_vae(),
                scheduler=scheduler("FlowMatchEulerDiscreteScheduler", invert_sigmas=True),
            ),
            lambda: dict(
                prompt_embeds=text(32),
                prompt_attention_mask=torch.ones(1, TEXT_LEN),
                guidance_scale=1.0,
                height=64,
                width=64,
                num_frames=7,
                output_type="np",
            ),
        ),
    ),
)


# --------------------------------------------------------------------------------------------------------------
# Registry

FAMILIES: tuple[Family, ...] = (
    DIT,
    PIXART,
    SD3,
    FLUX,
    AURAFLOW,
    HUNYUAN_DIT,
    SANA,
    SANA_SPRINT,
    LUMINA_NEXT,
    LUMINA2,
    COGVIDEOX,
    LTX,
    WAN,
    COGVIEW4,
    CHROMA,
    MOCHI,
)


def probe_blocks(family: Family, model: nn.Module, t) -> dict[str, dict]:
    """Run `family.call(model, t)` and record, for every routed block, how it was called and what it returned.

    name -> {"args": positional args, "kwargs": keyword args, "out": the block's output}, first call only."""
    seen: dict[str, dict] = {}
    handles = []
    for name in family.block_names(model):
        module = model.get_submodule(name)

        def hook(mod, args, kwargs, out, name=name):
            seen.setdefault(name, {"args": args, "kwargs": kwargs, "out": out})

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        family.call(model, t)
    finally:
        for h in handles:
            h.remove()
    return seen


def stream_in(spec: BlockSpec, args: tuple, kwargs: dict) -> torch.Tensor:
    """The stream input of a block call, wherever the caller put it."""
    return kwargs[spec.stream] if spec.stream in kwargs else args[spec.params.index(spec.stream)]


def stream_out(spec: BlockSpec, out) -> torch.Tensor:
    """The stream element of a block's output."""
    return out if spec.returns is None else out[spec.returns]


# Transformer classes of the installed diffusers whose forward takes a timestep, not declared above, and why.
_NOT_IMAGE = "not an image/video denoiser routed by DTR's paper setting: "
_LATER = "image/video DiT not declared in this pass (time); "
LEFT_OUT: dict[str, str] = {
    "Transformer2DModel": "the U-Nets' spatial transformer (and legacy DiT/PixArt loader): routed through the "
    "UNet2DConditionModel gate adapter, not as a family",
    "TransformerTemporalModel": "temporal sub-block of video U-Nets (AnimateDiff/SVD): a U-Net part, not a family",
    "PriorTransformer": _NOT_IMAGE + "unCLIP prior over CLIP image embeddings (Kandinsky 2.x, Shap-E)",
    "T5FilmDecoder": _NOT_IMAGE + "spectrogram diffusion (music)",
    "StableAudioDiTModel": _NOT_IMAGE + "audio latents",
    "StableAudio3DiTModel": _NOT_IMAGE + "audio latents",
    "AceStepTransformer1DModel": _NOT_IMAGE + "music latents (1-D)",
    "LongCatAudioDiTTransformer": _NOT_IMAGE + "audio latents",
    "MiniMaxMusic3Transformer1DModel": _NOT_IMAGE + "music latents (1-D)",
    "RFD4ProteinaTransformer": _NOT_IMAGE + "protein backbones, two time inputs",
    "Cosmos3OmniTransformer": _NOT_IMAGE + "omni (LLM-style) model taking token ids; no `timestep` argument name",
    "ZImageTransformer2DModel": _LATER + "forward(x, t, cap_feats) takes lists of per-sample tensors",
    "QwenImageTransformer2DModel": _LATER + "MMDiT like Flux: (encoder, hidden) blocks, pipeline passes t / 1000",
    "QwenImage21Transformer2DModel": _LATER + "QwenImage successor",
    "HunyuanVideoTransformer3DModel": _LATER + "dual blocks + single blocks returning (hidden, encoder), token refiner",
    "HunyuanVideo15Transformer3DModel": _LATER + "HunyuanVideo 1.5",
    "HunyuanVideoFramepackTransformer3DModel": _LATER + "HunyuanVideo with frame packing",
    "HunyuanImageTransformer2DModel": _LATER + "HunyuanImage 2.x",
    "CogView3PlusTransformer2DModel": _LATER + "CogView3-Plus (DDIM-style integer timesteps)",
    "SkyReelsV2Transformer3DModel": _LATER + "Wan-like; diffusion forcing passes per-frame timesteps",
    "WanVACETransformer3DModel": _LATER + "Wan with VACE control blocks",
    "WanAnimateTransformer3DModel": _LATER + "Wan-Animate",
    "WanAnimate2Transformer3DModel": _LATER + "Wan-Animate 2",
    "ChronoEditTransformer3DModel": _LATER + "Wan-derived image editing",
    "AnyFlowTransformer3DModel": _LATER + "two times (timestep, r_timestep): flow-map model",
    "AnyFlowFARTransformer3DModel": _LATER + "two times (timestep, r_timestep), chunked autoregressive",
    "HeliosTransformer3DModel": _LATER + "history-indexed video model",
    "CosmosTransformer3DModel": _LATER + "Cosmos predict: EDM-style sigma timesteps",
    "MotifVideoTransformer3DModel": _LATER,
    "SanaVideoTransformer3DModel": _LATER + "Sana-Video",
    "SanaWMTransformer3DModel": _LATER + "Sana world model",
    "SanaWMLTX2RefinerTransformer3DModel": _LATER + "Sana world-model refiner",
    "LTX2VideoTransformer3DModel": _LATER + "LTX-2 audio+video streams",
    "LatteTransformer3DModel": _LATER + "Latte: spatial/temporal BasicTransformerBlocks, integer timesteps",
    "AllegroTransformer3DModel": _LATER + "Allegro",
    "EasyAnimateTransformer3DModel": _LATER + "EasyAnimate",
    "ConsisIDTransformer3DModel": _LATER + "CogVideoX-derived identity-preserving model",
    "HiDreamImageTransformer2DModel": _LATER + "MoE double/single stream blocks; argument named `timesteps`",
    "Flux2Transformer2DModel": _LATER + "FLUX.2",
    "Flux3Transformer2DModel": _LATER + "FLUX.3",
    "BriaTransformer2DModel": _LATER + "Flux-like",
    "BriaFiboTransformer2DModel": _LATER + "Flux-like with per-layer text",
    "BriaFibo2Transformer2DModel": _LATER,
    "GlmImageTransformer2DModel": _LATER,
    "OmniGenTransformer2DModel": _LATER + "one LLM-style sequence of text and image tokens",
    "OvisImageTransformer2DModel": _LATER + "Flux-like",
    "LongCatImageTransformer2DModel": _LATER + "Flux-like",
    "ErnieImageTransformer2DModel": _LATER,
    "Ideogram4Transformer2DModel": _LATER,
    "JoyImageEditTransformer3DModel": _LATER,
    "JoyImageEditPlusTransformer3DModel": _LATER,
    "Kandinsky5Transformer3DModel": _LATER + "Kandinsky 5",
    "Kandinsky6Transformer3DModel": _LATER + "Kandinsky 6 (audio and video)",
    "Kandinsky6SRTransformer3DModel": _LATER + "Kandinsky 6 super-resolution",
    "Krea2Transformer2DModel": _LATER,
    "MiniMaxH3Transformer3DModel": _LATER + "audio + video streams",
    "NucleusMoEImageTransformer2DModel": _LATER + "MoE",
    "PRXTransformer2DModel": _LATER,
    "DreamLiteTransformer2DModel": _LATER + "Transformer2DModel-like",
}
