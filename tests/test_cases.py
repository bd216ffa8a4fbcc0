"""The cases hostile testing of 0.3 found (issue 24), one named test each, and three bugs the 0.3 suite let through.

Each case is checked against the formula ``block(m * x) + (1 - m) * x`` written out here (or against the unrouted
model's own output, or the library the case comes from: diffusers' modular pipeline, a real ``UNet1DModel``,
``FirstBlockCache``, PEFT's ``merge_and_unload``).  Every test here fails on 0.3 (ba2be5b); docs/concepts.md keeps
the matrix.
"""

import copy
import functools
import inspect
import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from helpers import (
    DiT,
    DiTBlock,
    OwnWeight,
    Stack,
    Symmetric,
    T,
    diffusers_0_42,
    dtr_masks,
    inputs,
    reference_forward,
    steady_dit,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

import dtr

RATIO, ALPHA = 0.5, 2.0
TOL = dict(rtol=1e-5, atol=1e-6)


def wrap(model, **kw):
    return dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA, **kw)


def by_hand(model, x, t, y):
    """The routed DiT written out (helpers.reference_forward with this file's ratio and alpha)."""
    return reference_forward(model, x, t, y, dtr_masks(model, RATIO, ALPHA))


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {
        n.replace("._orig_mod", "").replace("._checkpoint_wrapped_module", ""): p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def assert_grads(a, b, **tol):
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], msg=n, **(tol or TOL))


#################################################################################
#        1. Signatures: modular pipelines and torch.export read them            #
#################################################################################


def test_the_signatures_of_a_routed_models_and_blocks_forwards_are_their_own():
    model = steady_dit()
    before = inspect.signature(model.forward), inspect.signature(model.blocks[0].forward)
    wrap(model)
    assert (inspect.signature(model.forward), inspect.signature(model.blocks[0].forward)) == before


@diffusers_0_42()
def test_wan22_modular_denoise_step_passes_what_the_routed_transformer_takes():
    """diffusers' Wan 2.2 denoise step passes the fields the transformer's forward signature names: a routed model
    must show its own (0.3 showed (*args, **kwargs) and lost encoder_hidden_states_image: 0.945 off)."""
    import diffusers
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines.modular_pipeline import BlockState
    from diffusers.modular_pipelines.wan.denoise import Wan22LoopDenoiser
    from diffusers_families import WAN, perturb

    torch.manual_seed(0)
    model = perturb(diffusers.WanTransformer3DModel(**dict(WAN.config, image_dim=12, added_kv_proj_dim=16)))
    wrap(model)
    g = torch.Generator().manual_seed(0)
    x, prompt, image = torch.randn(2, 4, 2, 4, 4, generator=g), torch.randn(2, 6, 32, generator=g), None
    image = torch.randn(2, 5, 12, generator=g)
    components = types.SimpleNamespace(
        config=types.SimpleNamespace(boundary_ratio=0.0),
        num_train_timesteps=1000,
        transformer=model,
        transformer_2=model,
        guider=ClassifierFreeGuidance(guidance_scale=1.0),
        guider_2=ClassifierFreeGuidance(guidance_scale=1.0),
    )
    state = BlockState(
        latent_model_input=x,
        dtype=torch.float32,
        attention_kwargs=None,
        num_inference_steps=1,
        prompt_embeds=prompt,
        negative_prompt_embeds=prompt,
        denoiser_input_fields={"encoder_hidden_states_image": image},
    )
    Wan22LoopDenoiser()(components, state, 0, torch.tensor(700.0))
    with torch.no_grad():
        direct = model(
            hidden_states=x,
            timestep=torch.full((2,), 700.0),
            encoder_hidden_states=prompt,
            encoder_hidden_states_image=image,
            return_dict=False,
        )[0]
    torch.testing.assert_close(state.noise_pred, direct, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["a tuple per argument", "a dict by argument name"])
def test_torch_export_with_dynamic_batch_equals_eager_at_another_batch_size(how):
    model = steady_dit().eval()
    wrap(model)
    x, t, y = inputs(batch=4)
    batch = torch.export.Dim("batch", min=2, max=16)
    shapes = ({0: batch},) * 3 if how == "a tuple per argument" else {"x": {0: batch}, "t": {0: batch}, "y": {0: batch}}
    exported = torch.export.export(model, (x, t, y), dynamic_shapes=shapes)
    x6, t6, y6 = inputs(batch=6)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x6, t6, y6), by_hand(model, x6, t6, y6), **TOL)


#################################################################################
#              2. One checkpoint region around several model calls              #
#################################################################################


def test_one_checkpoint_region_around_two_calls_of_the_model_has_exact_gradients():
    model, reference = steady_dit().train(), steady_dit().train()
    wrap(model)
    x, t1, y = inputs(batch=4)
    t2 = torch.tensor([999, 3, 640, 100])
    xa = x.clone().requires_grad_()
    loss = checkpoint(lambda a: model(a, t1, y).sum() + model(a, t2, y).sum(), xa, use_reentrant=False)
    got = grads(model, loss)
    xb = x.clone().requires_grad_()
    want = grads(reference, by_hand(reference, xb, t1, y).sum() + by_hand(reference, xb, t2, y).sum())
    assert_grads(got, want)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)


class SelfConditioning(DiT):
    """A model that calls itself on its own first estimate, at another timestep (self-conditioning)."""

    def forward(self, x, t, y):
        first = DiT.forward(self, x, t, y)
        return self.inner(x + 0.1 * first[:, : self.in_channels], torch.clamp(t + 100, max=999), y)

    def inner(self, x, t, y):
        return self.forward_plain(x, t, y)

    def forward_plain(self, x, t, y):
        return DiT.forward(self, x, t, y)


class CallsItself(DiT):
    """forward calls the model again (``self(...)``): a nested call with its own timesteps."""

    def forward(self, x, t, y):
        if getattr(self, "_nested", False):
            return DiT.forward(self, x, t, y)
        self._nested = True
        try:
            first = self(x, torch.clamp(t + 100, max=999), y)
        finally:
            self._nested = False
        return DiT.forward(self, x + 0.1 * first[:, : self.in_channels], t, y)


def test_a_model_that_calls_itself_checkpointed_whole_has_exact_gradients():
    model = CallsItself(depth=2)
    model.load_state_dict(steady_dit().state_dict())
    model.class_dropout_prob = 0.0
    reference = steady_dit().train()
    wrap(model)
    model.train()
    x, t, y = inputs(batch=4)
    got = grads(model, checkpoint(model, x, t, y, use_reentrant=False).square().mean())
    first = by_hand(reference, x, torch.clamp(t + 100, max=999), y)
    want = grads(reference, by_hand(reference, x + 0.1 * first[:, :4], t, y).square().mean())
    assert_grads(got, want)


#################################################################################
#            4-6. Where a block's channels and samples are; __call__            #
#################################################################################


@diffusers_0_42()
def test_unet1d_res_conv_blocks_route_their_channels():
    """diffusers' UNet1DModel ResConvBlock on (B, C, L): masked along C (0.3 masked along L: 3.49 off)."""
    from diffusers import UNet1DModel

    torch.manual_seed(0)
    model = UNet1DModel(
        sample_size=16,
        in_channels=2,
        out_channels=2,
        extra_in_channels=64,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
        up_block_types=("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"),
        mid_block_type="UNetMidBlock1D",
        use_timestep_embedding=False,
        flip_sin_to_cos=False,
        downsample_each_block=False,
    ).eval()
    plain = copy.deepcopy(model)
    chosen = lambda name, m: type(m).__name__ == "ResConvBlock" and not m.has_conv_skip  # noqa: E731
    routing = wrap(model, blocks=chosen)
    assert len(routing.routed) >= 4
    names = [r.name for r in routing.routed]
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 2, 64, generator=g), torch.tensor([10, 900])

    class OnChannels(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, h):
            m = dtr.task_masks(T, h.shape[1], RATIO, ALPHA)[t].float()[:, :, None]
            return self.inner(m * h) + (1 - m) * h

    for name in names:
        parent, _, attr = name.rpartition(".")
        holder = plain.get_submodule(parent)
        if isinstance(holder, nn.ModuleList):
            holder[int(attr)] = OnChannels(holder[int(attr)])
        else:
            setattr(holder, attr, OnChannels(getattr(holder, attr)))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t).sample, plain(x, t).sample, **TOL)


class SequenceFirst(nn.Module):
    """nn.TransformerEncoderLayer with batch_first=False: the stream is (tokens, batch, channels)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            [nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=False) for _ in range(2)]
        )

    def forward(self, x, t):
        for block in self.blocks:
            x = block(x)
        return x


def test_sequence_first_blocks_route_each_sample_by_its_own_task():
    """(N, B, C) with N == B: 0.3 masked each token by a sample's task (0.97 off); N != B blamed the timesteps."""
    model = SequenceFirst().eval()
    wrap(model, blocks=r"blocks\.\d")
    t = torch.tensor([0, 999, 400])
    for tokens in (3, 5):
        x = torch.randn(tokens, 3, 16)
        m = dtr.task_masks(T, 16, RATIO, ALPHA)[t].float()[None]  # (1, B, C): every token of sample b
        h = x
        for block in model.blocks:
            h = nn.TransformerEncoderLayer.forward(block, m * h) + (1 - m) * h
        with torch.no_grad():
            torch.testing.assert_close(model(x, t), h, **TOL)


class CallsForward(DiTBlock):
    """A block whose __call__ calls self.forward (some code bases do, skipping nn.Module.__call__)."""

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


def test_a_block_whose_call_calls_forward_is_routed():
    model = steady_dit()
    reference = steady_dit()
    for i, block in enumerate(model.blocks):
        own = CallsForward(32, 4)
        own.load_state_dict(block.state_dict())
        model.blocks[i] = own
    wrap(model)
    x, t, y = inputs(batch=4)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, t, y), by_hand(reference.eval(), x, t, y), **TOL)


#################################################################################
#                   7. parametrize removed from a routed module                  #
#################################################################################


@pytest.mark.parametrize("order", ["parametrize first", "wrap first"])
@pytest.mark.parametrize("leave_parametrized", [True, False])
def test_remove_parametrizations_on_a_routed_block_works(order, leave_parametrized):
    """0.3 refused it after rewriting the weight (0.527 off), and its advice gave 4 W0 for 2 W0."""
    model = Stack()
    w0 = model.blocks[0].weight.detach().clone()
    if order == "parametrize first":
        parametrize.register_parametrization(model.blocks[0], "weight", Symmetric())
        wrap(model, blocks=r"blocks\.\d")
    else:
        wrap(model, blocks=r"blocks\.\d")
        parametrize.register_parametrization(model.blocks[0], "weight", Symmetric())
    parametrize.remove_parametrizations(model.blocks[0], "weight", leave_parametrized=leave_parametrized)
    want = (w0 + w0.T) / 2 if leave_parametrized else w0
    torch.testing.assert_close(model.blocks[0].weight, want, rtol=0, atol=0)
    assert type(model.blocks[0]) is OwnWeight
    x, t = torch.randn(3, 5, 16), torch.tensor([0, 999, 500])
    m = dtr.task_masks(T, 16, RATIO, ALPHA)[t].float()[:, None, :]
    h = x
    for block in model.blocks:
        h = OwnWeight.forward(block, m * h) + (1 - m) * h
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), h, **TOL)


#################################################################################
#               8. Code that keys on the exact class of a module                 #
#################################################################################


def flux():
    from diffusers_families import FLUX

    return FLUX


@diffusers_0_42()
@pytest.mark.parametrize("order", ["cache first", "wrap first"])
def test_first_block_cache_at_threshold_zero_equals_the_uncached_routed_model(order):
    """diffusers' cache hooks look block classes up in a registry keyed by class (0.3: 'not registered')."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    family = flux()
    model, plain = family.make(), family.make()

    def cache(m):
        apply_first_block_cache(m, FirstBlockCacheConfig(threshold=0.0))

    if order == "cache first":
        cache(model)
        wrap(model)
    else:
        wrap(model)
        cache(model)
    wrap(plain)
    with torch.no_grad():
        for t in ([0.9, 0.8], [0.6, 0.5], [0.3, 0.2]):  # sampling steps: the cache would skip blocks above 0
            args, kwargs = family.make_inputs(2, torch.tensor(t))
            with model.cache_context("cond"):
                cached = model(*args, **kwargs)[0]
            torch.testing.assert_close(cached, plain(*args, **kwargs)[0], rtol=0, atol=0)


@diffusers_0_42()
@pytest.mark.parametrize("cache", ["MagCache (calibrating)", "TaylorSeer (not caching yet)"])
def test_cache_hooks_keyed_by_block_class_run_on_a_routed_model(cache):
    from diffusers.hooks import MagCacheConfig, TaylorSeerCacheConfig, apply_mag_cache, apply_taylorseer_cache

    family = flux()
    model, plain = family.make(), family.make()
    wrap(model)
    wrap(plain)
    if cache.startswith("MagCache"):
        apply_mag_cache(model, MagCacheConfig(calibrate=True, num_inference_steps=3))
    else:
        apply_taylorseer_cache(model, TaylorSeerCacheConfig(disable_cache_before_step=10))
    with torch.no_grad():
        for t in ([0.9, 0.8], [0.6, 0.5], [0.3, 0.2]):
            args, kwargs = family.make_inputs(2, torch.tensor(t))
            with model.cache_context("cond"):
                cached = model(*args, **kwargs)[0]
            torch.testing.assert_close(cached, plain(*args, **kwargs)[0], rtol=0, atol=0)


@diffusers_0_42()
def test_layer_skip_finds_the_routed_blocks_by_their_class():
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip

    family = flux()
    model = family.make()
    wrap(model)
    apply_layer_skip(model, LayerSkipConfig(indices=[1], fqn="single_transformer_blocks"))
    t = torch.tensor([0.2, 0.9])
    args, kwargs = family.make_inputs(2, t)
    with torch.no_grad(), model.cache_context("cond"):
        out = model(*args, **kwargs)[0]
    assert torch.isfinite(out).all()


class Gated(nn.Module):
    """Ten linear layers, two of them routed as gates (m * linear(x))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(10)])

    def forward(self, x, t):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_quantize_dynamic_quantizes_routed_linears_and_they_stay_routed():
    """torch.ao keys its mapping on type(module): 0.3's routed subclasses were skipped (8 of 10 quantized)."""
    model = Gated().eval()
    reference = copy.deepcopy(model)
    dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA, blocks=["layers.3", "layers.7"], placement="gate")
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)  # a routed copy
    assert all("quantized" in type(layer).__module__ for layer in quantized.layers)  # all 10
    qref = torch.ao.quantization.quantize_dynamic(reference, {nn.Linear}, dtype=torch.qint8)
    x, t = torch.randn(3, 16), torch.tensor([0, 999, 400])
    m = dtr.task_masks(T, 16, RATIO, ALPHA)[t].float()
    h = x
    for i, layer in enumerate(qref.layers):
        h = torch.tanh(layer(h) * m if i in (3, 7) else layer(h))
    with torch.no_grad():
        torch.testing.assert_close(quantized(x, t), h, **TOL)
    dtr.unwrap(quantized)  # the quantized layers are unrouted again
    with torch.no_grad():
        torch.testing.assert_close(quantized(x, t), qref(x, t), rtol=0, atol=0)


#################################################################################
#                    9. Copies of wrappers keep the wrapper                      #
#################################################################################


def test_deepcopy_of_a_routed_peft_model_is_a_peft_model_and_merges():
    peft = pytest.importorskip("peft")
    model = steady_dit()
    wrap(model)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["qkv", "proj"], init_lora_weights=False))
    for kind in (lora, lora.base_model):
        copied = copy.deepcopy(kind)
        assert type(copied) is type(kind)
    ema = copy.deepcopy(lora)
    merged = ema.merge_and_unload()
    assert dtr.routing_of(merged) is not None
    x, t, y = inputs(batch=4)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x, t, y), lora.eval()(x, t, y), rtol=1e-4, atol=1e-5)


def test_deepcopy_of_a_compiled_routed_model_is_a_compiled_module():
    model = steady_dit()
    wrap(model)
    compiled = torch.compile(model, backend="eager")
    copied = copy.deepcopy(compiled)
    assert type(copied) is type(compiled) and dtr.routing_of(copied) is not None


#################################################################################
#                     10. Checkpointing forms, in backward                       #
#################################################################################


class NestedRegions(DiT):
    """A region around the blocks, and inside it one region per block."""

    def forward(self, x, t, y):
        h, c = self.embed(x, t, y)

        def blocks(h):
            for block in self.blocks:
                h = checkpoint(block, h, c, use_reentrant=False)
            return h

        h = checkpoint(blocks, h, use_reentrant=False)
        return self.unpatchify(self.final_layer(h, c))


class NoGradInside(DiT):
    """A region whose first part runs without autograd (a frozen stem), then the blocks."""

    def forward(self, x, t, y):
        h, c = self.embed(x, t, y)

        def region(h):
            with torch.no_grad():
                h = self.blocks[0](h, c)
            return self.blocks[1](h, c)

        h = checkpoint(region, h, use_reentrant=False)
        return self.unpatchify(self.final_layer(h, c))


def selective(model):
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE

    def run_block(block, h, c):
        return checkpoint(
            block,
            h,
            c,
            use_reentrant=False,
            context_fn=lambda: create_selective_checkpoint_contexts(policy),
        )

    model.run_block = run_block
    model.gradient_checkpointing = True
    return model


def compiled_blocks(model):
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(block, backend="aot_eager")
    model.gradient_checkpointing = True
    return model


@pytest.mark.parametrize("form", ["nested regions", "selective checkpointing", "a no_grad part", "compiled blocks"])
def test_checkpointing_forms_have_the_gradients_of_the_formula(form):
    cls = {"nested regions": NestedRegions, "a no_grad part": NoGradInside}.get(form, DiT)
    model = cls(depth=2)
    model.load_state_dict(steady_dit().state_dict())
    model.class_dropout_prob = 0.0
    if form == "selective checkpointing":
        selective(model)
    wrap(model)
    if form == "compiled blocks":
        compiled_blocks(model)
    model.train()
    x, t, y = inputs(batch=4)
    got = grads(model, model(x, t, y).square().mean())
    reference = steady_dit().train()
    if form == "a no_grad part":
        h, c = DiT.embed(reference, x, t, y)
        m = dtr.task_masks(T, 32, RATIO, ALPHA)[t].float()[:, None, :]
        with torch.no_grad():
            h = DiTBlock.forward(reference.blocks[0], m * h, c) + (1 - m) * h
        h = DiTBlock.forward(reference.blocks[1], m * h, c) + (1 - m) * h
        want = grads(reference, reference.unpatchify(reference.final_layer(h, c)).square().mean())
    else:
        want = grads(reference, by_hand(reference, x, t, y).square().mean())
    assert_grads(got, want)


#################################################################################
#                       11. torch.compile(dynamic=True)                          #
#################################################################################


def test_compile_dynamic_adds_no_graph_and_equals_eager_at_two_batch_sizes():
    torch._dynamo.reset()
    model, plain = steady_dit().eval(), steady_dit().eval()
    wrap(model)
    x, t, y = inputs(batch=4)
    unrouted = torch._dynamo.explain(torch.compile(plain, dynamic=True, backend="eager"))(x, t, y)
    routed = torch._dynamo.explain(torch.compile(model, dynamic=True, backend="eager"))(x, t, y)
    assert (routed.graph_count, routed.graph_break_count) == (unrouted.graph_count, unrouted.graph_break_count)
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="aot_eager")
    for n in (4, 6):
        x, t, y = inputs(batch=n)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, t, y), by_hand(model, x, t, y), **TOL)


#################################################################################
#                   12. vmap over per-sample timesteps                           #
#################################################################################


def test_per_sample_gradients_with_vmap_over_each_samples_timestep():
    from torch.func import functional_call, grad, vmap

    model = steady_dit().double().eval()
    wrap(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, t, y = inputs(batch=4)
    x = x.double()

    def loss(p, xi, ti, yi):
        return functional_call(model, p, (xi[None], ti[None], yi[None])).square().mean()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x, t, y)
    reference = steady_dit().double().eval()
    for i in range(4):
        want = grads(reference, by_hand(reference, x[i : i + 1], t[i : i + 1], y[i : i + 1]).square().mean())
        for name in want:
            torch.testing.assert_close(per_sample[name][i], want[name], rtol=1e-9, atol=1e-12, msg=name)


#################################################################################
#                        13. Orphans and shallow copies                          #
#################################################################################


def test_a_block_saved_alone_loads_as_a_plain_block_that_wrap_and_unwrap_accept(tmp_path):
    """0.3: a block torch.save'd alone could be run by no model, unwrapped ('not routed') nor wrapped ('already')."""
    model = steady_dit()
    wrap(model)
    torch.save(model.blocks[0], tmp_path / "block.pt")
    block = torch.load(tmp_path / "block.pt", weights_only=False)
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(h, c), DiTBlock.forward(block, h, c), rtol=0, atol=0)
    assert dtr.routing_of(block) is None
    dtr.unwrap(block)  # takes the leftover away
    holder = steady_dit(seed=3)
    holder.blocks[0] = torch.load(tmp_path / "block.pt", weights_only=False)
    wrap(holder)
    x, t, y = inputs(batch=4)
    with torch.no_grad():
        torch.testing.assert_close(holder.eval()(x, t, y), by_hand(holder, x, t, y), **TOL)


def test_unwrapping_a_shallow_copy_says_what_to_do_and_leaves_the_original_routed():
    model = steady_dit().eval()
    routing = wrap(model)
    shallow = copy.copy(model)
    with pytest.raises(ValueError, match=r"shallow copy \(copy.copy\).*Unwrap that one.*copy.deepcopy"):
        dtr.unwrap(shallow)
    assert dtr.routing_of(model) is routing and routing.active
    x, t, y = inputs(batch=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), by_hand(model, x, t, y), **TOL)


def test_a_deepcopy_of_a_parent_that_holds_a_block_before_the_model_is_routed():
    """0.3 copied the block first as a plain block, then refused the copied model ('replaced')."""
    model = steady_dit().eval()
    wrap(model)
    parent = {"ema_block": model.blocks[1], "model": model}  # the block comes first in copy order
    copied = copy.deepcopy(parent)
    assert copied["ema_block"] is copied["model"].blocks[1]
    x, t, y = inputs(batch=4)
    with torch.no_grad():
        torch.testing.assert_close(copied["model"](x, t, y), by_hand(model, x, t, y), **TOL)


#################################################################################
#                               14. Families                                     #
#################################################################################


@diffusers_0_42()
def test_a_unet_subclass_with_resnet_classes_of_its_own_routes_them_by_role():
    """DreamLite's UNet2DConditionModel subclass: 0.3 found 0 modules (and saved blocks: [])."""
    pytest.importorskip("diffusers.models.unets.unet_dreamlite")
    from diffusers.models.unets.unet_dreamlite import DreamLiteUNetModel

    torch.manual_seed(0)
    model = DreamLiteUNetModel(
        sample_size=8,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=8,
        num_kv_heads=1,
        addition_embed_type_num_heads=2,
    ).eval()
    routing = dtr.wrap(model)
    resnets = [n for n, m in model.named_modules() if type(m).__name__ == "ResnetBlock2DDreamLite"]
    routed = {r.name for r in routing.routed}
    assert resnets and all(f"{n}.norm2" in routed for n in resnets)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]), encoder_hidden_states=ctx).sample
        dtr.unwrap(model)
        assert not torch.allclose(out, model(x, torch.tensor([0, 999]), encoder_hidden_states=ctx).sample, atol=1e-4)


def test_wrap_never_routes_nothing():
    """An adapter that recognises a model but finds no module in it (0.3 wrapped such a model with 0 modules and saved
    blocks: [], which dtr.from_pretrained then refused)."""

    class Empty(nn.Module):
        def forward(self, x, t):
            return x

    def finds_nothing(model):
        return dtr.RoutingSpec(blocks=(), timestep_arg="t", adapter="empty") if isinstance(model, Empty) else None

    dtr.register_adapter(finds_nothing)
    try:
        with pytest.raises(ValueError, match="found no module to route in this Empty"):
            dtr.wrap(Empty())
    finally:
        dtr.adapters._adapters.remove(finds_nothing)


@diffusers_0_42()
def test_sana_wm_is_refused_by_name():
    from diffusers.models.transformers.transformer_sana_wm import SanaWMTransformer3DModel

    model = SanaWMTransformer3DModel.__new__(SanaWMTransformer3DModel)
    nn.Module.__init__(model)
    for part in ("x_embedder", "t_embedder", "final_layer"):
        setattr(model, part, nn.Identity())
    model.blocks = nn.ModuleList([nn.Linear(4, 4)])
    with pytest.raises(ValueError, match="dtr does not route a SanaWMTransformer3DModel by default: .*per frame"):
        dtr.wrap(model)


#################################################################################
#                              15. Messages                                      #
#################################################################################


def test_a_timestep_module_that_is_a_routed_block_is_named_as_such():
    model = steady_dit()
    with pytest.raises(ValueError, match="'blocks.0' would be both a residual module and the timestep module"):
        dtr.wrap(model, timestep_module="blocks.0")


def test_an_interrupt_at_any_bytecode_of_a_routed_call_leaves_no_call_open():
    """KeyboardInterrupt raised at every opcode dtr's code runs in one call (sys.settrace): no call is left open
    (0.3: 9 of 700 positions)."""
    import dtr as package

    src = package.__file__.rsplit("/", 1)[0]
    model = steady_dit(depth=1)
    routing = wrap(model)
    x, t, y = inputs(batch=2)

    def run(stop_at):
        count = [0]

        def local(frame, event, arg):
            if event == "opcode":
                count[0] += 1
                if count[0] == stop_at:
                    raise KeyboardInterrupt
            return local

        def tracer(frame, event, arg):
            if frame.f_code.co_filename.startswith(src):
                frame.f_trace_opcodes = True
                return local
            return None

        sys.settrace(tracer)
        try:
            with torch.no_grad():
                model(x, t, y)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        return count[0]

    positions = run(-1)
    assert positions > 300
    left_open = [n for n in range(1, positions + 1) if run(n) is not None and routing.current_tasks() is not None]
    assert left_open == []
    with torch.no_grad():  # and the model routes as before
        torch.testing.assert_close(model.eval()(x, t, y), by_hand(model, x, t, y), **TOL)


#################################################################################
#                   Found by the composition fuzzer (tests/test_fuzz_...)        #
#################################################################################


class GraphBreak(DiT):
    """A forward with a graph break between its blocks (FSDP2's hooks make one; so does a print)."""

    def forward(self, x, t, y):
        h, c = self.embed(x, t, y)
        h = self.blocks[0](h, c)
        torch._dynamo.graph_break()
        for block in self.blocks[1:]:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


def test_a_graph_break_inside_a_compiled_routed_models_forward():
    """Fuzz program (tokens): wrap -> fsdp2 -> torch.compile.  After a graph break TorchDynamo rebuilt the bound
    forward routing hands the model as ``model.forward``, routing's own: an endless recursion."""
    torch._dynamo.reset()
    model = GraphBreak(depth=2)
    model.load_state_dict(steady_dit().state_dict())
    model.class_dropout_prob = 0.0
    wrap(model)
    x, t, y = inputs(batch=4)
    compiled = torch.compile(model.eval(), backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), by_hand(steady_dit().eval(), x, t, y), **TOL)


def hook_blocks(model, append=False):
    """An accelerate ``ModelHook`` on every block (``append=True``: chained to the one already there)."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    for block in model.blocks:
        add_hook_to_module(block, ModelHook(), append=append)
    return model


def test_accelerate_hooks_appended_after_wrap_keep_the_block_routed():
    """Fuzz program (tokens): accelerate hook -> wrap -> accelerate hook.  add_hook_to_module(append=True) removes
    the hook it finds (putting back the forward it found, from under routing's) and wraps both around the module's
    own forward: the block is routed again around them (0.4 first refused it as a forward replaced after wrap)."""
    model = steady_dit().eval()
    hook_blocks(model)
    wrap(model)
    hook_blocks(model, append=True)
    x, t, y = inputs(batch=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), by_hand(steady_dit().eval(), x, t, y), **TOL)


def test_accelerate_hooks_appended_after_wrap_over_a_class_patch_keep_the_block_routed():
    """Fuzz program (tokens, seed 20): accelerate hook -> class patch -> wrap -> accelerate hook.  The first hook
    kept the block's bound forward from before the class patch; appending a hook puts that one back and wraps the
    new hooks around it: the block is routed again around them (0.4 looked only for the class's forward as it is
    now, and refused the block as replaced)."""
    model = steady_dit().eval()
    hook_blocks(model)
    cls = type(model.blocks[0])
    original = cls.forward

    def patched(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    cls.forward = patched
    try:
        wrap(model)
        hook_blocks(model, append=True)
        x, t, y = inputs(batch=4)
        with torch.no_grad():
            torch.testing.assert_close(model(x, t, y), by_hand(steady_dit().eval(), x, t, y), **TOL)
        dtr.unwrap(model)
        with torch.no_grad():
            torch.testing.assert_close(model(x, t, y), steady_dit().eval()(x, t, y), **TOL)
    finally:
        cls.forward = original


def test_accelerate_hooks_appended_after_the_routed_model_was_compiled():
    """Fuzz program (tokens, seed 24): accelerate hook -> wrap -> torch.compile -> accelerate hook.  Silently wrong
    in 0.4 before this test (3.3 off): the compiled model's entry did not route again a block whose forward was put
    back from under routing's (only eager calls did), so the recompiled model ran the block unrouted."""
    model = steady_dit().eval()
    hook_blocks(model)
    wrap(model)
    compiled = torch.compile(model, backend="aot_eager")  # accelerate's SequentialHook: no fullgraph, routed or not
    x, t, y = inputs(batch=4)
    want = by_hand(steady_dit().eval(), x, t, y)
    try:
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, t, y), want, **TOL)
            hook_blocks(model, append=True)
            torch.testing.assert_close(compiled(x, t, y), want, **TOL)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("fullgraph", [False, True])
def test_a_forward_put_back_after_compiling_is_routed_again(fullgraph):
    """A wrapper set as a block's forward before wrap and removed after the model was compiled (as a hook removed
    would): the compiled model's entry routes the block again, from eager code (one graph break, in that trace);
    under fullgraph=True that call is refused saying what to do, and after one eager call the graph is whole."""
    model = steady_dit().eval()
    for block in model.blocks:
        block.forward = functools.wraps(type(block).forward)(functools.partial(type(block).forward, block))
    wrap(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
    x, t, y = inputs(batch=4)
    want = by_hand(steady_dit().eval(), x, t, y)
    try:
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, t, y), want, **TOL)
            for block in model.blocks:
                del block.forward  # routing's, with the wrapper inside: the block's class forward shows again
            if fullgraph:
                # refused loudly, with routing's reason where torch shows it (2.14; 2.8 names its disable)
                with pytest.raises(Exception, match="call the model once without compiling first|marked as skipped"):
                    compiled(x, t, y)
                torch.testing.assert_close(model(x, t, y), want, **TOL)
            torch.testing.assert_close(compiled(x, t, y), want, **TOL)
        assert all(block.__dict__.get("_dtr_behaviour") is block.__dict__["forward"] for block in model.blocks)
    finally:
        torch._dynamo.reset()


class NormConv(nn.Module):
    """x + conv(silu(norm(x))): the ADM placement routes its norm (a child)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(4, 16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return x + self.conv(F.silu(self.norm(x)))


class NormConvStack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([NormConv(), NormConv()])

    def forward(self, x, t):
        for block in self.blocks:
            x = block(x)
        return x


def test_a_checkpoint_wrapper_put_around_the_parent_of_a_routed_gate_after_wrap():
    """Fuzz program (conv): wrap -> checkpointing[wrapper].  The routed norm moved one level down, inside the
    wrapper around its block: 0.4 first refused it as removed."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model, reference = NormConvStack().double(), NormConvStack().double()
    dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA, blocks=r"blocks\.\d\.norm", placement="gate")
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, NormConv))
    x, t = torch.randn(2, 16, 5, 5, dtype=torch.float64), torch.tensor([0, 999])
    got = grads(model, model(x, t).square().mean())
    m = dtr.task_masks(T, 16, RATIO, ALPHA)[t].double()[:, :, None, None]
    h = x
    for block in reference.blocks:
        h = h + block.conv(F.silu(m * block.norm(h)))
    assert_grads(got, grads(reference, h.square().mean()), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("compiled_block", [False, True])
def test_three_nested_checkpoint_regions(compiled_block):
    """Fuzz programs (tokens): wrap -> checkpointing[wrapper] -> checkpointing[nested] (and with a block compiled
    on its own).  A region opened in the recomputation of one opened in the recomputation of a third inherits the
    outermost's call: 0.4 first looked one level up only ('ran without a timestep')."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model = NestedRegions(depth=2)
    model.load_state_dict(steady_dit().state_dict())
    model.class_dropout_prob = 0.0
    wrap(model)
    if compiled_block:
        model.blocks[0].compile(backend="aot_eager")
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, DiTBlock))
    model.train()
    x, t, y = inputs(batch=4)
    reference = steady_dit().train()
    assert_grads(
        grads(model, model(x, t, y).square().mean()), grads(reference, by_hand(reference, x, t, y).square().mean())
    )


def test_a_block_compiled_on_its_own_after_the_model_was_compiled_whole_inside_checkpointing():
    """Fuzz program (tokens, seed 24): wrap -> forward hook -> checkpointing[per block] -> torch.compile ->
    torch.compile[block by block].  A hook that writes (a side effect in the region) breaks the whole model's graph at
    the checkpoint, so the block runs its own graph from eager code, inside the region; only an eager model call put
    its CompiledEntry in front, so the region recorded no call and the recomputation 'ran without a timestep'.  The
    compiled model's entry puts it there too (a side effect TorchDynamo replays; fullgraph=True still holds)."""
    model = steady_dit()
    wrap(model)
    seen = {}

    def by_hand_stream(x, t, y):  # the stream leaving block 0, by the formula
        plain = steady_dit().train()
        h, c = DiT.embed(plain, x, t, y)
        m = dtr_masks(plain, RATIO, ALPHA)[0][t].to(h.dtype)[:, None, :]
        return DiTBlock.forward(plain.blocks[0], m * h, c) + (1 - m) * h

    def tap(module, args, out):  # REPA-style: keeps the first stream it sees
        if "out" not in seen:
            seen["out"] = out.detach().clone()
        return out * 1.0

    model.blocks[0].register_forward_hook(tap)
    model.gradient_checkpointing = True
    model.train()
    compiled = torch.compile(model, backend="aot_eager")
    x, t, y = inputs(batch=4)
    reference = steady_dit().train()
    want = grads(reference, by_hand(reference, x, t, y).square().mean())
    try:
        assert_grads(grads(model, compiled(x, t, y).square().mean()), want)
        model.blocks[0].compile(backend="aot_eager")
        seen.clear()  # the hook writes again: a side effect in the region, which breaks the model's graph there
        assert_grads(grads(model, compiled(x, t, y).square().mean()), want)
        torch.testing.assert_close(seen["out"], by_hand_stream(x, t, y), **TOL)
    finally:
        torch._dynamo.reset()


def test_blocks_compiled_on_their_own_then_the_model_with_fullgraph():
    """The compiled entry put in place from a compiled model's entry (above) is a side effect, not a graph break:
    blocks compiled first, then the whole model with fullgraph=True, equals the formula, outputs and gradients."""
    model = steady_dit().train()
    wrap(model)
    for block in model.blocks:
        block.compile(backend="aot_eager")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, t, y = inputs(batch=4)
    reference = steady_dit().train()
    try:
        got = grads(model, compiled(x, t, y).square().mean())
        assert all(type(b.__dict__["_compiled_call_impl"]).__name__ == "CompiledEntry" for b in model.blocks)
        assert_grads(got, grads(reference, by_hand(reference, x, t, y).square().mean()))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, t, y), by_hand(reference, x, t, y), **TOL)
    finally:
        torch._dynamo.reset()


#################################################################################
#                Three bugs the 0.3 suite let through (planted)                  #
#################################################################################


def test_unwrap_gives_back_the_instance_forward_it_found():
    """Checked on the module's __dict__, not only on outputs: the forward accelerate put there is back, itself."""
    model = steady_dit()
    hook_blocks(model)
    before = [dict(block.__dict__) for block in model.blocks]
    routing = wrap(model)
    assert all(block.__dict__["forward"] is not b["forward"] for block, b in zip(model.blocks, before))
    routing.remove()
    for block, b in zip(model.blocks, before):
        assert block.__dict__.keys() == b.keys()
        assert all(block.__dict__[k] is b[k] for k in b), [k for k in b if block.__dict__[k] is not b[k]]


class Res(nn.Module):
    def __init__(self, device=None):
        super().__init__()
        self.lin = nn.Linear(8, 8, device=device)

    def forward(self, x):
        return x + self.lin(x)


class TwoDevices(nn.Module):
    """Model parallelism: one routed block on the CPU, one on the meta device, in one call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Res(), Res(device="meta")])

    def forward(self, x, t):
        h = self.blocks[0](x)
        self.first = h
        return self.blocks[1](h.to("meta"))


def test_masks_of_one_call_are_kept_per_device():
    model = TwoDevices()
    dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA, blocks=r"blocks\.\d")
    x, t = torch.randn(3, 5, 8), torch.tensor([0, 999, 400])
    with torch.no_grad():
        out = model(x, t)
    assert out.device.type == "meta" and out.shape == (3, 5, 8)
    m = dtr.task_masks(T, 8, RATIO, ALPHA)[t].float()[:, None, :]
    with torch.no_grad():
        torch.testing.assert_close(model.first, Res.forward(model.blocks[0], m * x) + (1 - m) * x, **TOL)


def test_a_direct_forward_inside_a_call_of_the_same_model_routes_by_its_own_timesteps():
    model = steady_dit().eval()
    wrap(model)
    x, t, y = inputs(batch=4)
    t_inner = torch.tensor([999, 998, 997, 996])
    seen = []

    def hook(module, args):
        if not seen:
            seen.append(None)
            seen.append(model.forward(x, t_inner, y))  # a direct forward call, inside the outer call

    handle = model.blocks[0].register_forward_pre_hook(hook)
    with torch.no_grad():
        model(x, t, y)
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(seen[1], by_hand(model, x, t_inner, y), **TOL)


def test_the_whole_model_pickles_with_its_routing_and_a_0_3_pickle_says_how_to_carry_it_over(tmp_path):
    model = steady_dit().eval()
    wrap(model)
    loaded = pickle.loads(pickle.dumps(model))
    x, t, y = inputs(batch=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), by_hand(model, x, t, y), **TOL)

    class Reduces:
        def __reduce__(self):
            from dtr import mechanism

            return mechanism._new_routed, (nn.Linear, False)

    with pytest.raises(RuntimeError, match="pickled whole by dtr 0.3.*save model.state_dict"):
        pickle.loads(pickle.dumps(Reduces()))
