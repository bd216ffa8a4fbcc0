"""A fuzzer that stacks the systems users combine with routing, in random orders, and checks every result against
the formula (issue 24: so that the suite, not a user, finds the next combination that breaks).

Hypothesis draws a model (a token DiT, a channels-first U-Net block stack, an MMDiT joint-block stack with two
streams, a transformer with one timestep per token) and a program of 2-7 steps: systems put on the same modules
(forward hooks and pre-hooks that return new tensors, with and without kwargs; accelerate hooks; a class patch of
the block's forward; parametrize; checkpointing in five forms, regions around two model calls and nested regions
among them; torch.compile with aot_eager, whole or block by block; torch.func grad; deepcopy, pickle, copy.copy;
PEFT LoRA; DDP and FSDP2 of world size 1) and dtr.wrap / dtr.unwrap at random points.  After every step the model
is called and its output and every gradient are compared, in float64, with the formula ``block(m * x) + (1 - m) *
x`` written out on plain tensors here (or with the unrouted model, when unwrapped); the hooks check that they see
the stream the model passes on.  Every system is chosen to leave values unchanged (hooks return ``out * 1.0``,
LoRA starts at zero, parametrize is the identity), so the reference needs no model of the system, only of
routing.  A step that dtr refuses must leave the model exactly as it was.

CI runs a fixed budget (derandomized, at most 90 s on 2 cores); ``DTR_FUZZ_EXAMPLES=2000`` runs longer, and
``DTR_FUZZ_SEED=<n>`` draws other programs.  A failure prints its program (the model and the steps): write it as a
named test in tests/test_cases.py, fix it, and keep the test (docs/concepts.md, "The fuzzer").
"""

from __future__ import annotations

import copy
import os
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import dtr

T, C, RATIO, ALPHA = 1000, 16, 0.5, 2.0
EXAMPLES = int(os.environ.get("DTR_FUZZ_EXAMPLES", "40"))
SEED = int(os.environ.get("DTR_FUZZ_SEED", "0"))
TOL = dict(rtol=1e-9, atol=1e-10)


def rows(tasks: torch.Tensor, width: int = C) -> torch.Tensor:
    """The paper's window rows of ``tasks`` (any shape), float64 (..., width)."""
    return dtr.task_masks(T, width, RATIO, ALPHA)[tasks].double()


#################################################################################
#                       The models (classes of this file only)                   #
#################################################################################


class TokenBlock(nn.Module):
    """x + mlp(norm(x)) + attention-free token mixing, on (B, N, C)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.qkv = nn.Linear(C, C)
        self.proj = nn.Linear(C, C)

    def forward(self, x, c=None):
        h = self.qkv(self.norm(x))
        if c is not None:
            h = h + c[:, None, :]
        return x + self.proj(torch.tanh(h) + h.mean(1, keepdim=True))


class TokenModel(nn.Module):
    """A DiT-shaped model on tokens: embed, blocks, head; ``t`` is (B,) or, per token, (B, N)."""

    def __init__(self, depth=2):
        super().__init__()
        self.embed = nn.Linear(4, C)
        self.t_embed = nn.Embedding(T, C)
        self.blocks = nn.ModuleList([TokenBlock() for _ in range(depth)])
        self.head = nn.Linear(C, 4)
        self.gradient_checkpointing = False
        self.nested = False

    def forward(self, x, t):
        h = self.embed(x)
        c = self.t_embed(t if t.ndim == 1 else t[:, 0])
        if self.nested and torch.is_grad_enabled():
            return self.head(checkpoint(self._blocks, h, c, use_reentrant=False))
        return self.head(self._blocks(h, c))

    def _blocks(self, h, c):
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        return h


class ConvBlock(nn.Module):
    """x + conv(silu(norm(x))): the ADM placement routes the norm (gate, channels on axis 1)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(4, C)
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        return x + self.conv(F.silu(self.norm(x)))


class ConvModel(nn.Module):
    def __init__(self, depth=2):
        super().__init__()
        self.stem = nn.Conv2d(1, C, 1)
        self.blocks = nn.ModuleList([ConvBlock() for _ in range(depth)])
        self.gradient_checkpointing = False
        self.nested = False

    def forward(self, x, timesteps):
        h = self.stem(x)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        return h.mean(1, keepdim=True)


class JointBlock(nn.Module):
    """An MMDiT joint block: image and text streams attend jointly; returns (text, image)."""

    def __init__(self):
        super().__init__()
        self.img = nn.Linear(C, C)
        self.txt = nn.Linear(C, C)

    def forward(self, hidden_states, encoder_hidden_states):
        joint = torch.cat([encoder_hidden_states, hidden_states], 1)
        mixed = torch.tanh(joint).mean(1, keepdim=True)
        text = encoder_hidden_states + self.txt(torch.tanh(encoder_hidden_states) + mixed)
        image = hidden_states + self.img(torch.tanh(hidden_states) + mixed)
        return text, image


class JointModel(nn.Module):
    def __init__(self, depth=2):
        super().__init__()
        self.embed = nn.Linear(4, C)
        self.t_embed = nn.Embedding(T, C)
        self.blocks = nn.ModuleList([JointBlock() for _ in range(depth)])
        self.gradient_checkpointing = False
        self.nested = False

    def forward(self, x, timestep, text):
        h = self.embed(x) + self.t_embed(timestep)[:, None]
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                text, h = checkpoint(block, hidden_states=h, encoder_hidden_states=text, use_reentrant=False)
            else:
                text, h = block(hidden_states=h, encoder_hidden_states=text)
        return h


KINDS = ("tokens", "conv", "joint", "per_token")


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = {"tokens": TokenModel, "per_token": TokenModel, "conv": ConvModel, "joint": JointModel}[kind]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.double()


def wrap_kwargs(kind: str) -> dict:
    common = dict(sharing_ratio=RATIO, alpha=ALPHA, blocks=r"blocks\.\d")
    if kind == "conv":  # the norms, wherever a wrapper has put them
        return dict(common, blocks=lambda name, module: isinstance(module, nn.GroupNorm), placement="gate")
    if kind == "joint":
        return dict(common, block_io=dtr.BlockIO("hidden_states", output=1), timestep_arg="timestep")
    return common


def batch(kind: str, seed: int = 1, two: bool = False):
    """The model's inputs (args) for a batch of 3, float64; ``two``: a second call's other timesteps."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([900, 3, 420]) if two else torch.tensor([0, 999, 250])
    if kind == "conv":
        return (torch.randn(3, 1, 6, 6, generator=g, dtype=torch.float64), t)
    if kind == "joint":
        return (
            torch.randn(3, 5, 4, generator=g, dtype=torch.float64),
            t,
            torch.randn(3, 2, C, generator=g, dtype=torch.float64),
        )
    if kind == "per_token":
        per = torch.stack([t, (t + 137) % T, (t + 600) % T, t, (t + 3) % T], 1)  # (B, N)
        return (torch.randn(3, 5, 4, generator=g, dtype=torch.float64), per)
    return (torch.randn(3, 5, 4, generator=g, dtype=torch.float64), t)


#################################################################################
#                     The references: the formula, by hand                       #
#################################################################################


def reference(kind: str, plain: nn.Module, args: tuple, routed: bool, taps: dict | None = None):
    """The model's output with routing written out (``routed``) or without; ``taps`` gets the stream leaving each
    block (what a forward hook on it must see)."""
    if kind == "conv":
        x, t = args
        h = plain.stem(x)
        for i, block in enumerate(plain.blocks):
            n = block.norm(h)
            if routed:
                n = rows(t)[:, :, None, None] * n
            h = h + block.conv(F.silu(n))
            if taps is not None:
                taps[i] = h
        return h.mean(1, keepdim=True)
    if kind == "joint":
        x, t, text = args
        h = plain.embed(x) + plain.t_embed(t)[:, None]
        m = rows(t)[:, None, :]
        for i, block in enumerate(plain.blocks):
            if routed:
                text, out = JointBlock.forward(block, m * h, text)
                h = out + (1 - m) * h
            else:
                text, h = JointBlock.forward(block, h, text)
            if taps is not None:
                taps[i] = h
        return h
    x, t = args
    h = plain.embed(x)
    c = plain.t_embed(t if t.ndim == 1 else t[:, 0])
    m = rows(t)[:, None, :] if t.ndim == 1 else rows(t)
    for i, block in enumerate(plain.blocks):
        h = TokenBlock.forward(block, m * h, c) + (1 - m) * h if routed else TokenBlock.forward(block, h, c)
        if taps is not None:
            taps[i] = h
    return plain.head(h)


#################################################################################
#                                 The state                                      #
#################################################################################


def canonical(name: str) -> str:
    """A parameter's name with what wrappers add taken away (LoRA's base layer, DDP, compile, checkpoint wrapper)."""
    for part in ("_checkpoint_wrapped_module.", "_orig_mod.", "base_model.model.", "base_layer."):
        name = name.replace(part, "")
    name = name.removeprefix("module.")  # DDP
    return name.replace("parametrizations.weight.original", "weight")


class State:
    """The model under test, how it is called, and what the steps did to it."""

    def __init__(self, kind: str):
        self.kind = kind
        self.model = build(kind)
        self.plain = build(kind)  # the weights, untouched: systems here change no value
        self.call = self.model  # what the user calls: the model, or a compiled/DDP/PEFT wrapper of it
        self.routed = False
        self.region = None  # None | "two calls": how the loss is computed
        self.functorch = False
        self.hooked: list[tuple[int, nn.Module, dict]] = []  # (block index, the hooked module, what its hook saw)
        self.log: list[str] = []
        self.distributed = False
        self.patched: list[tuple[type, object]] = []

    def routed_model(self) -> nn.Module:
        return self.model

    # -- the check --------------------------------------------------------------------------------------
    def check(self) -> None:
        args = batch(self.kind)
        for _, _, seen in self.hooked:
            seen.clear()
        out, grads = self.run(args)
        taps: dict = {}
        want = reference(self.kind, self.plain, args, self.routed, taps)
        if self.region == "two calls":
            want = want.sum() + reference(self.kind, self.plain, batch(self.kind, two=True), self.routed).sum()
            want_grads = self.grads_of(want)
            torch.testing.assert_close(out, want, **TOL, msg=self.describe)
        else:
            want_grads = self.grads_of(want.square().mean())
            torch.testing.assert_close(out, want, **TOL, msg=self.describe)
        assert grads, self.describe("no gradient")
        for name in grads.keys() | want_grads.keys():  # a parameter the loss does not use: None or zeros
            got, want_ = grads.get(name), want_grads.get(name)
            got = torch.zeros_like(want_) if got is None else got
            want_ = torch.zeros_like(got) if want_ is None else want_
            torch.testing.assert_close(got, want_, **TOL, msg=lambda m, n=name: self.describe(f"{n}: {m}"))
        for index, module, seen in self.hooked:
            # the stream leaving the block, as the model passes it on (first call of a step); a hooked block that a
            # wrapper made since (a checkpoint wrapper) put inside the routed module sees the masked input instead
            if seen and (not self.routed or module.__dict__.get("_dtr_behaviour") is not None):
                torch.testing.assert_close(seen["out"], taps[index], **TOL, msg=self.describe)

    def describe(self, message: str = "") -> str:
        return f"{message}\nfuzz program ({self.kind}): " + " -> ".join(self.log)

    def grads_of(self, loss: torch.Tensor) -> dict:
        self.plain.zero_grad()
        loss.backward()
        return {canonical(n): p.grad.clone() for n, p in self.plain.named_parameters() if p.grad is not None}

    def run(self, args: tuple):
        """The output (or the summed outputs of two calls in one checkpoint region) and the gradients of its loss."""
        model = self.call
        params = dict(self.model.named_parameters())
        if self.functorch:
            names = [n for n, p in params.items() if p.requires_grad and "lora_" not in n]
            detached = {n: p.detach() for n, p in params.items()}

            def loss(chosen):
                out = torch.func.functional_call(self.model, {**detached, **chosen}, args)
                return out.square().mean(), out

            grads, out = torch.func.grad(loss, has_aux=True)({n: detached[n] for n in names})
            return out, {canonical(n): g for n, g in grads.items() if not _zero_lora(n)}
        self.model.zero_grad()
        if self.region == "two calls":
            second = batch(self.kind, two=True)
            out = checkpoint(lambda *a: model(*a).sum() + model(*second).sum(), *args, use_reentrant=False)
            loss = out
        else:
            out = model(*args)
            loss = out.square().mean()
        loss.backward()
        grads = {}
        for n, p in self.model.named_parameters():
            if p.grad is None or "lora_" in n:
                continue
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[canonical(n)] = g.clone()
        return out.detach(), grads


def _zero_lora(name: str) -> bool:
    return "lora_" in name


#################################################################################
#                                  The steps                                     #
#################################################################################


def snapshot(model: nn.Module) -> list:
    """What a refused step must leave as it was: each module's class and instance dict (keys and values)."""
    return [(type(m), dict(m.__dict__)) for m in model.modules()]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        ta is tb and da.keys() == db.keys() and all(da[k] is db[k] for k in da) for (ta, da), (tb, db) in zip(a, b)
    )


def step_wrap(s: State, data) -> None:
    if s.routed:
        before = snapshot(s.model)
        with pytest.raises(ValueError, match="already routed"):
            dtr.wrap(s.model, **wrap_kwargs(s.kind))
        assert same(before, snapshot(s.model)), s.describe("a refused wrap changed the model")
        return
    dtr.wrap(s.call if not _compiled(s.call) else s.model, **wrap_kwargs(s.kind))
    s.routed = True


def step_unwrap(s: State, data) -> None:
    if not s.routed:
        with pytest.raises(ValueError, match="not routed"):
            dtr.unwrap(s.model)
        return
    if data.draw(st.booleans(), label="through the handle"):
        dtr.routing_of(s.call).remove()
    else:
        dtr.unwrap(s.call)
    s.routed = False


def _block(s: State, data) -> tuple[int, nn.Module]:
    i = data.draw(st.integers(0, len(s.model.blocks) - 1), label="block")
    return i, s.model.blocks[i]


def step_forward_hook(s: State, data) -> None:
    i, block = _block(s, data)
    kwargs = data.draw(st.booleans(), label="with_kwargs")
    seen: dict = {}

    def hook(module, args, *rest):
        out = rest[-1]
        stream = out[1] if isinstance(out, tuple) else out
        if "out" not in seen:
            seen["out"] = stream.detach().clone()
        return tuple(o * 1.0 for o in out) if isinstance(out, tuple) else out * 1.0  # a new tensor, same values

    block.register_forward_hook(hook, with_kwargs=kwargs)
    if s.kind != "conv":  # the gate is a child: its block's output is the stream
        s.hooked.append((i, block, seen))


def step_pre_hook(s: State, data) -> None:
    _, block = _block(s, data)
    if data.draw(st.booleans(), label="with_kwargs"):

        def pre(module, args, kwargs):
            new = {k: v * 1.0 if k == "hidden_states" else v for k, v in kwargs.items()}
            return tuple(a * 1.0 if torch.is_tensor(a) and a.is_floating_point() else a for a in args), new

        block.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        block.register_forward_pre_hook(
            lambda m, args: tuple(a * 1.0 if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        )


def step_accelerate(s: State, data) -> None:
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Identity(ModelHook):
        def post_forward(self, module, output):
            return tuple(o * 1.0 for o in output) if isinstance(output, tuple) else output * 1.0

    _, block = _block(s, data)
    if hasattr(block, "_hf_hook") and "_hf_hook" not in vars(block):
        # accelerate's limit, not ours: a CheckpointWrapper forwards `_hf_hook` from the hooked block inside it,
        # so add_hook_to_module(wrapper) tries to delete a hook the wrapper does not hold (fails without dtr).
        return
    add_hook_to_module(block, Identity(), append=True)


def step_class_patch(s: State, data) -> None:
    cls = type(s.model.blocks[0])
    if any(c is cls for c, _ in s.patched):
        return
    original = cls.forward

    def patched(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    cls.forward = patched
    s.patched.append((cls, original))


def step_parametrize(s: State, data) -> None:
    if s.distributed:
        return  # parametrize over FSDP2's DTensor parameters mixes tensor kinds: torch's limit, routed or not

    class Same(nn.Module):
        def forward(self, w):
            return w * 1.0

    _, block = _block(s, data)
    layer = next(m for m in block.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    if not parametrize.is_parametrized(layer, "weight"):
        parametrize.register_parametrization(layer, "weight", Same())


def _checkpointed(s: State) -> bool:
    return (
        s.model.gradient_checkpointing
        or s.region is not None
        or any(hasattr(b, "_dtr_fuzz_composable") or "Checkpoint" in type(b).__name__ for b in s.model.blocks)
    )


def step_checkpoint(s: State, data) -> None:
    form = data.draw(st.sampled_from(["per block", "wrapper", "composable", "two calls", "nested"]), label="form")
    s.log[-1] += f"[{form}]"
    if s.functorch:
        return  # torch.func does not run saved-tensor hooks (torch's limit, routed or not)
    if form == "per block":
        s.model.gradient_checkpointing = True
    elif form == "nested":
        s.model.gradient_checkpointing = True
        s.model.nested = True
    elif form == "two calls":
        s.region = "two calls"
    elif form == "wrapper":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        block_type = type(s.model.blocks[0])
        apply_activation_checkpointing(s.model, check_fn=lambda m: type(m) is block_type)
    else:
        if _compiled(s.call) or any(b._compiled_call_impl is not None for b in s.model.blocks):
            return  # composable checkpoint under torch.compile: torch's limit (see step_compile)
        from torch.distributed._composable import checkpoint as composable

        for block in s.model.blocks:
            if not hasattr(block, "_dtr_fuzz_composable"):
                composable(block)
                block._dtr_fuzz_composable = True


def step_compile(s: State, data) -> None:
    if any(hasattr(b, "_dtr_fuzz_composable") for b in s.model.blocks):
        return  # composable checkpoint under torch.compile recomputes other values: torch's limit, routed or not
    if data.draw(st.booleans(), label="block by block"):
        i, block = _block(s, data)
        block.compile(backend="aot_eager")
    elif not _compiled(s.call):
        s.call = torch.compile(s.call, backend="aot_eager")


def step_torch_func(s: State, data) -> None:
    # torch.func runs no saved-tensor hooks (checkpointing) and no FSDP2 DTensors: torch's limits, routed or not
    s.functorch = not _checkpointed(s) and not s.distributed


def step_copy(s: State, data) -> None:
    how = data.draw(st.sampled_from(["deepcopy", "pickle", "copy.copy"]), label="copy")
    s.log[-1] += f"[{how}]"
    if s.distributed or (how == "pickle" and _unpicklable(s)):
        return  # torch's and accelerate's limits, routed or not: process groups, parametrized modules, local functions
    if how == "copy.copy":
        shallow = copy.copy(s.model)
        if s.routed:
            before = snapshot(s.model)
            with pytest.raises(ValueError, match="shallow copy"):
                dtr.unwrap(shallow)
            assert same(before, snapshot(s.model)), s.describe("a refused unwrap changed the model")
        return
    model = copy.deepcopy(s.model) if how == "deepcopy" else pickle.loads(pickle.dumps(s.model))
    s.hooked = []  # hooks were copied with their closures: the copies record elsewhere
    s.model = s.call = model  # wrappers (compile, DDP, PEFT) are made again by later steps


def _unpicklable(s: State) -> bool:
    """Systems whose modules do not pickle, routed or not: parametrize (state_dict only), accelerate's and module
    hooks made of local functions, a patched class's local forward."""
    return bool(s.patched) or any(
        parametrize.is_parametrized(m) or hasattr(m, "_hf_hook") or m._forward_hooks or m._forward_pre_hooks
        for m in s.model.modules()
    )


def step_lora(s: State, data) -> None:
    peft = pytest.importorskip("peft")
    if s.kind == "conv" or s.call is not s.model or any("lora_" in n for n, _ in s.model.named_parameters()):
        return
    targets = ["qkv", "proj"] if s.kind in ("tokens", "per_token") else ["img", "txt"]
    s.call = peft.get_peft_model(s.model, peft.LoraConfig(r=2, target_modules=targets))
    for n, p in s.model.named_parameters():  # the base weights train too: their gradients are checked
        p.requires_grad_("lora_" not in n or p.requires_grad)


def step_ddp(s: State, data) -> None:
    if s.call is not s.model or s.distributed:
        return
    _process_group()
    s.call = nn.parallel.DistributedDataParallel(s.model, find_unused_parameters=True)  # the last text stream
    s.distributed = True


def step_fsdp(s: State, data) -> None:
    if s.call is not s.model or s.distributed or s.functorch:
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _process_group()
    mesh = init_device_mesh("cpu", (1,))
    for block in s.model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(s.model, mesh=mesh)
    s.distributed = True


def _compiled(module) -> bool:
    return type(module).__name__ == "OptimizedModule"


def _process_group() -> None:
    if not dist.is_initialized():
        # An in-memory store: one rank needs no rendezvous file (a FileStore left one in /tmp per run).
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


STEPS = {
    "wrap": (step_wrap, 6),
    "unwrap": (step_unwrap, 3),
    "forward hook": (step_forward_hook, 3),
    "pre-hook": (step_pre_hook, 2),
    "accelerate hook": (step_accelerate, 2),
    "class patch": (step_class_patch, 1),
    "parametrize": (step_parametrize, 2),
    "checkpointing": (step_checkpoint, 3),
    "torch.compile": (step_compile, 1),
    "torch.func": (step_torch_func, 1),
    "copy": (step_copy, 2),
    "lora": (step_lora, 1),
    "ddp": (step_ddp, 1),
    "fsdp2": (step_fsdp, 1),
}
WEIGHTED = [name for name, (_, weight) in STEPS.items() for _ in range(weight)]


@pytest.fixture(scope="module", autouse=True)
def process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=SEED == 0,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_stacked_systems_in_random_orders_route_as_the_formula(kind, data):
    if SEED:
        data.draw(st.integers(0, SEED), label="seed")
    state = State(kind)
    steps = data.draw(st.lists(st.sampled_from(WEIGHTED), min_size=2, max_size=7), label="steps")
    if "wrap" not in steps:
        steps.insert(data.draw(st.integers(0, len(steps)), label="wrap at"), "wrap")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in steps:
                state.log.append(name)
                STEPS[name][0](state, data)
                state.check()
    finally:
        for cls, original in state.patched:
            cls.forward = original
        torch._dynamo.reset()


class _Draws:
    """Fixed draws, to replay a program the fuzzer printed."""

    def __init__(self, values):
        self.values = list(values)

    def draw(self, strategy, label=None):
        return self.values.pop(0)


@pytest.mark.skipif(
    tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 14), reason="observed on torch 2.14 only"
)
@pytest.mark.xfail(raises=RuntimeError, reason="open: found by seed 27 (torch 2.14: CheckpointError)")
def test_open_compiled_model_in_a_two_call_region_with_per_block_regions_wrapped_last():
    """Fuzz program (tokens, DTR_FUZZ_SEED=27): torch.compile -> checkpointing[per block] -> checkpointing[two
    calls] -> forward hook -> wrap.  Loud, not silent: the two-call region's recomputation saves other tensors than
    its forward did (torch's CheckpointError in backward).  Wrapping first, or without the hook, it is exact
    (the fuzzer draws those).  Kept as an open case (not strict: checked on torch 2.14 only; a pass shows XPASS)."""
    state = State("tokens")
    draws = _Draws([False, "per block", "two calls", 0, False])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in ["torch.compile", "checkpointing", "checkpointing", "forward hook", "wrap"]:
                state.log.append(name)
                STEPS[name][0](state, draws)
                state.check()
    finally:
        torch._dynamo.reset()
