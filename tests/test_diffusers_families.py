"""Tests of the tiny diffusers family infrastructure (tests/diffusers_families.py), independent of dtr's core.

They check that each family builds and runs as its pipeline calls it, that the declared block facts (stream
argument, how it is passed, which output carries it, pure residual or not) hold on real calls, and that the
timestep each real pipeline passes for 2 steps is the scheduler's value in the declared convention.
"""

import copy
import importlib
import inspect
import pkgutil

import diffusers
import numpy as np
import pytest
import torch

if tuple(int(v) for v in diffusers.__version__.split(".")[:2]) < (0, 42):
    pytest.skip("families, pipelines and source lines are declared against diffusers 0.42", allow_module_level=True)

import diffusers_families as F  # noqa: E402

FAMILIES = {f.name: f for f in F.FAMILIES}
PIPELINES = [(f.name, i) for f in F.FAMILIES for i in range(len(f.pipelines))]


def _t(family, value=0.5):
    """A mid-noise timestep in the units of the family's main pipeline, as a Python number."""
    convention = family.pipelines[0].convention
    if convention in ("index", "sigma1000"):
        return 500 if family.timestep_dtype == torch.int64 else 500.0
    return value


@pytest.fixture(scope="module")
def models():
    """One built model per family (building is most of the cost)."""
    return {name: f.make() for name, f in FAMILIES.items()}


@pytest.mark.parametrize("name", FAMILIES)
def test_make_is_deterministic_and_perturbed(name, models):
    family, model = FAMILIES[name], models[name]
    assert not model.training
    again = family.make().state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, again[key]), key
    # every parameter moved off its initialisation: no all-zero tensor is left (adaLN-Zero gates, zero out-projections)
    for pname, p in model.named_parameters():
        assert p.abs().sum() > 0, pname


@pytest.mark.parametrize("name", FAMILIES)
def test_call_is_deterministic_and_depends_on_timestep(name, models):
    family, model = FAMILIES[name], models[name]
    t = _t(family)
    out = family.call(model, t)
    assert torch.isfinite(out).all() and out.shape[0] == 2
    assert torch.equal(out, family.call(model, t))
    # another noise level changes the prediction: the timestep reaches the blocks
    other = 900 if isinstance(t, int) else (900.0 if t == 500.0 else 0.9)
    assert not torch.allclose(out, family.call(model, other))
    # samples are independent: sample 0 alone gives what it gives in the batch of 2
    assert torch.allclose(family.call(model, t, batch=1), out[:1], atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_declared_blocks_match_calls(name, models):
    """Each routed block: its forward's parameters, the stream's shape in and out, and how the model passes it."""
    family, model = FAMILIES[name], models[name]
    names = family.block_names(model)
    assert names, "no routed block matched"
    calls = F.probe_blocks(family, model, _t(family))
    assert set(calls) == set(names), "every routed block runs once per call"
    for block_name, spec in names.items():
        module = model.get_submodule(block_name)
        assert type(module).__name__ == spec.cls
        params = tuple(p for p in inspect.signature(type(module).forward).parameters if p != "self")
        assert params[: len(spec.params)] == spec.params
        args, kwargs, out = calls[block_name]["args"], calls[block_name]["kwargs"], calls[block_name]["out"]
        if spec.called == "keyword":
            assert spec.stream in kwargs and len(args) <= spec.params.index(spec.stream)
        else:
            assert spec.stream not in kwargs and len(args) > spec.params.index(spec.stream)
        x = F.stream_in(spec, args, kwargs)
        if spec.returns is None:
            assert torch.is_tensor(out)
        else:
            assert isinstance(out, tuple) and len(out) == 2
        y = F.stream_out(spec, out)
        assert y.shape == x.shape and y.dtype == x.dtype


def _zeroed_call(module, spec, args, kwargs):
    """Stream in and stream out of `module` with every parameter zero (the branch F vanishes)."""
    zeroed = copy.deepcopy(module)
    with torch.no_grad():
        for p in zeroed.parameters():
            p.zero_()
        return F.stream_in(spec, args, kwargs), F.stream_out(spec, zeroed(*args, **kwargs))


@pytest.mark.parametrize("name", FAMILIES)
def test_pure_residual_blocks_are_identity_when_their_branch_vanishes(name, models):
    """A pure residual x + F(x): with all block weights zero every branch ends in a zero projection or gate, so the
    block returns its stream input exactly. HunyuanDiT's long-skip blocks replace x by skip_linear(cat(x, skip))
    first: zeroed, they return 0, not x."""
    family, model = FAMILIES[name], models[name]
    calls = F.probe_blocks(family, model, _t(family))
    long_skip = set(F.hunyuan_long_skip_blocks(model)) if family is F.HUNYUAN_DIT else set()
    for block_name, spec in family.block_names(model).items():
        call = calls[block_name]
        x, y = _zeroed_call(model.get_submodule(block_name), spec, call["args"], call["kwargs"])
        if block_name in long_skip:
            assert "skip" in call["kwargs"] and not torch.equal(y, x)
            assert torch.equal(y, torch.zeros_like(x))
        else:
            assert spec.pure_residual and "skip" not in call["kwargs"]
            assert torch.equal(y, x), block_name


def test_hunyuan_long_skip_blocks():
    model = F.HUNYUAN_DIT.make()
    assert F.hunyuan_long_skip_blocks(model) == ["blocks.3"]  # num_layers 4: index > 2
    assert [i for i, b in enumerate(model.blocks) if b.skip_linear is not None] == [3]
    assert not F.HUNYUAN_LONG_SKIP.pure_residual


def test_flux_single_block_runs_one_residual_on_the_joined_sequence():
    """Flux single blocks take image and text apart and return (text, image) from one residual over [text; image]."""
    family, model = F.FLUX, F.FLUX.make()
    call = F.probe_blocks(family, model, 0.5)["single_transformer_blocks.0"]
    block = model.get_submodule("single_transformer_blocks.0")
    txt, img = call["kwargs"]["encoder_hidden_states"], call["kwargs"]["hidden_states"]
    with torch.no_grad():
        out_txt, out_img = block(**call["kwargs"])
        joined = torch.cat([txt, img], 1)
        norm, gate = block.norm(joined, emb=call["kwargs"]["temb"])
        attn = block.attn(hidden_states=norm, image_rotary_emb=call["kwargs"]["image_rotary_emb"])
        branch = gate.unsqueeze(1) * block.proj_out(torch.cat([attn, block.act_mlp(block.proj_mlp(norm))], 2))
    assert torch.allclose(torch.cat([out_txt, out_img], 1), joined + branch, atol=1e-6)
    assert out_txt.shape == txt.shape and out_img.shape == img.shape


def test_sd3_last_block_returns_no_text():
    family, model = F.SD3, F.SD3.make()
    calls = F.probe_blocks(family, model, 500.0)
    assert [model.transformer_blocks[i].context_pre_only for i in range(2)] == [False, True]
    assert calls["transformer_blocks.0"]["out"][0].shape == (2, F.TEXT_LEN, 16)
    assert calls["transformer_blocks.1"]["out"][0] is None


@pytest.mark.parametrize("name", [f.name for f in F.FAMILIES if f.per_token_shape])
def test_per_token_timesteps_equal_per_sample_when_tokens_agree(name, models):
    """Families whose pipelines pass (B, N) timesteps: a (B, N) tensor of one value per sample gives the (B,) result,
    and a token-varying one gives another."""
    family, model = FAMILIES[name], models[name]
    shape = family.per_token_shape(2)
    per_sample = torch.tensor([700.0, 300.0])
    out = family.call(model, per_sample)
    tokens = per_sample[:, None].expand(shape).contiguous()
    assert torch.allclose(family.call(model, tokens), out, atol=1e-5)
    mixed = tokens.clone()
    mixed[:, : shape[1] // 2] = 0.0
    assert not torch.allclose(family.call(model, mixed), out, atol=1e-3)


def test_task_index():
    T = F.NUM_TASKS
    idx = lambda *v, c: F.task_index(torch.tensor(v, dtype=torch.float64), c).tolist()
    assert idx(0, 1, 500, 999, c="index") == [0, 1, 500, 999]
    assert idx(1000.0, 999.6, 0.5, 1.5, 0.0, c="sigma1000") == [T - 1, T - 1, 0, 2, 0]  # half to even
    assert idx(1.0, 0.5, 0.0, c="sigma") == [T - 1, 500, 0]  # round(0.5 * 999) = 499.5 -> 500
    assert idx(1.0, 0.0, 0.999, c="one_minus_sigma") == [0, T - 1, 1]
    assert idx(0.0, 25.0, 1000.0, c="one_minus_sigma1000") == [T - 1, 975, 0]
    with pytest.raises(ValueError, match="unknown convention"):
        F.task_index(torch.zeros(1), "seconds")
    assert set(F.DTR_KIND) == set(F.CONVENTIONS)


# Every transformer model class in the installed diffusers whose forward takes a timestep: covered, or why not.
def _transformer_classes():
    found = {}
    for info in pkgutil.iter_modules(diffusers.models.transformers.__path__):
        module = importlib.import_module(f"diffusers.models.transformers.{info.name}")
        for cls_name, cls in vars(module).items():
            if (
                inspect.isclass(cls)
                and cls.__module__ == module.__name__
                and hasattr(cls, "config_name")
                and issubclass(cls, torch.nn.Module)
            ):
                params = inspect.signature(cls.forward).parameters
                if any("time" in p or p == "t" for p in params):
                    found[cls_name] = info.name
    return found


def test_every_timestep_transformer_is_covered_or_left_out_with_a_reason():
    classes = _transformer_classes()
    covered = {f.model_cls for f in F.FAMILIES}
    assert covered <= set(classes)
    missing = set(classes) - covered - set(F.LEFT_OUT)
    assert not missing, f"declare these families or say why they are left out: {sorted(missing)}"
    assert not set(F.LEFT_OUT) & covered
    assert all(reason.strip() for reason in F.LEFT_OUT.values())


# ---- the real pipelines, 2 steps each


@pytest.mark.slow
@pytest.mark.parametrize("name,index", PIPELINES, ids=[f"{n}-{FAMILIES[n].pipelines[i].cls}-{i}" for n, i in PIPELINES])
def test_pipeline_passes_the_declared_timesteps(name, index):
    family = FAMILIES[name]
    spec = family.pipelines[index]
    pipe, out, seen = F.run_pipeline(family, spec, steps=2)
    frames = out[0] if isinstance(out, tuple) else getattr(out, "images", None)
    frames = frames if frames is not None else out.frames
    assert np.isfinite(np.asarray(frames)).all()
    assert len(seen) == 2, "one transformer call per step (no classifier-free guidance batch split)"
    expected = F.expected_timesteps(pipe.scheduler, spec.convention, 2)
    tasks = []
    for step, t in enumerate(seen):
        t64 = t.double()
        if spec.per_token:
            assert t.ndim == 2 and t.shape[0] == 1 and t.dtype == torch.float32
            noisy = t64[0] != 0
            assert noisy.any()
            assert torch.allclose(t64[0][noisy], expected[step].expand(int(noisy.sum())), rtol=1e-6, atol=1e-6)
            if "first" in spec.per_token:  # image-to-video: the conditioning frame's tokens are clean
                n_first = int((~noisy).sum())
                assert n_first > 0 and not noisy[:n_first].any() and noisy[n_first:].all()
            else:
                assert noisy.all()
            value = t64[0][noisy][0]
        else:
            assert t.shape == (1,)
            assert torch.allclose(t64[0], expected[step], rtol=1e-6, atol=1e-6)
            value = t64[0]
        # the convention, against the scheduler's own noise level
        if spec.convention == "index":
            assert value == torch.round(value) and 0 <= value < F.NUM_TASKS
        else:
            sigma = F.flow_sigmas(pipe.scheduler, 2)[step]
            got = {
                "sigma1000": value / 1000,
                "sigma": value,
                "one_minus_sigma": 1 - value,
                "one_minus_sigma1000": 1 - value / 1000,
            }[spec.convention]
            assert abs(got - sigma) <= 1e-3, (got, sigma)  # DPM-Solver/UniPC truncate sigma * 1000 to an integer
        tasks.append(int(F.task_index(value, spec.convention)))
    assert tasks[0] > tasks[1], "the first step is the noisier task"
    if spec.convention != "index":
        assert tasks[0] == F.NUM_TASKS - 1, "flow matching starts at pure noise (sigma 1)"


@pytest.mark.slow
def test_sana_and_sana_sprint_share_the_class_not_the_convention():
    assert F.SANA.model_cls == F.SANA_SPRINT.model_cls
    assert (F.SANA.pipelines[0].convention, F.SANA_SPRINT.pipelines[0].convention) == ("sigma1000", "sigma")
    pipe, _, seen = F.run_pipeline(F.SANA_SPRINT, F.SANA_SPRINT.pipelines[0])
    # SCMScheduler starts at max_timesteps = 1.57080 > pi / 2: the first sigma is a hair above 1
    assert seen[0].item() > 1.0 and seen[0].item() - 1.0 < 1e-5
