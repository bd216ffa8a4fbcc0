"""``dtr.wrap`` and ``dtr.unwrap``: add routing to a model in place, and take it away."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

from torch import nn

from .adapters import find_adapter
from .masks import METHODS, TIMESTEP_KINDS, resolve_seed
from .routing import PLACEMENTS, Routing, RoutingSpec, select_modules
from .validation import check_alpha, check_channel_axis, check_choice, check_int, check_sharing_ratio

_HOW_TO = (
    "pass blocks= (a full-match regex on module names such as r'layers\\.\\d+', a list of names, "
    "or a predicate (name, module) -> bool), placement= ('residual' for blocks y = x + F(x) with "
    "channels last, 'gate' to multiply a module's output on channel axis 1), and, unless the model is "
    "called as model(x, t, ...) or with t=/timestep=, timestep_module= (dotted name of the module "
    "whose call receives the timestep) and timestep_arg= (its positional index or keyword)"
)


def wrap(
    model: nn.Module,
    sharing_ratio: float = 0.8,
    *,
    alpha: float = 4.0,
    method: str = "dtr",
    num_tasks: int = 1000,
    seed: int | None = 0,
    blocks: str | Iterable[str] | Callable | None = None,
    placement: str | None = None,
    timestep_module: str | None = None,
    timestep_arg: int | str | tuple | None = None,
    timestep_kind: str | None = None,
    channel_axis: int | None = None,
) -> Routing:
    """Route ``model`` in place by each sample's timestep; returns the handle (``.remove()``).

    With no other argument the adapter for the model's family chooses the modules and the
    timestep location; ``blocks``/``placement``/``timestep_*`` override it or route any model.
    ``channel_axis`` is the axis the mask acts on (default: last for residual, 1 for gate placement).
    """
    sharing_ratio = check_sharing_ratio(sharing_ratio)
    alpha = check_alpha(alpha)
    check_choice(method, "method", METHODS)
    num_tasks = check_int(num_tasks, "num_tasks", minimum=1)
    seed = resolve_seed(seed)
    if placement is not None:
        check_choice(placement, "placement", PLACEMENTS)
    if timestep_kind is not None:
        check_choice(timestep_kind, "timestep_kind", TIMESTEP_KINDS)
    if channel_axis is not None:
        channel_axis = check_channel_axis(channel_axis)
    model = _check_model(model)

    spec = find_adapter(model)
    if spec is None:
        if blocks is None:
            raise ValueError(f"dtr.wrap does not know where to route a {type(model).__name__}: {_HOW_TO}")
        spec = RoutingSpec(blocks=(), placement=placement or "residual")
    overrides = dict(placement=placement, timestep_module=timestep_module, timestep_arg=timestep_arg,
                     timestep_kind=timestep_kind, channel_axis=channel_axis)
    spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    if blocks is not None:
        adapter = "custom" if spec.adapter == "custom" else f"{spec.adapter}, custom blocks"
        spec = dataclasses.replace(spec, blocks=select_modules(model, blocks), adapter=adapter)
    if spec.timestep_kind is None:
        raise ValueError(
            f"dtr.wrap cannot tell what this {type(model).__name__}'s timestep means (a Fourier time embedding takes "
            "a noise level sigma, not a step index): convert sigma to a step index or to [0, 1] yourself and pass "
            f"timestep_kind= (one of {', '.join(map(repr, TIMESTEP_KINDS))}) and, for indices, num_tasks="
        )
    modules = dict(model.named_modules())
    if spec.timestep_module not in modules:
        raise ValueError(f"timestep_module {spec.timestep_module!r} is not a module of {type(model).__name__}")
    return Routing(model, spec, sharing_ratio, alpha, method, num_tasks, seed)


def unwrap(model: nn.Module) -> nn.Module:
    """Remove the routing ``wrap`` added to ``model`` (or to the module it wraps); returns ``model``."""
    routing = routing_of(model)
    if routing is None:
        raise ValueError(f"{type(model).__name__} is not routed by dtr (nothing to unwrap)")
    routing.remove()
    return model


def routing_of(model: nn.Module) -> Routing | None:
    """The Routing handle of a wrapped model (also of its deepcopy, its DDP wrapper or its compiled module), or None."""
    unit = inner_model(model).__dict__.get("_dtr_unit")
    return unit.routing if unit is not None and unit.placement == "call" else None


def inner_model(model: nn.Module) -> nn.Module:
    """The model that ``wrap`` routes, looking through DataParallel/DistributedDataParallel, torch.compile and
    PEFT's ``PeftModel`` (whose forward calls the base model's)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        elif _is_peft(model):
            model = model.get_base_model()
        else:
            return model


def _is_peft(model: nn.Module) -> bool:
    """A peft PeftModel (or subclass), recognised without importing peft."""
    return any(c.__name__ == "PeftModel" and c.__module__.startswith("peft.") for c in type(model).__mro__)


def _is_compiled(model: nn.Module) -> bool:
    return type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod")


def _check_model(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"dtr.wrap expects a torch.nn.Module, got {type(model).__name__}")
    if _is_compiled(model):
        raise TypeError(
            "dtr.wrap got a torch.compile'd module: wrap the original model first, then compile it "
            "(routing = dtr.wrap(model); model = torch.compile(model))"
        )
    model = inner_model(model)
    if "forward" in model.__dict__:  # an instance attribute shadows the routed class's forward
        raise ValueError(
            f"this {type(model).__name__}'s forward was replaced on the instance (accelerate's mixed precision or "
            "another patch), so routing could not see its calls: dtr.wrap the model before accelerator.prepare "
            "(or before patching forward)"
        )
    for name, sub in model.named_modules():
        if "_dtr_unit" in sub.__dict__:
            where = "this model" if not name else f"its submodule {name!r}"
            raise ValueError(f"{where} is already routed by dtr; call dtr.unwrap(...) before wrapping again")
    return model
