"""What hooks on a routed module see (issue 26): the stream the model passes on.

A forward hook on a routed block receives ``block(m * x) + (1 - m) * x`` (registered before or after dtr.wrap, with
kwargs, always_call, and the global ``register_module_forward_hook``), a pre-hook the input as the model passed it
(an input it returns is the one routing masks), a hook that returns a new output replaces what the model passes
on; the block's own children see the masked input.  REPA-style feature taps through a forward hook give the loss
and gradients of the formula, also with gradient checkpointing and torch.compile.  Everything against the formula
written out here in float64.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers_families import FLUX
from helpers import DiT, DiTBlock, T, diffusers_0_42, perturbed, tiny_dit, unet2d
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

import dtr

RATIO, ALPHA = 0.5, 2.0
ORDERS = ["hook first", "wrap first"]


def masks(t, width=32, ratio=RATIO, alpha=ALPHA):
    """(B, 1, C) float64 rows of the paper's windows for index timesteps ``t``."""
    return dtr.task_masks(T, width, ratio, alpha)[t].double()[:, None, :]


def dit64(seed=0, depth=3):
    return tiny_dit(seed, depth=depth).double()


def batch(seed=1, n=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g, dtype=torch.float64)
    return x, torch.tensor([0, 999, 500, 37][:n]), torch.randint(0, 10, (n,), generator=g)


def stream_by_hand(model, x, t, y, upto):
    """The hidden state entering block ``upto`` and the one leaving it, by the formula (float64)."""
    h, c = DiT.embed(model, x, t, y)
    m = masks(t)
    for i, block in enumerate(model.blocks):
        out = DiTBlock.forward(block, m * h, c) + (1 - m) * h
        if i == upto:
            return h, out
        h = out
    raise AssertionError


#################################################################################
#                              Hooks on DiT blocks                               #
#################################################################################


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kind", ["plain", "with_kwargs", "always_call", "global"])
def test_a_forward_hook_on_a_routed_block_receives_the_stream_the_model_passes_on(order, kind):
    model = dit64().eval()
    seen = []

    def hook(module, args, *rest):
        if module is model.blocks[1]:
            seen.append((args[0].clone(), rest[-1].clone()))

    def register():
        if kind == "global":
            return register_module_forward_hook(hook)
        return model.blocks[1].register_forward_hook(
            hook, with_kwargs=kind == "with_kwargs", always_call=kind == "always_call"
        )

    if order == "hook first":
        handle = register()
        dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA)
    else:
        dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA)
        handle = register()
    x, t, y = batch()
    try:
        with torch.no_grad():
            model(x, t, y)
    finally:
        handle.remove()
    ((got_in, got_out),) = seen
    want_in, want_out = stream_by_hand(model, x, t, y, upto=1)
    torch.testing.assert_close(got_in, want_in, rtol=0, atol=1e-12)  # as the model passed it, unmasked
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=1e-12)  # what the next block receives


@pytest.mark.parametrize("order", ORDERS)
def test_pre_hooks_see_the_input_the_model_passed_and_what_they_return_is_routed(order):
    model = dit64().eval()
    seen = []

    def pre_hook(module, args):
        seen.append(args[0].clone())
        return (args[0] * 0.5, *args[1:])  # a new input: routing masks this one

    if order == "hook first":
        model.blocks[0].register_forward_pre_hook(pre_hook)
        dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA)
    else:
        dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA)
        model.blocks[0].register_forward_pre_hook(pre_hook)
    x, t, y = batch()
    with torch.no_grad():
        out = model(x, t, y)
    h, c = DiT.embed(model, x, t, y)
    torch.testing.assert_close(seen[0], h, rtol=0, atol=1e-12)
    m = masks(t)
    h = 0.5 * h
    for block in model.blocks:
        h = DiTBlock.forward(block, m * h, c) + (1 - m) * h
    torch.testing.assert_close(out, model.unpatchify(model.final_layer(h, c)), rtol=0, atol=1e-12)


def test_a_hook_that_returns_an_output_replaces_what_the_model_passes_on_and_children_see_the_masked_input():
    model = dit64().eval()
    dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA)
    inside = []
    model.blocks[0].register_forward_hook(lambda m, a, out: out * 2.0)
    model.blocks[0].norm1.register_forward_pre_hook(lambda m, a: inside.append(a[0].clone()))
    x, t, y = batch()
    with torch.no_grad():
        out = model(x, t, y)
    h, c = DiT.embed(model, x, t, y)
    m = masks(t)
    torch.testing.assert_close(inside[0], m * h, rtol=0, atol=1e-12)  # the block's own layers: the masked input
    for i, block in enumerate(model.blocks):
        h = DiTBlock.forward(block, m * h, c) + (1 - m) * h
        if i == 0:
            h = 2.0 * h
    torch.testing.assert_close(out, model.unpatchify(model.final_layer(h, c)), rtol=0, atol=1e-12)


#################################################################################
#                   A U-Net gate and Flux's dual- and single-stream blocks      #
#################################################################################


def test_a_hook_on_a_gated_unet_norm_sees_the_masked_output():
    model = unet2d().double()
    routing = dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA)
    name = routing.routed[0].name
    norm = model.get_submodule(name)
    seen = []
    norm.register_forward_hook(lambda m, a, out: seen.append((a[0].clone(), out.clone())))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model(torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 999, 500, 37]))
    x, out = seen[0]
    t = torch.tensor([0, 999, 500, 37])
    m = dtr.task_masks(T, norm.num_channels, RATIO, ALPHA)[t].double()[:, :, None, None]
    torch.testing.assert_close(out, m * nn.GroupNorm.forward(norm, x), rtol=0, atol=1e-12)


def flux64():
    model = FLUX.make().double()
    return model


def _flux_call(model, t):
    args, kwargs = FLUX.make_inputs(2, t)
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    kwargs["txt_ids"], kwargs["img_ids"] = kwargs["txt_ids"].float(), kwargs["img_ids"].float()
    with torch.no_grad():
        return model(*args, **kwargs)


@diffusers_0_42()
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("block", ["transformer_blocks.0", "single_transformer_blocks.1"])
def test_hooks_on_flux_blocks_see_the_routed_image_stream_and_the_text_stream_as_computed(order, block):
    model = flux64()
    target = model.get_submodule(block)
    seen = []

    def hook(module, args, kwargs, out):
        seen.append(({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}, out))

    if order == "hook first":
        target.register_forward_hook(hook, with_kwargs=True)
        dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA)
    else:
        dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA)
        target.register_forward_hook(hook, with_kwargs=True)
    t = torch.tensor([0.0, 0.7], dtype=torch.float64)
    _flux_call(model, t)
    ((kwargs, (text, image)),) = seen
    x = kwargs["hidden_states"]
    tasks = torch.round(t * (T - 1)).long()  # Flux's timestep is sigma in [0, 1]
    m = dtr.task_masks(T, x.shape[-1], RATIO, ALPHA)[tasks].double()[:, None, :]
    assert (((1 - m) * x).abs().sum(-1) > 0).all()  # the hook saw the stream unmasked (0.3: m * x)
    with torch.no_grad():
        want_text, want_image = type(target).forward(target, **{**kwargs, "hidden_states": m * x})
    torch.testing.assert_close(text, want_text, rtol=0, atol=1e-12)  # the text stream as the block computes it
    torch.testing.assert_close(image, want_image + (1 - m) * x, rtol=0, atol=1e-12)


#################################################################################
#                        REPA: a projector on a tapped feature                  #
#################################################################################


class Repa(nn.Module):
    """REPA's alignment: a projector on block k's hidden state, tapped by a forward hook, cosine loss against fixed
    target features (a frozen encoder's, here random)."""

    def __init__(self, model: nn.Module, k: int, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.projector = nn.Sequential(nn.Linear(32, 48), nn.SiLU(), nn.Linear(48, 24)).double()
        self.target = torch.randn(4, 16, 24, generator=g, dtype=torch.float64)
        self.features = None
        model.blocks[k].register_forward_hook(lambda m, args, out: setattr(self, "features", out))

    def loss(self) -> torch.Tensor:
        return 1 - F.cosine_similarity(self.projector(self.features), self.target, dim=-1).mean()


def repa_by_hand(model, repa, x, t, y, k):
    """The REPA step by the formula: block k's output of the routed stream, projected; plus the diffusion loss."""
    h, c = DiT.embed(model, x, t, y)
    m = masks(t)
    for i, block in enumerate(model.blocks):
        h = DiTBlock.forward(block, m * h, c) + (1 - m) * h
        if i == k:
            feature = h
    out = model.unpatchify(model.final_layer(h, c))
    align = 1 - F.cosine_similarity(repa.projector(feature), repa.target, dim=-1).mean()
    return out.square().mean() + 0.5 * align, align


def grads_of(loss, modules):
    for module in modules:
        module.zero_grad()
    loss.backward()
    return {
        f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("how", ["eager", "gradient checkpointing", "torch.compile"])
def test_a_repa_training_step_through_a_hook_equals_the_formula(how):
    k = 1
    model, reference = dit64(), dit64()
    model.class_dropout_prob = reference.class_dropout_prob = 0.0
    repa, repa_ref = Repa(model, k), Repa(reference, k)
    repa_ref.projector.load_state_dict(repa.projector.state_dict())
    dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA)
    model.train()
    if how == "gradient checkpointing":
        model.gradient_checkpointing = True
    x, t, y = batch()
    run = torch.compile(model, backend="aot_eager") if how == "torch.compile" else model
    out = run(x, t, y)
    align = repa.loss()
    got = grads_of(out.square().mean() + 0.5 * align, [model, repa.projector])
    want_loss, want_align = repa_by_hand(reference.train(), repa_ref, x, t, y, k)
    want = grads_of(want_loss, [reference, repa_ref.projector])
    torch.testing.assert_close(align, want_align, rtol=0, atol=1e-12)
    assert got.keys() == want.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)


def test_the_repa_features_differ_from_what_the_block_alone_computes():
    """The tap is the stream, not block(m * x): the two differ (0.3 handed hooks the latter, 706 off at 915)."""
    model = perturbed(dit64())
    repa = Repa(model, 1)
    dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA)
    x, t, y = batch()
    with torch.no_grad():
        model(x, t, y)
        h_in, h_out = stream_by_hand(model, x, t, y, upto=1)
        _, c = DiT.embed(model, x, t, y)
        block_alone = DiTBlock.forward(model.blocks[1], masks(t) * h_in, c)
    torch.testing.assert_close(repa.features, h_out, rtol=0, atol=1e-12)
    assert not torch.allclose(repa.features, block_alone, atol=1e-3)
