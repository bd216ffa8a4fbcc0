"""Where a call enters: the model's behaviour (each call of the model opens a ``Call``), the behaviour of the module
the timestep enters when that is not the model (``timestep_module=``), and the eager step in front of modules
compiled on their own.

The timestep argument is declared by name (or position) and located in the ``forward`` signature once, at
wrap; every error about it names the argument that was read.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import policy
from .arguments import Argument, locate, parameters, positional_names
from .calls import Alive, Call, checkpoint_region
from .mechanism import ATTR, Behaviour, RoutedForward, is_class_forward
from .runtime import Runtime
from .spec import TIMESTEP_NAMES, ImageTokens

#################################################################################
#                              The timestep argument                             #
#################################################################################


def locate_timestep(module: nn.Module, arg: str | int | None, where: str) -> Argument:
    """The timestep argument of ``module``'s forward: ``arg`` (a name or position), or the first parameter named
    like a timestep (``t``, ``timestep``, ``timesteps``); refused at wrap when there is none."""
    forward = type(module).forward
    owner = f"{type(module).__name__}.forward"
    params = parameters(forward)
    if params is None:
        if arg is None:
            raise ValueError(f"dtr cannot read the signature of {owner}: pass timestep_arg= (a name or position)")
        return locate(forward, arg, owner, "timestep")
    positional = positional_names(params)
    keywords = [p.name for p in params if p.kind is not p.VAR_POSITIONAL]
    open_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    shown = f"{owner}({', '.join(p.name for p in params)})"
    if arg is None:
        found = [n for n in TIMESTEP_NAMES if n in keywords]
        if not found:
            raise ValueError(
                f"dtr cannot tell which argument of {shown} {where} is the timestep (none is named "
                f"{' or '.join(TIMESTEP_NAMES)}): pass timestep_arg= (its name or position)"
            )
        arg = found[0]
    if isinstance(arg, str):
        if arg not in keywords and not open_kwargs:
            raise ValueError(f"timestep_arg {arg!r} is not an argument of {shown}")
        return Argument(arg, positional.index(arg) if arg in positional else None, owner)
    if isinstance(arg, bool) or not isinstance(arg, int) or arg < 0:
        raise TypeError(f"timestep_arg must be an argument name or a position >= 0, got {arg!r}")
    if arg >= len(positional) and not any(p.kind is p.VAR_POSITIONAL for p in params):
        raise ValueError(f"timestep_arg {arg} is not a position of {shown} (it takes {len(positional)})")
    return Argument(positional[arg] if arg < len(positional) else None, arg, owner)


def read_tasks(runtime: Runtime, timestep: Argument, args: tuple, kwargs: dict) -> torch.Tensor:
    """The task indices of the timestep argument of a call; errors say which argument was read."""
    value = timestep.read(args, kwargs, hint="; pass timestep_arg= (a name or position)")
    try:
        return runtime.tasks_from(value)
    except (TypeError, ValueError) as e:
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise type(e)(
            f"{e} (dtr read the timestep from {timestep.describe()}: {got}; if that is not the "
            "timestep, pass timestep_arg=)"
        ) from None


#################################################################################
#                                   The model                                    #
#################################################################################


class ModelCall(Behaviour):
    """The routed model: each of its calls owns a ``Call`` holding that call's tasks.

    ``model(...)``, a direct ``model.forward(...)`` (facebookresearch/DiT's ``forward_with_cfg``) and a call the
    model makes of itself each open a call of their own.  Before each eager call it checks that every routed
    module is still where it was wrapped and still routes (a module replaced after wrap would run unrouted).
    """

    def __init__(
        self,
        runtime: Runtime,
        routing: Any,
        timestep: Argument | None,
        tree: dict,
        image: tuple[Argument, ImageTokens] | None = None,
    ):
        self.runtime = runtime  # first: a deepcopy copies it before the routing (see __deepcopy__)
        self.routing = routing  # the user's handle, for dtr.routing_of
        self.timestep = timestep  # None: the timestep module gives the tasks
        self.tree = tree  # {child name: subtree or the routed module's behaviour}, the routed modules' places
        self.image = image  # where a call's image token count is read (RoutingSpec.image_tokens), or None
        runtime.owned = True

    def __deepcopy__(self, memo: dict) -> ModelCall:
        new = ModelCall.__new__(ModelCall)
        memo[id(self)] = new
        for key, value in self.__dict__.items():  # runtime first: the blocks copied below look for it in memo
            new.__dict__[key] = copy.deepcopy(value, memo)
        new.runtime.owned = True
        return new

    def __setstate__(self, state: dict) -> None:  # a pickled model: its blocks' runtime has an owner again
        self.__dict__.update(state)
        self.runtime.owned = True

    def forward(self, module: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if torch._C._get_tracing_state() is not None:
            raise TypeError("dtr routing cannot be traced by torch.jit.trace: use torch.compile or torch.export")
        if any(isinstance(a, torch.fx.Proxy) for a in (*args, *kwargs.values())):
            raise TypeError("dtr routing cannot be traced symbolically by torch.fx: use torch.compile or torch.export")
        eager = not policy.compiling()
        check_places(module, self.tree, self.runtime, eager, self.routing.adopt)
        tasks = None if self.timestep is None else read_tasks(self.runtime, self.timestep, args, kwargs)
        image_tokens = None if self.image is None else self.image[1].count(self.image[0].read(args, kwargs))
        calls = self.runtime.calls
        outer = calls.current()
        alive = Alive() if eager else None  # this frame holds it until the call ends, however it ends
        try:
            call = calls.push(tasks, owner=module)
            call.image_tokens = image_tokens
            if eager:
                call.outer, call.alive = outer, weakref.ref(alive)
                if torch.is_grad_enabled():
                    region, recomputing = checkpoint_region()
                    call.region = region if recomputing else None
            return forward(*args, **kwargs)
        finally:
            calls.restore(outer)


class TimestepCapture(Behaviour):
    """The module the timestep enters (``timestep_module=``): its call gives the model's call its tasks, once."""

    def __init__(self, runtime: Runtime, name: str, timestep: Argument):
        self.runtime = runtime
        self.name = name
        self.timestep = timestep

    @property
    def live(self) -> bool:
        return self.runtime.owned

    def forward(self, module: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        call = self.runtime.calls.current()
        if call is not None and call.owner is not None and self.runtime.owned:
            self._capture(call, args, kwargs)
        return forward(*args, **kwargs)

    def _capture(self, call: Call, args: tuple, kwargs: dict) -> None:
        if call.captured:
            if not policy.compiling() and torch.is_grad_enabled() and checkpoint_region()[1]:
                return  # a region recomputed inside the model call: the timestep was read already
            raise RuntimeError(
                f"dtr: timestep_module {self.name!r} was called twice in one call of the model, so dtr cannot tell "
                "which call carries the timestep: point timestep_module at a module called once per model call"
            )
        call.tasks = read_tasks(self.runtime, self.timestep, args, kwargs)
        call.masks = {}
        call.captured = True


#################################################################################
#                         Modules compiled on their own                          #
#################################################################################


class CompiledEntry:
    """Put in front of a compiled call on the way to routed modules (``module.compile()``'s compiled call, or the
    forward of a ``torch.compile(module)`` put in the model's place): the eager step TorchDynamo cannot take, which
    records the checkpoint region around the module or, while the region is recomputed, gives the compiled code the
    call that region ran in."""

    __slots__ = ("compiled", "runtime")

    def __init__(self, compiled: Callable, runtime: Runtime):
        self.compiled = compiled
        self.runtime = runtime

    def __call__(self, *args, **kwargs):
        runtime = self.runtime
        if policy.compiling() or not runtime.owned:  # inside a larger compiled region, or no longer routed
            return self.compiled(*args, **kwargs)
        calls = runtime.calls
        outer = calls.current()
        try:
            runtime.call_for("a module compiled on its own", outer, policy.mode())
            return self.compiled(*args, **kwargs)
        finally:
            if calls.current() is not outer:
                calls.restore(outer)


def _enter_compiled(module: nn.Module, runtime: Runtime) -> None:
    """Put a ``CompiledEntry`` in front of ``module``'s compiled call, if it has one without it."""
    state = module.__dict__
    compiled = state.get("_compiled_call_impl")
    if compiled is not None and not isinstance(compiled, CompiledEntry):
        state["_compiled_call_impl"] = CompiledEntry(compiled, runtime)
    if type(module).__name__ == "OptimizedModule":
        forward = state.get("forward")
        if forward is not None and not isinstance(forward, CompiledEntry):
            state["forward"] = CompiledEntry(forward, runtime)


def leave_compiled(modules) -> None:
    """Take the ``CompiledEntry`` objects ``check_places`` put in ``modules`` out again (at unwrap)."""
    for module in modules:
        state = module.__dict__
        for key in ("_compiled_call_impl", "forward"):
            entry = state.get(key)
            if isinstance(entry, CompiledEntry):
                state[key] = entry.compiled


#################################################################################
#                          Routed modules stay in place                          #
#################################################################################


def plant(tree: dict, name: str, behaviour: Any) -> None:
    """Record ``behaviour`` at the dotted ``name`` in a tree of child names (``ModelCall.tree``; key "" = here)."""
    for key in name.split("."):
        tree = tree.setdefault(key, {})
    tree[""] = behaviour


def check_places(
    module: nn.Module, tree: dict, runtime: Runtime, eager: bool, adopt: Callable, prefix: str = ""
) -> None:
    """Raise if a routed module is no longer where it was wrapped: a module put in its place would run unrouted.

    A few dict lookups per routed module and level.  A wrapper put around a routed module (a checkpoint wrapper,
    FSDP1, torch.compile's OptimizedModule) still runs it routed: the tree then follows the path inside it.  Eagerly,
    a module whose instance ``forward`` was set again over routing's (a hook removed after wrap restores the forward
    it found) is routed again around it (compiled too) and a class patch of ``forward`` is taken up; modules compiled
    on their own get their ``CompiledEntry`` (also while the model's entry is compiled).  A routed module that
    torch.ao's quantization swapped for its quantized version (``quantize_dynamic``, ``convert``: they carry a
    module's hooks over too) is routed in its place (``adopt``).
    """
    children = module._modules
    for key, node in list(tree.items()):
        if key == "":
            continue
        child = children.get(key)
        behaviour = node.get("")
        state = None if child is None else child.__dict__
        attached = None if state is None or ATTR not in state else state[ATTR]
        if child is None or (behaviour is not None and (attached is None or attached.behaviour is not behaviour)):
            inside = _path_inside(child, node)
            if inside is None and attached is None and _swapped_by_torch_ao(child) and eager:
                adopt(prefix + key, child, behaviour)  # quantized in place: routed in its place
                continue
            if inside is None and child is None:  # moved one level down (a wrapper put around this module's child)
                moved = _path_inside(module, node)
                if moved is not None:
                    del tree[key]
                    _merge(tree, moved)
                    return check_places(module, tree, runtime, eager, adopt, prefix)
            if inside is None:
                _replaced(prefix + key, child)
            tree[key] = node = inside
            behaviour = None
        # A module compiled on its own gets its CompiledEntry, also when the model's entry is being compiled (a
        # block compiled after the model was compiled whole runs its own graph from eager code where the model's
        # graph breaks, and a checkpoint region around it records its call there): TorchDynamo replays the write
        # after the graph, with no graph break.
        compiled = child._compiled_call_impl
        if (compiled is not None and compiled.__class__ is not CompiledEntry) or (
            eager and child.__class__.__name__ == "OptimizedModule"
        ):
            _enter_compiled(child, runtime)
        if behaviour is not None:
            if attached.func is not child.__class__.forward:  # a class patch since: taken up
                attached.func = child.__class__.forward
            if "forward" not in state or state["forward"] is not attached:
                if eager:
                    _keep_routed(child, attached)
                elif _verdict(child, attached, state.get("forward")) != "routed":  # traced: a wrapper of routing's
                    _keep_routed_eagerly(child, attached)  # passes; any other is taken up from eager code
        if len(node) > (behaviour is not None):
            check_places(child, node, runtime, eager, adopt, f"{prefix}{key}.")


def _keep_routed(module: nn.Module, attached: RoutedForward) -> None:
    """Check that ``module``'s instance ``forward`` still leads to routing's.  One set from under it is routed
    again: a forward put back (a hook added before wrap and removed after restores the forward it found: the class's,
    or part of what routing wrapped), or a wrapper made since around the module's own forward (accelerate re-adding
    its hooks in one).  Any other is refused, since it would run unrouted or routed twice."""
    state = module.__dict__
    forward = state.get("forward")
    verdict = _verdict(module, attached, forward)
    if verdict == "routed":
        return
    if verdict in ("own", "wrapper"):
        attached.inner = None if verdict == "own" else forward
        state["forward"] = attached
        return
    raise RuntimeError(
        f"dtr: the forward of routed module {type(module).__name__} was replaced after dtr.wrap by {forward!r}, which "
        "does not call routing's (wrappers are found through __wrapped__, functools.partial or a closure): call "
        "dtr.unwrap(model) and dtr.wrap(model) again after changing forwards, or wrap with functools.wraps"
    )


def _keep_routed_eagerly(module: nn.Module, attached: RoutedForward) -> None:
    """Compiled, a forward set from under routing's since the last trace is routed again from eager code: one graph
    break, in the one trace after the change (a write made while tracing is not seen by the calls traced after it on
    every torch version), so that what runs next calls routing's.  Under fullgraph=True that trace fails, saying why.
    Made here, not at import: ``torch.compiler.disable`` imports TorchDynamo, which ``import dtr`` does not."""
    reason = (
        "dtr: a routed module's forward was set again since the model was compiled (a hook added or removed); "
        "routing takes it up from eager code, a graph break in this one trace: under fullgraph=True, call the model "
        "once without compiling first"
    )
    return torch.compiler.disable(_keep_routed, reason=reason)(module, attached)


def _verdict(module: nn.Module, attached: RoutedForward, forward: Any) -> str:
    """What ``module``'s instance ``forward`` is to routing: "routed" (it leads to routing's), "own" (none, or the
    module's own: route it again), "wrapper" (it wraps the module's own forward or the one routing found at wrap, or
    one that leads to: route again around it), else "other".  A hook added before wrap may hold the block's bound
    forward from before a class patch: put back, it is not the class's forward any more, but it is what routing ran.
    """
    # Identity by id(): compiled, this is traced, and TorchDynamo cannot trace ``is`` between two partials.
    if _leads_to(forward, lambda f: id(f) == id(attached), depth=6):
        return "routed"
    if forward is None or is_class_forward(forward, module):
        return "own"

    def own(f: Any) -> bool:
        if is_class_forward(f, module):
            return True
        return attached.inner is not None and _leads_to(attached.inner, lambda g: g is f, depth=6)

    return "wrapper" if _leads_to(forward, own, depth=6) else "other"


def _leads_to(fn: Any, found: Callable[[Any], bool], depth: int) -> bool:
    """Whether a forward wrapper reaches a forward ``found`` recognises: itself, or through ``__wrapped__``
    (functools.wraps, accelerate, diffusers), a ``functools.partial``'s function and arguments, a closure or a
    default argument."""
    if fn is None:
        return False
    if found(fn):
        return True
    if depth == 0:
        return False
    fn = getattr(fn, "__func__", fn)  # a bound method: its function
    inner = [getattr(fn, "__wrapped__", None), getattr(fn, "func", None), getattr(fn, "inner", None)]
    for values in (getattr(fn, "args", None), getattr(fn, "__defaults__", None)):
        inner += list(values) if isinstance(values, tuple) else []
    inner += list((getattr(fn, "__kwdefaults__", None) or {}).values())
    cells = [c.cell_contents for c in getattr(fn, "__closure__", None) or () if _filled(c)]
    for cell in cells:  # an object a closure holds may keep the forward as an attribute (diffusers' hook reference)
        inner += [cell] if callable(cell) else [v for v in getattr(cell, "__dict__", {}).values() if callable(v)]
    return any(_leads_to(i, found, depth - 1) for i in inner if callable(i))


def _swapped_by_torch_ao(module: nn.Module | None) -> bool:
    return module is not None and type(module).__module__.startswith("torch.ao.")


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def _path_inside(wrapper: nn.Module | None, node: dict) -> dict | None:
    """A tree leading from ``wrapper`` to the module that ``node`` stands for (the one whose routed modules are at
    ``node``'s paths below it: a routed block, or a parent of routed modules put inside a wrapper), or None."""
    for name, module in () if wrapper is None else wrapper.named_modules():
        if name and _holds(module, node):
            tree: dict = {}
            *parents, last = name.split(".")
            branch = tree
            for key in parents:
                branch = branch.setdefault(key, {})
            branch[last] = node
            return tree
    return None


def _merge(tree: dict, branch: dict) -> None:
    """Put ``branch`` (a tree of child names) into ``tree``, merging where both have the same child."""
    for key, sub in branch.items():
        if key in tree and isinstance(tree[key], dict) and isinstance(sub, dict):
            _merge(tree[key], sub)
        else:
            tree[key] = sub


def _holds(module: nn.Module, node: dict) -> bool:
    """Whether ``module`` has the behaviours of ``node`` at its paths (``node[""]``: its own)."""
    for key, sub in node.items():
        if key == "":
            attached = module.__dict__.get(ATTR)
            if attached is None or attached.behaviour is not sub:
                return False
        else:
            child = module._modules.get(key)
            if child is None or not _holds(child, sub):
                return False
    return True


def _replaced(name: str, child: nn.Module | None) -> None:
    now = "removed" if child is None else f"replaced by a {type(child).__name__} that does not hold it"
    raise RuntimeError(
        f"dtr: routed module {name!r} was {now} after dtr.wrap, so that part of the model would run unrouted: "
        "call dtr.unwrap(model) and dtr.wrap(model) again after changing the model's modules"
    )
