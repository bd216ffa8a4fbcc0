"""``dtr.wrap`` and ``dtr.unwrap``: add routing to a model in place, and take it away."""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from .adapters import find_adapter
from .routing import (
    METHODS,
    PLACEMENTS,
    TIMESTEP_KINDS,
    Routing,
    RoutingSpec,
    _check_alpha,
    _check_choice,
    _check_positive_int,
    _check_sharing_ratio,
    _resolve_seed,
    select_modules,
)

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
) -> Routing:
    """Route ``model`` in place by each sample's timestep; returns the handle (``.remove()``).

    With no other argument the adapter for the model's family chooses the modules and the
    timestep location; ``blocks``/``placement``/``timestep_*`` override it or route any model.
    """
    sharing_ratio = _check_sharing_ratio(sharing_ratio)
    alpha = _check_alpha(alpha)
    _check_choice(method, "method", METHODS)
    num_tasks = _check_positive_int(num_tasks, "num_tasks")
    seed = _resolve_seed(seed)
    if placement is not None:
        _check_choice(placement, "placement", PLACEMENTS)
    if timestep_kind is not None:
        _check_choice(timestep_kind, "timestep_kind", TIMESTEP_KINDS)
    model = _check_model(model)

    spec = find_adapter(model)
    if spec is None:
        if blocks is None:
            raise ValueError(f"dtr.wrap does not know where to route a {type(model).__name__}: {_HOW_TO}")
        spec = RoutingSpec(blocks=[], placement=placement or "residual")
    if blocks is not None:
        spec.blocks = select_modules(model, blocks)
        spec.adapter = f"{spec.adapter}, custom blocks" if spec.adapter != "custom" else "custom"
    if placement is not None:
        spec.placement = placement
    if timestep_module is not None:
        spec.timestep_module = timestep_module
    if timestep_arg is not None:
        spec.timestep_arg = timestep_arg
    if timestep_kind is not None:
        spec.timestep_kind = timestep_kind
    modules = dict(model.named_modules())
    if spec.timestep_module not in modules:
        raise ValueError(f"timestep_module {spec.timestep_module!r} is not a module of {type(model).__name__}")
    for name in spec.exit_modules:
        if name not in modules:
            raise ValueError(f"exit module {name!r} is not a module of {type(model).__name__}")
    routing = Routing(model, spec, sharing_ratio, alpha, method, num_tasks, seed)
    model._dtr_routing = routing
    return routing


def unwrap(model: nn.Module) -> nn.Module:
    """Remove the routing ``wrap`` added to ``model`` (or to the module it wraps); returns the model."""
    inner = getattr(model, "module", model) if _is_parallel(model) else model
    routing = getattr(inner, "_dtr_routing", None)
    if routing is None:
        raise ValueError(f"{type(model).__name__} is not routed by dtr (nothing to unwrap)")
    routing.remove()
    return model


def routing_of(model: nn.Module) -> Routing | None:
    """The Routing handle of a wrapped model (also of its deepcopy), or None."""
    inner = getattr(model, "module", model) if _is_parallel(model) else model
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile'd after wrapping
    return getattr(inner, "_dtr_routing", None)


def _is_parallel(model: nn.Module) -> bool:
    return isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))


def _check_model(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"dtr.wrap expects a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise TypeError(
            "dtr.wrap got a torch.compile'd module: wrap the original model first, then compile it "
            "(routing = dtr.wrap(model); model = torch.compile(model))"
        )
    if _is_parallel(model):
        model = model.module
    for name, sub in model.named_modules():
        if getattr(sub, "_dtr_routing", None) is not None:
            where = "this model" if not name else f"its submodule {name!r}"
            raise ValueError(f"{where} is already routed by dtr; call dtr.unwrap(...) before wrapping again")
    return model
