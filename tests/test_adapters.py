"""Adapters: dtr.wrap(model) with no other argument on diffusers U-Nets and DiTs, an ADM U-Net and SiT.

Every check compares against a reference built by hand, not by the router: a copy of the unwrapped
model in which each routed module is replaced by ``Gated`` (``m_t * module(x)``) or ``Residual``
(``module(m_t * x) + (1 - m_t) * x``), with the mask rows computed here from each sample's timestep.
Models are tiny and built from configs, with perturbed weights (no zero-initialised layer stays zero).
"""

import copy
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import dtr

from diffusers import DDPMPipeline, DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import adm_unet  # noqa: E402
from adm_unet import ADMUNet  # noqa: E402
from models import DiT  # noqa: E402  (examples/dit, on the path from conftest)

T = 1000


# -- tiny models -------------------------------------------------------------------------------


def perturbed(model, seed=0, scale=0.1):
    """Random non-zero weights everywhere, so that zero-initialised output layers do not hide routing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def unet2d(seed=0):
    torch.manual_seed(seed)
    return perturbed(UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8,
    ), seed)


def unet_cond(seed=0):
    torch.manual_seed(seed)
    return perturbed(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4,
    ), seed)


def diffusers_dit(seed=0):
    torch.manual_seed(seed)
    return perturbed(DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ), seed)


def adm(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), attention_ds=(2,),
               num_res_blocks=1, groups=4, num_heads=2, num_classes=10)
    return perturbed(ADMUNet(**{**cfg, **kw}), seed)


class SiT(DiT):
    """willisma/SiT's layout is DiT's; only the class name and the meaning of t (1 = data) differ."""


class RepaSiT(SiT):
    """REPA's SiT has a ``path_type`` attribute and t = 0 is data."""

    path_type = "linear"


def sit(seed=0, cls=SiT):
    torch.manual_seed(seed)
    return perturbed(cls(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
                         num_classes=10, class_dropout_prob=0.0), seed, scale=0.2)


# Calls: (model, t) -> output, with fixed random inputs of the family's shapes.
def unet2d_call(model, t, seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    return model(torch.randn(batch, 1, 8, 8, generator=g), t).sample


def unet_cond_call(model, t, seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 3, 12, generator=g)
    return model(x, t, encoder_hidden_states=ctx).sample


def dit_call(model, t, seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return model(x, timestep=t, class_labels=y).sample


def adm_call(model, t, seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return model(x, t, y)


def sit_call(model, t, seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return model(x, t, y)


def gate_names_unet(model):
    """Written out independently of the adapter: ResnetBlock2D.norm2, Attention.group_norm, Transformer2DModel.norm."""
    names = []
    for n, m in model.named_modules():
        kind = type(m).__name__
        if kind == "ResnetBlock2D":
            names.append(f"{n}.norm2")
        elif kind == "Attention" and m.group_norm is not None:
            names.append(f"{n}.group_norm")
        elif kind == "Transformer2DModel":
            names.append(f"{n}.norm")
    return names


def gate_names_adm(model):
    """ADM: the first layer of every ResBlock's out_layers, the norm of every AttentionBlock."""
    names = []
    for n, m in model.named_modules():
        if isinstance(m, adm_unet.ResBlock):
            names.append(f"{n}.out_layers.0")
        elif isinstance(m, adm_unet.AttentionBlock):
            names.append(f"{n}.norm")
    return names


INDEX_T = torch.tensor([0, 999, 500, 37])
UNIT_T = torch.tensor([1.0, 0.0, 0.5, 0.9637])

# family: (factory, call, placement, routed names, timesteps given, the tasks they mean)
FAMILIES = {
    "UNet2DModel": (unet2d, unet2d_call, "gate", gate_names_unet, INDEX_T, INDEX_T),
    "UNet2DConditionModel": (unet_cond, unet_cond_call, "gate", gate_names_unet, INDEX_T, INDEX_T),
    "DiTTransformer2DModel": (diffusers_dit, dit_call, "residual",
                              lambda m: [f"transformer_blocks.{i}" for i in range(2)], INDEX_T, INDEX_T),
    "ADMUNet": (adm, adm_call, "gate", gate_names_adm, INDEX_T, INDEX_T),
    # SiT: t = 1 is data (task 0); round((1 - 0.9637) * 999) = round(36.26) = 36
    "SiT": (sit, sit_call, "residual", lambda m: ["blocks.0", "blocks.1"], UNIT_T, torch.tensor([0, 999, 500, 36])),
}


# -- hand-built references ---------------------------------------------------------------------


class Swap(nn.Module):
    """Stands in for a module: same attributes (the model may read them), routed forward."""

    def __init__(self, inner, rows):
        super().__init__()
        self.inner, self.rows = inner, rows

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


class Gated(Swap):
    """m * module(...): the ADM placement, mask rows (B, C) on channel axis 1."""

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return out * self.rows.view(*self.rows.shape, *([1] * (out.ndim - 2))).to(out.dtype)


class Residual(Swap):
    """module(m * x) + (1 - m) * x: the transformer placement, mask rows (B, C) on the last axis."""

    def forward(self, x, *args, **kwargs):
        m = self.rows.to(x.dtype)[:, None, :]
        return self.inner(m * x, *args, **kwargs) + (1 - m) * x


def hidden_width(model, name):
    """Channels of a transformer block's tokens."""
    block = model.get_submodule(name)
    for m in block.modules():
        if isinstance(m, nn.LayerNorm):
            return m.normalized_shape[0]
    raise AssertionError(name)


def reference(model, names, placement, tasks, ratio=0.8, alpha=4.0):
    """A copy of the (unwrapped) model with each routed module replaced by its hand-written routed version."""
    ref = copy.deepcopy(model)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = ref.get_submodule(parent_name) if parent_name else ref
        inner = getattr(parent, attr)
        c = inner.num_channels if placement == "gate" else hidden_width(ref, name)
        rows = dtr.task_masks(T, c, ratio, alpha)[tasks]
        setattr(parent, attr, (Gated if placement == "gate" else Residual)(inner, rows))
    return ref


# -- selection and placement -------------------------------------------------------------------


ADAPTER_NAMES = {
    "UNet2DModel": "diffusers UNet2DModel", "UNet2DConditionModel": "diffusers UNet2DConditionModel",
    "DiTTransformer2DModel": "diffusers DiTTransformer2DModel", "ADMUNet": "ADM U-Net", "SiT": "SiT (t = 1 is data)",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_wrap_picks_the_adapter_and_routes_every_expected_module(family):
    make, _, placement, expected, *_ = FAMILIES[family]
    model = make()
    routing = dtr.wrap(model, sharing_ratio=0.8)
    assert routing.spec.adapter == ADAPTER_NAMES[family]
    assert routing.spec.placement == placement
    assert sorted(r.name for r in routing.routed) == sorted(expected(model))
    if placement == "gate":  # every resolution: several widths, each with its own mask
        assert routing.widths() == [8, 16]


@pytest.mark.parametrize("family", FAMILIES)
def test_sharing_ratio_one_is_the_identity(family):
    make, call, _, _, t, _ = FAMILIES[family]
    model = make()
    with torch.no_grad():
        ref = call(model, t)
        dtr.wrap(model, sharing_ratio=1.0)
        assert torch.equal(call(model, t), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_model_equals_hand_built_reference(family):
    make, call, placement, expected, t, tasks = FAMILIES[family]
    model = make()
    names = expected(model)
    ref = reference(model, names, placement, tasks)
    with torch.no_grad():
        plain = call(model, t)
        dtr.wrap(model, sharing_ratio=0.8)
        out = call(model, t)
        want = call(ref, t)
        shared = call(model, t[2:3], batch=4)  # one timestep (1,) broadcast to the batch, as diffusers does
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    assert not torch.allclose(out, plain, atol=1e-4)
    ref_shared = reference(make(), names, placement, tasks[2:3].expand(4))
    with torch.no_grad():  # the embedding of a (1,) t is broadcast later than that of a (B,) t: last-bit rounding
        torch.testing.assert_close(shared, call(ref_shared, t[2:3].expand(4)), rtol=1e-5, atol=1e-5)


def record_gates(model, names):
    """Record, for each module of ``names``, its own (unrouted) output and the output the model receives.

    A copy of each module taken before wrapping computes the unrouted output from the input a
    pre-hook sees; a forward hook sees the routed output.  Returns (raw, seen, install_after).
    """
    raw, seen = {}, {}
    plain = {n: copy.deepcopy(model.get_submodule(n)) for n in names}

    def install_after():
        for n in names:
            module = model.get_submodule(n)
            module.register_forward_pre_hook(
                lambda m, a, n=n: raw.__setitem__(n, plain[n](*a).detach().clone()))
            module.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o.detach().clone()))

    return raw, seen, install_after


@pytest.mark.parametrize("family", ["UNet2DModel", "UNet2DConditionModel", "ADMUNet"])
def test_each_gated_norm_receives_the_mask_of_its_width_for_each_samples_timestep(family):
    make, call, _, expected, t, tasks = FAMILIES[family]
    model = make()
    names = expected(model)
    raw, seen, install_after = record_gates(model, names)
    dtr.wrap(model, sharing_ratio=0.8)
    install_after()
    with torch.no_grad():
        call(model, t)
    widths = set()
    for n in names:
        c = raw[n].shape[1]
        widths.add(c)
        m = dtr.task_masks(T, c, 0.8)[tasks].float()  # (B, C): row b is the mask of sample b's task
        assert torch.equal(seen[n], raw[n] * m.view(*m.shape, *([1] * (raw[n].ndim - 2)))), n
        assert (m.sum(1) == int(c * 0.8)).all()
    assert widths == {8, 16}


# -- timestep forms ----------------------------------------------------------------------------


def routed_rows(model, name):
    """Wrap ``model`` and record, at module ``name``, the task of each sample (read from the router while
    the forward runs) and which channels pass: returns a function giving ((B,) tasks, (B, C) 0/1 rows)."""
    raw, seen, install_after = record_gates(model, [name])
    routing = dtr.wrap(model, sharing_ratio=0.5, alpha=1.0)  # a wide moving window
    install_after()
    tasks = {}
    model.get_submodule(name).register_forward_hook(lambda m, a, o: tasks.__setitem__("t", routing.current_tasks().clone()))

    def observed():
        r, s = raw[name], seen[name]
        rows = (s.flatten(2) != 0).any(-1).float() * (r.flatten(2) != 0).any(-1).float()
        return tasks["t"].expand(rows.shape[0]), rows

    return observed


_UNET = {}


def cached_unet():
    if "m" not in _UNET:
        model = unet2d()
        _UNET["m"] = (model, routed_rows(model, "mid_block.resnets.0.norm2"))
    return _UNET["m"]


def check_routed(observed, tasks, batch=3, c=16):
    """The router saw exactly ``tasks`` (one per sample, or one broadcast) and gated by their masks."""
    want = torch.as_tensor(tasks).expand(batch)
    got_tasks, rows = observed()
    assert torch.equal(got_tasks, want), (got_tasks, want)
    assert torch.equal(rows, dtr.task_masks(T, c, 0.5, 1.0)[want].float())


def nearest_task(v):
    """What 'rounded to the nearest task' means, written with Python's round (half to even)."""
    return min(round(v), T - 1)


timestep_forms = st.one_of(
    st.tuples(st.just("long"), st.lists(st.integers(0, T - 1), min_size=3, max_size=3)),
    st.tuples(st.just("float"), st.lists(st.floats(0, T, width=32), min_size=3, max_size=3)),
    st.tuples(st.just("int"), st.integers(0, T - 1)),
    st.tuples(st.just("0-d"), st.integers(0, T - 1)),
    st.tuples(st.just("(1,)"), st.integers(0, T - 1)),
    st.tuples(st.just("0-d float"), st.floats(0, T, width=32)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timestep_forms)
def test_every_timestep_form_routes_each_sample_to_the_nearest_task(form):
    model, rows = cached_unet()
    kind, v = form
    if kind == "long":
        t, tasks = torch.tensor(v), v
    elif kind == "float":
        t = torch.tensor(v, dtype=torch.float32)
        tasks = [nearest_task(float(x)) for x in t]  # Euler/Karras float timesteps; 1000.0 is task 999
    elif kind == "int":
        t, tasks = v, [v]
    elif kind == "0-d":
        t, tasks = torch.tensor(v), [v]
    elif kind == "(1,)":
        t, tasks = torch.tensor([v]), [v]
    else:
        t = torch.tensor(v, dtype=torch.float32)
        tasks = [nearest_task(float(t))]
    with torch.no_grad():
        unet2d_call(model, t, batch=3)
    check_routed(rows, tasks)


def test_python_float_and_flow_matching_end():
    model, rows = cached_unet()
    with torch.no_grad():
        unet2d_call(model, 1000.0, batch=3)  # flow matching's t = T is task T - 1
        check_routed(rows, [999])
        unet2d_call(model, 498.5, batch=3)  # ties go to the even task
        check_routed(rows, [498])
        unet2d_call(model, torch.tensor([0.49, 998.51, 999.6]), batch=3)
        check_routed(rows, [0, 999, 999])
        unet2d_call(model, np.int64(17), batch=3)
        check_routed(rows, [17])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1, width=32), min_size=2, max_size=2), st.booleans())
def test_continuous_time_maps_onto_tasks_in_the_stated_direction(u, repa):
    model = sit(cls=RepaSiT if repa else SiT)
    t = torch.tensor(u, dtype=torch.float32)
    tasks = [round((float(x) if repa else 1.0 - float(x)) * (T - 1)) for x in t]  # SiT: t = 1 is data
    ref = reference(model, ["blocks.0", "blocks.1"], "residual", torch.tensor(tasks))
    routing = dtr.wrap(model)
    assert routing.spec.timestep_kind == ("unit" if repa else "unit_reversed")
    with torch.no_grad():
        torch.testing.assert_close(sit_call(model, t, batch=2), sit_call(ref, t, batch=2), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "family, t, match",
    [
        ("UNet2DModel", 1000, r"timesteps must be in \[0, 1000\)"),
        ("UNet2DModel", torch.tensor([0, 5, -1, 2]), r"timesteps must be in \[0, 1000\)"),
        ("UNet2DModel", torch.tensor([0.0, 5.0, 1000.5, 2.0]), r"timesteps must be in \[0, 1000\]"),
        ("UNet2DModel", -0.25, r"timesteps must be in \[0, 1000\]"),
        ("DiTTransformer2DModel", torch.tensor([0, 1, 2, 1000]), r"timesteps must be in \[0, 1000\)"),
        ("ADMUNet", torch.tensor([0.0, 1.0, float("nan"), 3.0]), r"timesteps must be in \[0, 1000\]"),
        ("SiT", torch.tensor([0.0, 1.0, 1.01, 0.5]), r"timesteps must be in \[0, 1\] \(timestep_kind='unit_reversed'\)"),
        ("SiT", torch.tensor([0.0, 1.0, -0.01, 0.5]), r"timesteps must be in \[0, 1\]"),
        ("SiT", torch.tensor([0.0, 1.0, 500.0, 0.5]), r"timesteps must be in \[0, 1\]"),
    ],
)
def test_timesteps_outside_the_range_fail_loudly(family, t, match):
    make, call, *_ = FAMILIES[family]
    model = make()
    dtr.wrap(model)
    with pytest.raises(ValueError, match=match), torch.no_grad():
        call(model, t)


# -- sampling, training, checkpointing, copies -------------------------------------------------


def test_ddpm_pipeline_generates_with_a_routed_unet_and_routes_each_step():
    model = unet2d()
    raw, seen, install_after = record_gates(model, ["down_blocks.0.resnets.0.norm2"])
    dtr.wrap(model, sharing_ratio=0.8)
    install_after()
    steps = []
    model.register_forward_hook(lambda m, a, o: steps.append((seen["down_blocks.0.resnets.0.norm2"] != 0).flatten(2).any(-1)))
    pipe = DDPMPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=T))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    timesteps = pipe.scheduler.timesteps.tolist()
    assert timesteps == [750, 500, 250, 0] and len(steps) == 4
    for active, t in zip(steps, timesteps):
        assert torch.equal(active, dtr.task_masks(T, 8, 0.8)[t].expand(2, 8)), t


def training_grads(model, ref, batches):
    """One DDPM training loss on model and ref: their gradients must agree."""
    sched = DDPMScheduler(num_train_timesteps=T)
    out = {}
    for m in (model, ref):
        m.train().zero_grad()
        loss = 0
        for x, noise, t in batches:
            loss = loss + torch.nn.functional.mse_loss(m(sched.add_noise(x, noise, t), t).sample, noise)
        loss.backward()
        out[m] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return out[model], out[ref]


def ddpm_batch(seed, t):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g), t


def test_training_step_gradients_flow_through_the_gates():
    model = unet2d()
    t = torch.tensor([10, 999, 400, 3])
    ref = reference(model, gate_names_unet(model), "gate", t)
    dtr.wrap(model)
    got, want = training_grads(model, ref, [ddpm_batch(0, t)])
    want = {n.replace(".inner", ""): g for n, g in want.items()}
    assert got.keys() == want.keys() and len(got) == len(list(model.parameters()))
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
    assert all(g.abs().sum() > 0 for g in got.values())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.conv_in.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.conv_in.weight)


def grads_of(model, call, batches):
    torch.manual_seed(0)  # DiTTransformer2DModel drops class labels at random in training
    model.zero_grad()
    sum(call(model, t, seed=s).square().mean() for s, t in batches).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "ADMUNet"])
def test_gradient_checkpointing_matches_plain_gradients(family):
    make, call, *_ = FAMILIES[family]
    model = make().train()
    dtr.wrap(model)
    # two forwards before one backward: each recomputation must use its own forward's timesteps
    batches = [(1, torch.tensor([0, 999, 500, 37])), (2, torch.tensor([998, 1, 2, 640]))]
    plain = grads_of(model, call, batches)
    if family == "ADMUNet":
        model.use_checkpoint = True
    else:
        model.enable_gradient_checkpointing()
    checkpointed = grads_of(model, call, batches)
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)


def test_deepcopy_routes_by_its_own_inputs_and_state_dict_is_unchanged():
    model = unet2d()
    keys = list(model.state_dict())
    routing = dtr.wrap(model)
    ema = copy.deepcopy(model)
    assert dtr.routing_of(ema) is not routing and dtr.routing_of(ema).model is ema
    t, t2 = INDEX_T, torch.tensor([999, 0, 10, 600])
    ref2 = reference(unet2d(), gate_names_unet(model), "gate", t2)
    with torch.no_grad():
        a = unet2d_call(model, t)
        b = unet2d_call(ema, t2)
        assert torch.equal(unet2d_call(model, t), a)
        torch.testing.assert_close(b, unet2d_call(ref2, t2), rtol=0, atol=1e-6)
    assert list(model.state_dict()) == keys
    plain = UNet2DModel.from_config(model.config)
    plain.load_state_dict(model.state_dict(), strict=True)
    dtr.wrap(plain)
    with torch.no_grad():
        assert torch.equal(unet2d_call(plain.eval(), t), a)


# -- routing by hand ---------------------------------------------------------------------------


def test_blocks_regex_list_and_predicate_override_the_adapter():
    model = unet2d()
    by_regex = dtr.wrap(model, blocks=r".*resnets\.\d+\.norm2")
    assert by_regex.spec.placement == "gate" and all(r.name.endswith("norm2") for r in by_regex.routed)
    assert len(by_regex.routed) == 8
    by_regex.remove()
    names = ["mid_block.attentions.0.group_norm"]
    assert [r.name for r in dtr.wrap(model, blocks=names).routed] == names
    dtr.unwrap(model)
    pred = dtr.wrap(model, blocks=lambda n, m: isinstance(m, nn.GroupNorm) and m.num_channels == 16)
    assert {r.module.num_channels for r in pred.routed} == {16}


class Unknown(nn.Module):
    """No adapter knows it: the timestep is the third argument and enters through ``time``."""

    def __init__(self):
        super().__init__()
        self.time = nn.Embedding(T, 16)
        self.inp = nn.Linear(3, 16)
        self.stages = nn.ModuleList([nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(2)])
        self.head = nn.Linear(16, 3)

    def forward(self, x, cond, step):
        h = self.inp(x) + self.time(step)[:, None] + cond
        for stage in self.stages:
            h = stage(h)
        return self.head(h)


def test_unknown_architecture_in_one_line_and_clear_errors():
    torch.manual_seed(0)
    model = Unknown()
    x, cond, step = torch.randn(2, 5, 3), torch.randn(2, 1, 16), torch.tensor([0, 999])
    with pytest.raises(ValueError, match=r"does not know where to route a Unknown: pass blocks=.*timestep_module=.*timestep_arg="):
        dtr.wrap(model)
    routing = dtr.wrap(model, blocks=r"stages\.\d+", timestep_module="time", timestep_arg=0)
    ref = reference(model, ["stages.0", "stages.1"], "residual", step)
    with torch.no_grad():
        torch.testing.assert_close(model(x, cond, step), ref(x, cond, step), rtol=0, atol=1e-6)
    routing.remove()
    dtr.wrap(model, blocks=["stages.0"], timestep_arg=(2, "step"))  # the third positional argument
    with torch.no_grad():
        model(x, cond, step=step)
    dtr.unwrap(model)
    dtr.wrap(model, blocks=["inp"], timestep_arg=2)  # (2, 5, 3) -> (2, 5, 16): refused with its name
    with pytest.raises(ValueError, match=r"'inp' maps \(2, 5, 3\) to \(2, 5, 16\)"), torch.no_grad():
        model(x, cond, step)


def test_residual_placement_refuses_a_shape_changing_unet_block_by_name():
    model = unet2d()
    dtr.wrap(model, blocks=["up_blocks.1.resnets.0"], placement="residual")
    with pytest.raises(ValueError, match="residual placement needs a block whose output has its input's shape; 'up_blocks.1.resnets.0'"):
        with torch.no_grad():
            unet2d_call(model, INDEX_T)


def test_explicit_timestep_kind_on_a_dit_shaped_model():
    model = perturbed(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10))
    routing = dtr.wrap(model, timestep_kind="unit_reversed")
    assert routing.spec.adapter == "DiT" and routing.spec.timestep_kind == "unit_reversed"
    t = torch.tensor([1.0, 0.0, 0.25, 0.75])
    ref = reference(model, ["blocks.0", "blocks.1"], "residual", torch.tensor([0, 999, 749, 250]))
    with torch.no_grad():
        torch.testing.assert_close(sit_call(model, t), sit_call(ref, t), rtol=0, atol=1e-6)


def test_diffusers_example_trains_samples_and_writes_a_grid(tmp_path):
    import diffusers_unet

    out = tmp_path / "grid.png"
    diffusers_unet.main(["--steps", "2", "--batch-size", "8", "--sample-steps", "2", "--num-samples", "4", "--out", str(out)])
    from PIL import Image

    assert Image.open(out).size == (4 * (2 * 17 + 1), 4 * (2 * 17 + 1))
