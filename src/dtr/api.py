"""``dtr.wrap`` and ``dtr.unwrap``: add routing to a model in place, and take it away."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

from torch import nn

from .adapters import find_adapter
from .masks import resolve_seed
from .mechanism import attached, behaviour_of, detach_all
from .routing import Routing, select_modules
from .spec import PLACEMENTS, TIMESTEP_KINDS, BlockIO, RoutingConfig, RoutingSpec
from .validation import check_channel_axis, check_choice

_HOW_TO = (
    "pass blocks= (a full-match regex on module names such as r'layers\\.\\d+', a list of names, "
    "or a predicate (name, module) -> bool), placement= ('residual' for blocks y = x + F(x), 'gate' to multiply "
    "a module's output on channel axis 1), block_io= when a block's stream is not its first argument or its "
    "output is a tuple, channel_axis= for channels-first blocks, and, unless the model's forward has an argument "
    "named t, timestep or timesteps, timestep_arg= (its name or position) or timestep_module= (dotted name of "
    "the module whose call receives the timestep)"
)


def wrap(
    model: nn.Module,
    sharing_ratio: float = 0.8,
    *,
    alpha: float = 4.0,
    method: str = "dtr",
    num_tasks: int = 1000,
    seed: int | None = 0,
    task_axis: str = "linear",
    blocks: str | Iterable[str] | Callable | None = None,
    placement: str | None = None,
    block_io: BlockIO | Mapping[str, BlockIO] | None = None,
    timestep_module: str | None = None,
    timestep_arg: int | str | None = None,
    timestep_kind: str | None = None,
    channel_axis: int | None = None,
) -> Routing:
    """Route ``model`` in place by each sample's timestep; returns the handle (``.remove()``).

    With no other argument the adapter for the model's family chooses the modules, their streams and the
    timestep location; ``blocks``/``placement``/``block_io``/``timestep_*`` override it or route any model.
    ``channel_axis`` is the axis the mask acts on (default: read from the block's layers, else last for residual
    blocks and 1 for gates).  ``task_axis="logsnr"`` routes a flow model's noise level s to the DDPM task of equal
    log-SNR instead of linearly (see ``dtr.timesteps_to_tasks``).
    """
    config = RoutingConfig(sharing_ratio, alpha, method, num_tasks, resolve_seed(seed), task_axis)
    return wrap_with(
        model,
        config,
        blocks=blocks,
        placement=placement,
        block_io=block_io,
        timestep_module=timestep_module,
        timestep_arg=timestep_arg,
        timestep_kind=timestep_kind,
        channel_axis=channel_axis,
    )


def wrap_with(model: nn.Module, config: RoutingConfig, spec: RoutingSpec | None = None, **where) -> Routing:
    """``dtr.wrap`` with the numbers given as one ``RoutingConfig`` (the recipe and ``wrap_from_config`` use it), and
    where routing acts either as a whole ``RoutingSpec`` (a saved routing) or as ``dtr.wrap``'s keyword arguments."""
    if not isinstance(config, RoutingConfig):
        raise TypeError(f"config must be a dtr.RoutingConfig, got {type(config).__name__}")
    model = _check_model(model)
    if spec is None:
        spec = resolve_spec(model, **where)
    elif where:
        raise TypeError(f"wrap_with takes a RoutingSpec or keyword arguments saying where to route, not both: {where}")
    else:
        spec = check_spec(model, spec)
    return Routing(model, spec, config)


def resolve_spec(
    model: nn.Module,
    blocks=None,
    placement=None,
    block_io=None,
    timestep_module=None,
    timestep_arg=None,
    timestep_kind=None,
    channel_axis=None,
) -> RoutingSpec:
    """The adapter's spec for ``model`` with ``dtr.wrap``'s overrides applied, checked."""
    if placement is not None:
        check_choice(placement, "placement", PLACEMENTS)
    if timestep_kind is not None:
        check_choice(timestep_kind, "timestep_kind", TIMESTEP_KINDS)
    if channel_axis is not None:
        channel_axis = check_channel_axis(channel_axis)
    if timestep_module is not None and not isinstance(timestep_module, str):
        raise TypeError(f"timestep_module must be a dotted module name, got {type(timestep_module).__name__}")
    spec = find_adapter(model)
    if spec is None:
        if blocks is None:
            raise ValueError(f"dtr.wrap does not know where to route a {type(model).__name__}: {_HOW_TO}")
        spec = RoutingSpec(blocks=(), placement=placement or "residual", timestep_arg=None)
    overrides = dict(
        placement=placement, timestep_module=timestep_module, timestep_arg=timestep_arg, timestep_kind=timestep_kind
    )
    spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    if blocks is not None:
        adapter = "custom" if spec.adapter == "custom" else f"{spec.adapter}, custom blocks"
        spec = dataclasses.replace(spec, blocks=select_modules(model, blocks), adapter=adapter)
    modules = dict(model.named_modules())
    _check_blocks(model, spec, modules)
    spec = dataclasses.replace(spec, io=_block_io(spec, [modules[b] for b in spec.blocks], block_io, channel_axis))
    return check_spec(model, spec)


def check_spec(model: nn.Module, spec: RoutingSpec) -> RoutingSpec:
    """``spec`` checked against ``model``: its modules exist, there is at least one, the timestep's meaning is known."""
    modules = dict(model.named_modules())
    _check_blocks(model, spec, modules)
    if spec.timestep_module and spec.timestep_module not in modules:
        raise ValueError(f"timestep_module {spec.timestep_module!r} is not a module of {type(model).__name__}")
    if spec.timestep_kind is None:
        raise ValueError(
            f"dtr.wrap cannot tell what this {type(model).__name__}'s timestep means"
            + (f" ({spec.note})" if spec.note else "")
            + f": pass timestep_kind= (one of {', '.join(map(repr, TIMESTEP_KINDS))}) and, for indices, num_tasks="
        )
    return spec


def _check_blocks(model: nn.Module, spec: RoutingSpec, modules: dict) -> None:
    if not spec.blocks:
        raise ValueError(
            f"dtr.wrap found no module to route in this {type(model).__name__} ({spec.adapter} adapter): routing "
            f"nothing would change nothing; {_HOW_TO}"
        )
    missing = [b for b in spec.blocks if b not in modules]
    if missing:
        raise ValueError(f"blocks names not found in {type(model).__name__}: {missing}")


def _block_io(spec: RoutingSpec, blocks: list[nn.Module], block_io, channel_axis: int | None) -> dict:
    """Per block class, the BlockIO to use: the adapter's, replaced by ``block_io=``, with ``channel_axis=``."""
    classes = {type(b).__name__ for b in blocks}
    io = {type(b).__name__: spec.io_for(b) for b in blocks}
    if isinstance(block_io, BlockIO):
        io = dict.fromkeys(classes, block_io)
    elif block_io is not None:
        if not isinstance(block_io, Mapping) or not all(isinstance(v, BlockIO) for v in block_io.values()):
            raise TypeError("block_io must be a dtr.BlockIO or a dict {block class name: dtr.BlockIO}")
        unknown = sorted(set(block_io) - classes)
        if unknown:
            raise ValueError(f"block_io names classes that are not routed blocks: {unknown}; routed: {sorted(classes)}")
        io.update(block_io)
    if channel_axis is not None:
        io = {name: dataclasses.replace(v, channel_axis=channel_axis) for name, v in io.items()}
    return {name: v for name, v in io.items() if v != BlockIO()}


def unwrap(model: nn.Module) -> nn.Module:
    """Remove the routing ``wrap`` added to ``model`` (or to the module it wraps); returns ``model``.

    A module that only carries the routing of a model it was saved or copied without (``torch.save`` of one block)
    runs as a plain module already: unwrapping it takes that leftover away.
    """
    inner = inner_model(model)
    behaviour = behaviour_of(inner)
    if behaviour is not None and not behaviour.live:
        detach_all([m for m in inner.modules() if behaviour_of(m) is not None and not behaviour_of(m).live])
        return model
    routing = routing_of(model)
    if routing is None:
        raise ValueError(f"{type(model).__name__} is not routed by dtr (nothing to unwrap)")
    if routing.model is not inner:
        raise ValueError(
            f"this {type(inner).__name__} is a shallow copy (copy.copy) of a routed model and shares its modules "
            "with it: routing belongs to the model dtr.wrap routed. Unwrap that one (which unroutes the copy too), or "
            "make an independent routed copy with copy.deepcopy"
        )
    routing.remove()
    return model


def routing_of(model: nn.Module) -> Routing | None:
    """The Routing handle of a wrapped model (also of its deepcopy, its DDP wrapper or its compiled module), or None."""
    inner = inner_model(model)
    if not attached(inner):
        return None
    return getattr(behaviour_of(inner), "routing", None)


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
    for name, sub in model.named_modules():
        if attached(sub):
            where = "this model" if not name else f"its submodule {name!r}"
            raise ValueError(f"{where} is already routed by dtr; call dtr.unwrap(...) before wrapping again")
    return model
