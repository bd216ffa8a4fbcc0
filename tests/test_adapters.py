"""Adapters: dtr.wrap(model) with no other argument on diffusers U-Nets and DiTs and SiT (the ADM U-Net of
examples/adm_unet.py: tests/examples/).

Every check compares against a reference built by hand, not by the router: a copy of the unwrapped
model in which each routed module is replaced by ``Gated`` (``m_t * module(x)``) or ``Residual``
(``module(m_t * x) + (1 - m_t) * x``), with the mask rows computed here from each sample's timestep.
Models are tiny and built from configs, with perturbed weights (no zero-initialised layer stays zero).
"""

import copy

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from helpers import (
    INDEX_T,
    DiT,
    T,
    diffusers_dit,
    dit_call,
    gate_names_unet,
    perturbed,
    reference,
    unet2d,
    unet2d_call,
    unet_cond,
    unet_cond_call,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import dtr


class SiT(DiT):
    """willisma/SiT's layout is DiT's; only the class name and the meaning of t (1 = data) differ."""


class RepaSiT(SiT):
    """REPA's SiT has a ``path_type`` attribute and t = 0 is data."""

    path_type = "linear"


def sit(seed=0, cls=SiT):
    torch.manual_seed(seed)
    return perturbed(cls(depth=2, class_dropout_prob=0.0), seed)


def sit_call(model, t, seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return model(x, t, y)


UNIT_T = torch.tensor([1.0, 0.0, 0.5, 0.9637])

# family: (factory, call, placement, routed names, timesteps given, the tasks they mean)
FAMILIES = {
    "UNet2DModel": (unet2d, unet2d_call, "gate", gate_names_unet, INDEX_T, INDEX_T),
    "UNet2DConditionModel": (unet_cond, unet_cond_call, "gate", gate_names_unet, INDEX_T, INDEX_T),
    "DiTTransformer2DModel": (
        diffusers_dit,
        dit_call,
        "residual",
        lambda m: [f"transformer_blocks.{i}" for i in range(2)],
        INDEX_T,
        INDEX_T,
    ),
    # SiT: t = 1 is data (task 0); round((1 - 0.9637) * 999) = round(36.26) = 36
    "SiT": (sit, sit_call, "residual", lambda m: ["blocks.0", "blocks.1"], UNIT_T, torch.tensor([0, 999, 500, 36])),
}


# -- selection and placement -------------------------------------------------------------------


ADAPTER_NAMES = {
    "UNet2DModel": "diffusers UNet2DModel",
    "UNet2DConditionModel": "diffusers UNet2DConditionModel",
    "DiTTransformer2DModel": "diffusers DiTTransformer2DModel",
    "SiT": "SiT (t = 1 is data)",
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


@pytest.mark.parametrize("family", ["UNet2DModel", "UNet2DConditionModel"])
def test_each_gated_norm_runs_in_the_call_with_its_samples_tasks_at_every_width(family):
    """Which mask each norm applies is the reference test's to check; here: every gate runs, inside the call, with
    the tasks of each sample, at both widths of the U-Net."""
    make, call, _, expected, t, tasks = FAMILIES[family]
    model = make()
    names = expected(model)
    routing = dtr.wrap(model, sharing_ratio=0.8)
    seen = {}
    for n in names:
        model.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: seen.__setitem__(n, (routing.current_tasks().clone(), o.shape[1]))
        )
    with torch.no_grad():
        call(model, t)
    assert sorted(seen) == sorted(names)
    assert all(torch.equal(got, tasks) for got, _ in seen.values())
    assert {width for _, width in seen.values()} == {8, 16}


def active_channels_after(model, norm_name):
    """Which channels a ResnetBlock2D's gated ``norm2`` lets through, seen at ``conv2``'s input: in eval mode that
    is ``dropout(silu(m * norm2(h))) = m * silu(norm2(h))``, zero exactly where the mask is."""
    seen = {}
    block = model.get_submodule(norm_name.rsplit(".", 1)[0])
    block.conv2.register_forward_pre_hook(lambda m, a: seen.__setitem__("rows", (a[0].flatten(2) != 0).any(-1).float()))
    return lambda: seen["rows"]


# -- timestep forms ----------------------------------------------------------------------------


def routed_rows(model, name):
    """Wrap ``model`` and record, at the gated module ``name``, the task of each sample (read from the router while
    the forward runs) and which channels pass: returns a function giving ((B,) tasks, (B, C) 0/1 rows)."""
    routing = dtr.wrap(model, sharing_ratio=0.5, alpha=1.0)  # a wide moving window
    rows = active_channels_after(model, name)
    tasks = {}
    model.get_submodule(name).register_forward_hook(
        lambda m, a, o: tasks.__setitem__("t", routing.current_tasks().clone())
    )
    return lambda: (tasks["t"].expand(rows().shape[0]), rows())


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
        ("DiTTransformer2DModel", torch.tensor([0.0, 1.0, float("nan"), 3.0]), r"timesteps must be in \[0, 1000\]"),
        (
            "SiT",
            torch.tensor([0.0, 1.0, 1.001, 0.5]),
            r"timesteps must be in \[0, 1\] \(timestep_kind='unit_reversed'\)",
        ),
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
    dtr.wrap(model, sharing_ratio=0.8)
    rows = active_channels_after(model, "down_blocks.0.resnets.0.norm2")
    steps = []
    model.register_forward_hook(lambda m, a, o: steps.append(rows()))
    pipe = DDPMPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=T))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4, output_type="np"
    ).images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    timesteps = pipe.scheduler.timesteps.tolist()
    assert timesteps == [750, 500, 250, 0] and len(steps) == 4
    for active, t in zip(steps, timesteps):
        assert torch.equal(active, dtr.task_masks(T, 8, 0.8)[t].float().expand(2, 8)), t


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


@pytest.mark.parametrize("family", ["UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel"])
def test_gradient_checkpointing_matches_plain_gradients(family):
    make, call, *_ = FAMILIES[family]
    model = make().train()
    dtr.wrap(model)
    # two forwards before one backward: each recomputation must use its own forward's timesteps
    batches = [(1, torch.tensor([0, 999, 500, 37])), (2, torch.tensor([998, 1, 2, 640]))]
    plain = grads_of(model, call, batches)
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
    with pytest.raises(
        ValueError, match=r"does not know where to route a Unknown: pass blocks=.*timestep_arg=.*timestep_module="
    ):
        dtr.wrap(model)
    routing = dtr.wrap(model, blocks=r"stages\.\d+", timestep_module="time", timestep_arg=0)
    ref = reference(model, ["stages.0", "stages.1"], "residual", step)
    with torch.no_grad():
        torch.testing.assert_close(model(x, cond, step), ref(x, cond, step), rtol=0, atol=1e-6)
    routing.remove()
    dtr.wrap(model, blocks=["stages.0"], timestep_arg="step")  # the third positional argument, or step=
    with torch.no_grad():
        model(x, cond, step=step)
    dtr.unwrap(model)
    dtr.wrap(model, blocks=["inp"], timestep_arg=2)  # (2, 5, 3) -> (2, 5, 16): refused with its name
    with pytest.raises(ValueError, match=r"'inp' maps \(2, 5, 3\) to \(2, 5, 16\)"), torch.no_grad():
        model(x, cond, step)


def test_residual_placement_refuses_a_shape_changing_unet_block_by_name():
    model = unet2d()
    dtr.wrap(model, blocks=["up_blocks.1.resnets.0"], placement="residual", channel_axis=1)
    with (
        pytest.raises(ValueError, match="output stream has its input's shape; 'up_blocks.1.resnets.0' maps"),
        torch.no_grad(),
    ):
        unet2d_call(model, INDEX_T)


def test_explicit_timestep_kind_on_a_dit_shaped_model():
    model = perturbed(
        DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    )
    routing = dtr.wrap(model, timestep_kind="unit_reversed")
    assert routing.spec.adapter == "DiT" and routing.spec.timestep_kind == "unit_reversed"
    t = torch.tensor([1.0, 0.0, 0.25, 0.75])
    ref = reference(model, ["blocks.0", "blocks.1"], "residual", torch.tensor([0, 999, 749, 250]))
    with torch.no_grad():
        torch.testing.assert_close(sit_call(model, t), sit_call(ref, t), rtol=0, atol=1e-6)
