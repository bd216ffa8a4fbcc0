"""Attach a behaviour to a module's calls and detach it again: a thin class swap that knows no behaviour.

``attach(module, behaviour)`` gives the module a subclass of its own class (same name, module and qualname,
as ``torch.nn.utils.parametrize`` does) whose ``_call_impl`` hands every call of the module to
``behaviour.call(module, call_impl, args, kwargs)``.  ``_call_impl`` is what ``module(...)`` runs, outside
everything the module does on its own: its forward hooks, an instance ``forward`` put there by accelerate or
diffusers hooks, FSDP2's casts, a class patch of ``forward``.  So routing composes with each of them in
either order.  Why not forward hooks: TorchDynamo does not guard hook dicts, so a compiled graph of the
unrouted module would run for the routed one (and the reverse); it does guard a module's class and the
attributes its code reads, which is what this relies on.

A behaviour is any object with ``call(module, call_impl, args, kwargs)`` and ``copies_with(memo)`` (whether a
deepcopy that reaches the module keeps it); ``intercepts_forward = True`` also routes direct
``module.forward(...)`` calls through ``behaviour.forward(module, forward, args, kwargs)``.

A behaviour may also have ``call_compiled(module, compiled, call_impl, args, kwargs)``: the eager entry of a
module compiled on its own (``module.compile()``, diffusers' ``compile_repeated_blocks``), run before its compiled
call, where state TorchDynamo cannot see (an eager checkpoint region around the module) is still readable.

``detach`` gives the class back when it is still exactly the routed one.  When another system has since
subclassed it (``parametrize``, FSDP2's ``fully_shard``), the class stays and, without a behaviour, every
call is the base class's call: unwrap always finishes, and never leaves a module half routed.
"""

from __future__ import annotations

import copy
import types
import weakref
from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.compiler import is_compiling

ATTR = "_dtr_behaviour"
INNER = "_dtr_instance_forward"  # an instance forward found at attach, now called through _instance_forward

_classes: weakref.WeakKeyDictionary[type, dict] = weakref.WeakKeyDictionary()  # base -> {forward?: ref(cls)}


def behaviour_of(module: nn.Module) -> Any:
    """The behaviour attached to ``module``, or None."""
    return module.__dict__.get(ATTR)


def routed_base(cls: type) -> type | None:
    """The class a routed class was made from, if ``cls`` is one or derives from one (FSDP2, parametrize)."""
    for c in cls.__mro__:
        if "_dtr_base" in c.__dict__:
            return c.__dict__["_dtr_base"]
    return None


def check_attachable(module: nn.Module, name: str, behaviour: Any) -> None:
    """Raise, changing nothing, if ``behaviour`` cannot be attached to ``module``."""
    where = f"submodule {name!r}" if name else "the model"
    if ATTR in module.__dict__:
        raise ValueError(f"{where} is already routed by dtr; call dtr.unwrap(...) before wrapping again")
    compiled = module.__dict__.get("_compiled_call_impl")
    if compiled is not None and not _compiled_from_routed(compiled):
        raise TypeError(
            f"{where} was compiled before dtr.wrap ({type(module).__name__}.compile()), so its compiled call would "
            "not route: wrap first, then compile (routing = dtr.wrap(model); block.compile())"
        )
    cls = type(module)
    if getattr(behaviour, "intercepts_forward", False) and routed_base(cls) is not None and not _has_forward(cls):
        raise TypeError(f"{where} keeps a routed class of an earlier wrap that cannot take this role; rebuild it")


def attach_all(plan: Iterable[tuple[nn.Module, Any]]) -> None:
    """Attach each behaviour to its module: all of them, or (if one fails) none."""
    done = []
    try:
        for module, behaviour in plan:
            _attach(module, behaviour)
            done.append(module)
    except BaseException:
        detach_all(done)
        raise


def detach_all(modules: Iterable[nn.Module]) -> None:
    """Detach every module (each step only removes what ``attach`` added, so it cannot fail half-way)."""
    for module in modules:
        module.__dict__.pop(ATTR, None)
        state = module.__dict__
        if INNER in state and getattr(state.get("forward"), "__func__", None) is _instance_forward:
            state["forward"] = state.pop(INNER)  # else another wrapper holds ours: it stays, inert
        cls = type(module)
        if "_dtr_base" in cls.__dict__:  # exactly our class: give the module its own class back
            object.__setattr__(module, "__class__", cls.__dict__["_dtr_base"])


def _attach(module: nn.Module, behaviour: Any) -> None:
    cls = type(module)
    intercepts_forward = getattr(behaviour, "intercepts_forward", False)
    if routed_base(cls) is None:  # else an inert routed class (of an earlier wrap) is still in place: reuse it
        # object.__setattr__: a class whose __setattr__ forbids new attributes must not stop routing half-way
        object.__setattr__(module, "__class__", routed_class(cls, intercepts_forward))
    state = module.__dict__
    if intercepts_forward and "forward" in state and INNER not in state:
        # forward replaced on the instance (accelerate's mixed precision): direct forward() calls go through it
        state[INNER] = state["forward"]
        state["forward"] = types.MethodType(_instance_forward, module)
    state[ATTR] = behaviour


def _instance_forward(self, *args, **kwargs):
    """What an instance ``forward`` of a module routing intercepts becomes (bound; copies rebind it)."""
    inner = self.__dict__[INNER]
    behaviour = getattr(self, ATTR, None)
    if behaviour is None:
        return inner(*args, **kwargs)
    return behaviour.forward(self, lambda module, *a, **k: inner(*a, **k), args, kwargs)


def _has_forward(cls: type) -> bool:
    return any("_dtr_base" in c.__dict__ and "forward" in c.__dict__ for c in cls.__mro__)


def _compiled_from_routed(compiled: Any) -> bool:
    """Whether a module's ``_compiled_call_impl`` (``module.compile()``) compiled a routed ``_call_impl``."""
    if getattr(compiled, "_dtr_call_impl", False):  # the eager entry the routed class's compile() puts first
        return True
    orig = getattr(compiled, "_torchdynamo_orig_callable", None)
    return getattr(getattr(orig, "__func__", orig), "_dtr_call_impl", False)


#################################################################################
#                              The routed classes                               #
#################################################################################


def routed_class(base: type, with_forward: bool = False) -> type:
    """The subclass of ``base`` that routed modules of that class get (one per base, held weakly).

    Its ``_call_impl`` has a code object of its own: TorchDynamo keeps one compile cache (and recompile budget)
    per code object, so each routed class compiles as independently as the unrouted classes do.
    """
    entry = _classes.setdefault(base, {})
    ref = entry.get(with_forward)
    cls = ref() if ref is not None else None
    if cls is None:
        cls = _make_routed_class(base, with_forward)
        entry[with_forward] = weakref.ref(cls)
    return cls


def _make_routed_class(base: type, with_forward: bool) -> type:
    # The function itself, not `base._call_impl` at call time: TorchDynamo cannot trace an attribute read off a
    # class diffusers marks allow_in_graph (its blocks), and no one patches nn.Module._call_impl on a class.
    base_call_impl = base._call_impl

    def _call_impl(self, *args, **kwargs):
        behaviour = getattr(self, ATTR, None)  # getattr: TorchDynamo guards the attribute's presence
        if behaviour is None:
            return base_call_impl(self, *args, **kwargs)
        return behaviour.call(self, base_call_impl, args, kwargs)

    def forward(self, *args, **kwargs):
        behaviour = getattr(self, ATTR, None)
        if behaviour is None:
            return base.forward(self, *args, **kwargs)
        return behaviour.forward(self, base.forward, args, kwargs)  # base.forward read now: class patches apply

    def compile(self, *args, **kwargs):
        # nn.Module.compile compiles _call_impl; calls then reach the compiled code without running any of ours
        # eagerly. A behaviour with call_compiled gets that eager step back, in front of the compiled call.
        base.compile(self, *args, **kwargs)
        compiled = self.__dict__.get("_compiled_call_impl")
        if compiled is None or not hasattr(getattr(self, ATTR, None), "call_compiled"):
            return

        def entry(*args, **kwargs):
            behaviour = getattr(self, ATTR, None)
            if behaviour is None or is_compiling():  # unwrapped, or inside a larger compiled region
                return compiled(*args, **kwargs)
            return behaviour.call_compiled(self, compiled, base_call_impl, args, kwargs)

        entry._dtr_call_impl = True
        self._compiled_call_impl = entry

    call_impl = _own_code(_call_impl, f"_call_impl_{base.__name__}")
    call_impl._dtr_call_impl = True
    namespace = {
        "_call_impl": call_impl,
        "compile": compile,
        "__reduce_ex__": _reduce_routed,
        "__deepcopy__": _deepcopy_routed,
        "_dtr_base": base,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
    }
    if with_forward:
        namespace["forward"] = _own_code(forward, f"forward_{base.__name__}")
    return type(base.__name__, (base,), namespace)


def _own_code(fn: types.FunctionType, name: str) -> types.FunctionType:
    code = fn.__code__.replace(co_name=name)
    new = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    new.__qualname__ = name
    return new


def _reduce_routed(self, protocol: int):
    """Pickle a routed module as its (importable) base class and behaviour, routed again on load."""
    cls = type(self)
    base = routed_base(cls)
    return _new_routed, (base, _has_forward(cls)), self.__getstate__()


def _new_routed(base: type, with_forward: bool) -> nn.Module:
    cls = routed_class(base, with_forward)
    return cls.__new__(cls)


def _deepcopy_routed(self, memo: dict) -> nn.Module:
    """A deepcopy keeps the routing when the behaviour says so (the whole model is copied), else a plain module.

    The copy enters ``memo`` before its behaviour is copied, and the behaviour before the rest of the module,
    so that the modules below see the copied routing state.
    """
    behaviour = self.__dict__.get(ATTR)
    keep = behaviour is not None and behaviour.copies_with(memo)
    cls = type(self) if keep else routed_base(type(self))
    new = cls.__new__(cls)
    memo[id(self)] = new
    state = {k: v for k, v in self.__dict__.items() if k != ATTR}
    if keep:
        new.__dict__[ATTR] = copy.deepcopy(behaviour, memo)
    new.__setstate__({**copy.deepcopy(state, memo), **new.__dict__})
    return new
