"""The families of docs/adapters.md, each routed by `dtr.wrap(model)` and checked against independent references.

A plain module (no tests): `CASES` are the 16 diffusers transformer families of `diffusers_families` plus the two
diffusers U-Nets, tiny and perturbed. `reference_model` builds the routing by hand, never with dtr: a copy of the
unrouted model in which each routed block is replaced by a wrapper computing `block(m * x) + (1 - m) * x` on the
block's declared stream (the groundwork's facts, checked against real calls by tests/test_diffusers_families.py),
with masks from the paper's window formula and tasks from each pipeline's timestep convention. `result(name, check)`
runs one check of a family (once per process); `routing_row` and `checks_row` render a family's rows of the two
tables in docs/adapters.md.

Regenerate the tables in docs/adapters.md (about two minutes on one core):

    PYTHONPATH=src python tests/family_checks.py
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

import diffusers
import diffusers_families as F
import numpy as np
import torch
from torch import nn

import dtr

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "adapters.md")
T = F.NUM_TASKS
COMPILED = ("DiT", "PixArt-alpha/sigma", "Flux", "Wan", "UNet2D")  # compile == eager is checked for these


# --------------------------------------------------------------------------------------------------------------
# The routing written out by hand (DESIGN.md section 1), independent of dtr


def window_table(channels: int, ratio: float, alpha: float = 4.0) -> torch.Tensor:
    """(T, C) float masks: task t keeps [start_t, start_t + C_b), start_t = round((t / (T-1))^alpha * (C - C_b))."""
    c_b = int(channels * ratio)
    start = np.round(np.linspace(0, 1, T) ** alpha * (channels - c_b)).astype(np.int64)
    c = np.arange(channels)
    return torch.from_numpy((c >= start[:, None]) & (c < start[:, None] + c_b)).float()


@dataclasses.dataclass
class State:
    """What the reference blocks read: each sample's (or token's) task and, for joined streams, the text lengths."""

    ratio: float = 0.8
    tasks: torch.Tensor | None = None  # (B,) or (B, N) long
    text: torch.Tensor | None = None  # (B,) text tokens before the image tokens of a joined stream (Lumina 2)

    def mask(self, x: torch.Tensor, axis: int = -1) -> torch.Tensor:
        """The mask of each sample's (or token's) task for x, broadcasting over x with channels on `axis`."""
        rows = window_table(x.shape[axis], self.ratio)[self.tasks].to(x.dtype)  # (B, C) or (B, N, C)
        if self.tasks.ndim == 2:
            return rows
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        shape[axis] = x.shape[axis]
        return rows.view(shape)


class _Ref(nn.Module):
    """A reference wrapper: attributes it lacks are read off the module it wraps (models read e.g. `block.norm1`)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("_ref_inner"), name)


class RefResidual(_Ref):
    """`block(m * x) + (1 - m) * x` on the block's stream (`spec.stream` in, `spec.returns` out); a joined stream
    masks only the rows `image_rows` picks (the text rows get m = 1)."""

    def __init__(self, block: nn.Module, spec: F.BlockSpec, state: State, image_rows: Callable | None = None):
        super().__init__()
        self._ref_inner, self.spec, self.state, self.image_rows = block, spec, state, image_rows

    def forward(self, *args, **kwargs):
        x = F.stream_in(self.spec, args, kwargs)
        m = self.state.mask(x)
        if self.image_rows is not None:
            m = torch.where(self.image_rows(x, self.state)[..., None], m, torch.ones_like(m))
        args, kwargs = _with_stream(self.spec, args, kwargs, m * x)
        out = self._ref_inner(*args, **kwargs)
        y = F.stream_out(self.spec, out) + (1 - m) * x
        return y if self.spec.returns is None else tuple(y if i == self.spec.returns else o for i, o in enumerate(out))


class RefSkipLinear(_Ref):
    """HunyuanDiT's long-skip `skip_linear`, returning m * h and keeping h and m for its block."""

    def __init__(self, linear: nn.Module, state: State):
        super().__init__()
        self._ref_inner, self.state, self.seen = linear, state, None

    def forward(self, cat):
        h = self._ref_inner(cat)
        m = self.state.mask(h)
        self.seen = (h, m)
        return m * h


class RefLongSkip(_Ref):
    """A HunyuanDiT long-skip block routed on h = skip_linear(...): `G(m * h) + (1 - m) * h`."""

    def __init__(self, block: nn.Module, state: State):
        super().__init__()
        block.skip_linear = RefSkipLinear(block.skip_linear, state)
        self._ref_inner = block

    def forward(self, *args, **kwargs):
        out = self._ref_inner(*args, **kwargs)
        h, m = self._ref_inner.skip_linear.seen
        return out + (1 - m) * h


class RefGate(_Ref):
    """`m * norm(x)` with channels on axis 1 (the paper's U-Net placement)."""

    def __init__(self, norm: nn.Module, state: State):
        super().__init__()
        self._ref_inner, self.state = norm, state

    def forward(self, x):
        y = self._ref_inner(x)
        return self.state.mask(y, axis=1) * y


def _with_stream(spec: F.BlockSpec, args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if spec.stream in kwargs:
        return args, {**kwargs, spec.stream: value}
    i = spec.params.index(spec.stream)
    return args[:i] + (value,) + args[i + 1 :], kwargs


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# --------------------------------------------------------------------------------------------------------------
# Cases: the groundwork's families and the two U-Nets


@dataclasses.dataclass
class Case:
    name: str
    model_cls: str
    make: Callable[[], nn.Module]
    inputs: Callable[[int, Any], tuple[tuple, dict]]  # (batch, timestep scalar/(B,)/(B, N)) -> (args, kwargs)
    convention: str  # what the main pipeline's timestep means (diffusers_families.CONVENTIONS)
    timestep_dtype: torch.dtype
    pipelines: tuple
    family: F.Family | None = None  # None: a U-Net (gate placement)
    timestep_position: int = 1

    def mid(self, values=(0.7, 0.1)) -> torch.Tensor:
        """Two timesteps, a noisy and a clean one, in the units of the main pipeline."""
        scale = 1000 if self.convention in ("index", "sigma1000", "one_minus_sigma1000") else 1
        t = torch.tensor(values, dtype=torch.float64) * scale
        return t.round().to(self.timestep_dtype) if self.timestep_dtype == torch.int64 else t.float()

    def tasks(self, t: torch.Tensor) -> torch.Tensor:
        return F.task_index(t, self.convention)

    def run(self, model: nn.Module, t, batch: int = 2) -> torch.Tensor:
        args, kwargs = self.inputs(batch, t)
        out = model(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out.sample

    def block_specs(self, model: nn.Module) -> dict[str, Any]:
        """Dotted name -> BlockSpec (transformers) or "gate" (U-Net norms): the modules routing must act on."""
        if self.family is not None:
            return self.family.block_names(model)
        names = {}
        for name, m in model.named_modules():
            kind = type(m).__name__
            if kind == "ResnetBlock2D":
                names[f"{name}.norm2"] = "gate"
            elif kind == "Attention" and getattr(m, "group_norm", None) is not None:
                names[f"{name}.group_norm"] = "gate"
            elif kind == "Transformer2DModel":
                names[f"{name}.norm"] = "gate"
        return names

    def image_rows(self, name: str) -> Callable | None:
        """For a block on a joined [text; image] stream: (x, state) -> (B, L) bool, the image tokens; else None."""
        if self.name == "Lumina 2":  # [caption_i; image; padding], caption lengths per sample
            return lambda x, s: _rows(
                x, s.text if not name.startswith("noise_refiner") else torch.zeros_like(s.text), IMAGE_TOKENS
            )
        if self.name in ("AuraFlow", "Chroma") and name.startswith("single_transformer_blocks"):
            return lambda x, s: _rows(x, torch.full((x.shape[0],), x.shape[1] - IMAGE_TOKENS), IMAGE_TOKENS)
        return None

    def text_lengths(self, batch: int) -> torch.Tensor | None:
        """Caption tokens per sample of `inputs(batch, .)`, read off the test's own inputs (Lumina 2)."""
        if self.name != "Lumina 2":
            return None
        return self.inputs(batch, self.mid()[:batch])[1]["encoder_attention_mask"].sum(1)


IMAGE_TOKENS = 16  # every joined family here: 8x8 latents in 2x2 patches, or 16 packed Flux-style tokens


def _rows(x: torch.Tensor, start: torch.Tensor, n: int) -> torch.Tensor:
    j = torch.arange(x.shape[1])
    return (j >= start[:, None]) & (j < start[:, None] + n)


def reference_model(case: Case, state: State) -> nn.Module:
    """An unrouted model with every routed module replaced by its hand-written reference wrapper."""
    model = case.make()
    long_skip = set(F.hunyuan_long_skip_blocks(model)) if case.family is F.HUNYUAN_DIT else set()
    for name, spec in case.block_specs(model).items():
        block = model.get_submodule(name)
        if spec == "gate":
            _set(model, name, RefGate(block, state))
        elif name in long_skip:
            _set(model, name, RefLongSkip(block, state))
        else:
            _set(model, name, RefResidual(block, spec, state, case.image_rows(name)))
    return model


def _unet2d() -> nn.Module:
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
    )
    return F.perturb(model).eval()


def _unet2d_condition() -> nn.Module:
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    return F.perturb(model).eval()


def _unet_inputs(channels: int, text: bool):
    def inputs(batch, t):
        t = t if torch.is_tensor(t) else torch.tensor(t)
        t = t.expand(batch) if t.ndim == 0 else t
        kwargs = {"encoder_hidden_states": F.text(16, batch)} if text else {}
        return (F._randn(batch, channels, 8, 8), t), kwargs

    return inputs


UNET_PIPELINES = {
    "UNet2D": (
        F.PipelineSpec(
            "DDPMPipeline",
            "index",
            "pipelines/ddpm/pipeline_ddpm.py: self.unet(image, t).sample (scheduler.timesteps)",
            lambda unet: F.build("DDPMPipeline", unet=unet, scheduler=F.scheduler("DDPMScheduler")),
            lambda: dict(batch_size=1, output_type="np"),
        ),
    ),
    "UNet2DCondition": (
        F.PipelineSpec(
            "StableDiffusionPipeline",
            "index",
            "pipelines/stable_diffusion/pipeline_stable_diffusion.py: self.unet(latent_model_input, t, ...)",
            lambda unet: F.build(
                "StableDiffusionPipeline",
                unet=unet,
                vae=F.tiny_vae(),
                scheduler=F.scheduler("DDIMScheduler", steps_offset=1),
                requires_safety_checker=False,
            ),
            lambda: dict(prompt_embeds=F.text(16), guidance_scale=1.0, height=16, width=16, output_type="np"),
        ),
    ),
}

CASES: dict[str, Case] = {
    f.name: Case(
        f.name,
        f.model_cls,
        f.make,
        f.inputs,
        f.pipelines[0].convention,
        f.timestep_dtype,
        f.pipelines,
        f,
        f.timestep[0],
    )
    for f in F.FAMILIES
}
CASES["UNet2D"] = Case(
    "UNet2D", "UNet2DModel", _unet2d, _unet_inputs(3, False), "index", torch.int64, UNET_PIPELINES["UNet2D"]
)
CASES["UNet2DCondition"] = Case(
    "UNet2DCondition",
    "UNet2DConditionModel",
    _unet2d_condition,
    _unet_inputs(4, True),
    "index",
    torch.int64,
    UNET_PIPELINES["UNet2DCondition"],
)


# --------------------------------------------------------------------------------------------------------------
# Checks: each returns a table cell ("✓", "n/a", ...) or raises AssertionError with what differs


def outputs_and_grads(case: Case, model: nn.Module, t, batch: int = 2, state: State | None = None):
    """The prediction and every parameter's gradient of mean(prediction^2), by parameter name."""
    if state is not None:
        state.tasks, state.text = case.tasks(t), case.text_lengths(batch)
    model.zero_grad(set_to_none=True)
    out = case.run(model, t, batch)
    out.square().mean().backward()
    grads = {}
    for n, p in model.named_parameters():
        grads[n.replace("._ref_inner", "").removeprefix("_orig_mod.")] = (
            p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        )
    return out.detach(), grads


def _equal(a, b, what: str, exact: bool = True):
    ga, gb = a[1], b[1]
    assert ga.keys() == gb.keys(), f"{what}: different parameters"
    if exact:
        assert torch.equal(a[0], b[0]), f"{what}: outputs differ by {(a[0] - b[0]).abs().max():.3g}"
        bad = [n for n in ga if not torch.equal(ga[n], gb[n])]
    else:
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: outputs: {m}")
        bad = [n for n in ga if not torch.allclose(ga[n], gb[n], rtol=1e-4, atol=1e-7)]
    assert not bad, f"{what}: gradients differ for {len(bad)} parameters, e.g. {bad[:3]}"


def check_default_wrap(case: Case) -> str:
    model = case.make()
    routing = dtr.wrap(model)
    expected = case.block_specs(model)
    assert [r.name for r in routing.routed] == list(expected), "routed modules differ from the declared blocks"
    placement = "gate" if case.family is None else "residual"
    assert routing.spec.placement == placement
    kind = F.DTR_KIND[case.convention]
    assert routing.spec.timestep_kind == kind, (routing.spec.timestep_kind, kind)
    joined = {s.cls for s in expected.values() if s != "gate" and "text" in s.stream_tokens}  # [text; image] classes
    for name, spec in expected.items():
        if spec == "gate":
            continue
        io = routing.spec.io_for(model.get_submodule(name))
        assert (io.input, io.output, io.joined) == (spec.stream, spec.returns, spec.cls in joined), (name, io)
    assert routing.spec.adapter == f"diffusers {case.model_cls}", routing.spec.adapter
    return "✓"


def check_ratio_one(case: Case) -> str:
    """Bit-exact outputs and gradients. Where a block's input also feeds a long skip (HunyuanDiT), routing sums
    the block's gradient terms before the skip's, the unrouted backward in another order: gradients agree to
    float rounding of that sum, and the cell says so."""
    routed = case.make()
    dtr.wrap(routed, sharing_ratio=1.0)
    plain, got = outputs_and_grads(case, case.make(), case.mid()), outputs_and_grads(case, routed, case.mid())
    try:
        _equal(plain, got, "sharing_ratio=1.0 vs unrouted")
    except AssertionError:
        assert torch.equal(plain[0], got[0]), "sharing_ratio=1.0 vs unrouted: outputs differ"
        _equal(plain, got, "sharing_ratio=1.0 vs unrouted", exact=False)
        return "outputs ✓, grads to summation order"
    return "✓"


def check_reference(case: Case) -> str:
    routed = case.make()
    dtr.wrap(routed)
    state = State()
    _equal(
        outputs_and_grads(case, routed, case.mid()),
        outputs_and_grads(case, reference_model(case, state), case.mid(), state=state),
        "routed vs hand-written reference",
        exact=False,
    )
    return "✓"


def check_differs(case: Case) -> str:
    routed = case.make()
    dtr.wrap(routed)
    with torch.no_grad():
        a, b = case.run(routed, case.mid()), case.run(case.make(), case.mid())
    assert not torch.allclose(a, b, atol=1e-3), "routing changes nothing"
    return "✓"


def check_batch(case: Case) -> str:
    routed = case.make()
    dtr.wrap(routed)
    with torch.no_grad():
        both, alone = case.run(routed, case.mid()), case.run(routed, case.mid()[:1], batch=1)
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5, msg=lambda m: f"sample 0 alone vs batched: {m}")
    return "✓"


def check_grads(case: Case) -> str:
    routed = case.make()
    dtr.wrap(routed)
    _, grads = outputs_and_grads(case, routed, case.mid())
    assert all(torch.isfinite(g).all() for g in grads.values()), "non-finite gradients"
    blocks = list(case.block_specs(routed))
    assert any(g.abs().sum() > 0 for n, g in grads.items() if any(n.startswith(b + ".") for b in blocks))
    return "✓"


def check_checkpointing(case: Case) -> str:
    routed = case.make()
    if not getattr(routed, "_supports_gradient_checkpointing", False):
        return "n/a"
    dtr.wrap(routed)
    plain = outputs_and_grads(case, routed, case.mid())
    routed.enable_gradient_checkpointing()
    assert any(getattr(m, "gradient_checkpointing", False) for m in routed.modules())
    _equal(plain, outputs_and_grads(case, routed, case.mid()), "gradient checkpointing vs plain")
    return "✓"


def check_save_load(case: Case) -> str:
    routed = case.make()
    routing = dtr.wrap(routed, sharing_ratio=0.5, alpha=2.0)
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        routed.save_pretrained(folder)  # diffusers' own save: the routing travels in the model's config
        loaded = dtr.from_pretrained(getattr(diffusers, case.model_cls), folder).eval()
        assert dtr.routing_of(loaded).config == routing.config
        assert torch.equal(case.run(loaded, case.mid()), case.run(routed, case.mid())), "loaded model differs"
    return "✓"


def check_compile(case: Case) -> str:
    if case.name not in COMPILED:
        return "—"
    routed = case.make()
    dtr.wrap(routed)
    eager = outputs_and_grads(case, routed, case.mid())
    torch._dynamo.reset()
    compiled = torch.compile(routed, backend="aot_eager")
    _equal(eager, outputs_and_grads(case, compiled, case.mid()), "torch.compile(aot_eager) vs eager", exact=False)
    return "✓"


def check_pipelines(case: Case) -> str:
    """Each pipeline run for 2 steps with the routed model: the tasks its routed blocks see are the noise levels
    its scheduler stepped through (flow pipelines: task / 999 within 0.002 of sigma). Returns the tasks seen."""
    cells = []
    for spec in case.pipelines:
        pipe = spec.build(case.make())
        model = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
        routing = dtr.wrap(model)
        seen = []
        handle = routing.routed[0].module.register_forward_hook(
            lambda *a, seen=seen, routing=routing: seen.append(routing.current_tasks().clone())
        )
        with F.record_timesteps(model, case.timestep_position, "timestep") as raw, torch.no_grad():
            pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(0), **spec.run_kwargs())
        handle.remove()
        assert len(raw) == len(seen) == 2, (len(raw), len(seen))
        expected = F.expected_timesteps(pipe.scheduler, spec.convention, 2)
        steps = []
        for i, (t, tasks) in enumerate(zip(raw, seen, strict=True)):
            assert torch.equal(tasks, F.task_index(t, spec.convention).view(tasks.shape)), (spec.cls, i, t, tasks)
            noisy = tasks[tasks != 0] if spec.per_token else tasks
            assert torch.equal(noisy, F.task_index(expected[i], spec.convention).expand(noisy.shape)), (spec.cls, i)
            if spec.convention != "index":
                sigma = F.flow_sigmas(pipe.scheduler, 2)[i]
                assert (noisy.double() / (T - 1) - sigma).abs().max() <= 2e-3, (spec.cls, i, noisy, sigma)
            steps.append("/".join(str(v) for v in sorted(set(tasks.flatten().tolist()))))
        assert int(steps[0].split("/")[-1]) > int(steps[1].split("/")[-1]), "the first step is the noisier task"
        per_token = f" per token {tuple(raw[0].shape)}" if spec.per_token else ""
        cells.append(
            f"{spec.cls}{' (expand_timesteps)' if 'expand_timesteps' in spec.source else ''}: "
            f"{' → '.join(steps)}{per_token}"
        )
    return "<br>".join(cells)


CHECKS: dict[str, Callable[[Case], str]] = {
    "default wrap": check_default_wrap,
    "ratio 1.0 = unrouted": check_ratio_one,
    "= reference": check_reference,
    "≠ unrouted": check_differs,
    "batch independent": check_batch,
    "grads finite": check_grads,
    "grad checkpointing": check_checkpointing,
    "save/load": check_save_load,
    "compile = eager": check_compile,
    "pipeline tasks": check_pipelines,
}


@functools.cache
def result(name: str, check: str) -> str:
    """The cell of `check` for family `name`: its value, or "✗" followed by what failed."""
    torch.manual_seed(0)
    try:
        return CHECKS[check](CASES[name])
    except Exception as e:  # a failed check is a cell of the table, and its message the test failure's reason
        return f"✗ {type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------------------------------
# The two tables of docs/adapters.md

ROUTING_HEADER = (
    "| family | model class | default wrap | routed blocks (class) | stream in → out | "
    "timestep kind | pipeline: tasks its routed blocks see at 2 steps |\n|---|---|---|---|---|---|---|"
)
CHECK_COLUMNS = (
    "ratio 1.0 = unrouted",
    "= reference",
    "≠ unrouted",
    "batch independent",
    "grads finite",
    "grad checkpointing",
    "save/load",
    "compile = eager",
)
CHECKS_HEADER = "| family | " + " | ".join(CHECK_COLUMNS) + " |\n|---|" + "---|" * len(CHECK_COLUMNS)


def _stream(io) -> str:
    out = "output" if io.output is None else f"`out[{io.output}]`"
    text = f"`{io.input}` → {out}"
    if io.joined:
        text = f"`{io.input}` [text; image] → {out}, image tokens routed"
    if io.source:
        text += f"; from `{io.source}` where present"
    return text


def routing_row(name: str) -> str:
    case = CASES[name]
    routing = dtr.wrap(case.make())
    classes = {}
    for r in routing.routed:
        pattern = re.sub(r"\.\d+(\.|$)", r".N\1", r.name)
        pattern = re.sub(r"^(down_blocks|up_blocks|mid_block)(\.N)?\.", "*.", pattern)  # U-Nets: every level
        classes.setdefault((pattern, type(r.module).__name__), routing.spec.io_for(r.module))
    blocks = "<br>".join(f"`{p}` ({c})" for p, c in classes)
    streams = "<br>".join(
        "gate on channel axis 1" if routing.spec.placement == "gate" else _stream(io) for io in classes.values()
    )
    return (
        f"| {name} | `{case.model_cls}` | {result(name, 'default wrap')} | {blocks} | {streams} | "
        f"`{routing.spec.timestep_kind}` | {result(name, 'pipeline tasks')} |"
    )


def checks_row(name: str) -> str:
    return f"| {name} | " + " | ".join(result(name, c) for c in CHECK_COLUMNS) + " |"


def tables() -> tuple[str, str]:
    return (
        ROUTING_HEADER + "\n" + "\n".join(routing_row(n) for n in CASES),
        CHECKS_HEADER + "\n" + "\n".join(checks_row(n) for n in CASES),
    )


MARKERS = (
    "<!-- families-routing -->",
    "<!-- /families-routing -->",
    "<!-- families-checks -->",
    "<!-- /families-checks -->",
)


def doc_tables(text: str) -> tuple[str, str]:
    """The two generated tables as they stand in docs/adapters.md."""
    a, b, c, d = (text.index(m) for m in MARKERS)
    return text[a + len(MARKERS[0]) : b].strip(), text[c + len(MARKERS[2]) : d].strip()


def write_doc() -> None:
    with open(DOC) as f:
        text = f.read()
    for (start, end), table in zip((MARKERS[:2], MARKERS[2:]), tables(), strict=True):
        i, j = text.index(start) + len(start), text.index(end)
        text = text[:i] + "\n" + table + "\n" + text[j:]
    with open(DOC, "w") as f:
        f.write(text)


if __name__ == "__main__":
    torch.set_num_threads(1)
    write_doc()
    print(f"wrote the families tables of {DOC}")
