"""What dtr keeps for what earlier versions wrote, in one place: their saved routings, read into this version's
values, and the names their whole-model pickles refer to, which say how to carry such a model over.

Saved routings: dtr 0.3 wrote a flat record (``format_version`` 3: the numbers and the spec's fields side by side
under ``routing``) in ``config.json``; dtr 0.2 (format 1) and the 0.3 development line (format 2) wrote the same
flat dict to ``dtr_config.json`` beside the weights; a 0.3 ``Routing.config`` is that flat dict too.  Format 1 had
no ``io``, kept ``channel_axis`` at the top and could list candidate timestep arguments: those are left for the
model at hand to resolve (the dict ``upgrade`` returns beside the two values).
"""

from __future__ import annotations

from typing import Any

from .spec import RoutingConfig, RoutingSpec

RECORD_FORMATS = (3,)  # dtr_routing records in config.json this version reads besides its own
FILE_FORMATS = (1, 2)  # dtr_config.json beside the weights: dtr 0.2 (1) and the 0.3 development line (2)
# dtr 0.2 tried these in order, by position or name, when nothing else was said (a saved format 1 list).
V02_DEFAULT_TIMESTEP_ARG = (1, "t", "timestep", "timesteps")

_NUMBERS = ("sharing_ratio", "alpha", "method", "num_tasks", "seed")
_PLACES = ("blocks", "placement", "timestep_module", "timestep_arg", "timestep_kind")
_OPTIONAL = ("io", "channel_axis", "adapter")


def upgrade(record: Any, version: int, where: str) -> tuple[RoutingConfig, RoutingSpec, dict]:
    """A ``dtr_routing`` record of dtr 0.3 (format 3) as (config, spec, left for the model)."""
    unknown = sorted(set(record) - {"load_with", "format_version", "dtr_version", "routing"})
    if unknown or "routing" not in record:
        key = unknown[0] if unknown else "routing"
        raise ValueError(f"{where}: key 'dtr_routing.{key}' is {'missing' if not unknown else 'not one dtr 0.3 wrote'}")
    return _from_flat(record["routing"], where, "dtr_routing.routing", format1=False)


def upgrade_file(data: Any, where: str) -> tuple[RoutingConfig, RoutingSpec, dict]:
    """A ``dtr_config.json`` of dtr 0.2 (format 1) or of the 0.3 development line (format 2)."""
    _check_object(data, where, None)
    version = data.get("format_version")
    if version not in FILE_FORMATS:
        raise ValueError(
            f"{where}: key 'format_version' is {version!r}, and this dtr reads format_version "
            f"{' or '.join(map(str, FILE_FORMATS))} in dtr_config.json (written by dtr "
            f"{data.get('dtr_version', '?')}): install a dtr that reads it"
        )
    flat = {k: v for k, v in data.items() if k not in ("format_version", "dtr_version")}
    return _from_flat(flat, where, None, format1=version == 1)


def upgrade_flat(data: Any, where: str) -> tuple[RoutingConfig, RoutingSpec, dict]:
    """A ``Routing.config`` dict of dtr 0.3 (the numbers and the spec's fields side by side)."""
    return _from_flat(data, where, None, format1=False)


def _from_flat(flat: Any, where: str, prefix: str | None, format1: bool) -> tuple[RoutingConfig, RoutingSpec, dict]:
    _check_object(flat, where, prefix)
    missing = [k for k in _NUMBERS + _PLACES if k not in flat]
    if missing:
        raise ValueError(f"{where}: key {_dotted(prefix, missing[0])!r} is missing (dtr 0.2/0.3 routings have it)")
    unknown = sorted(k for k in flat if k not in _NUMBERS + _PLACES + _OPTIONAL)
    if unknown:
        raise ValueError(f"{where}: key {_dotted(prefix, unknown[0])!r} is not one dtr 0.2/0.3 wrote")
    extra: dict = {}
    arg = flat["timestep_arg"]
    if format1 and isinstance(arg, list):  # names and positions tried in order: the model at hand decides
        if not all((isinstance(a, str) and a) or (isinstance(a, int) and not isinstance(a, bool)) for a in arg):
            raise ValueError(
                f"{where}: key {_dotted(prefix, 'timestep_arg')!r}: must list argument names or positions, got {arg!r}"
            )
        extra["timestep_args"], arg = tuple(arg), None
    axis = flat.get("channel_axis")
    if axis is not None:
        if isinstance(axis, bool) or not isinstance(axis, int) or axis == 0:
            raise ValueError(
                f"{where}: key {_dotted(prefix, 'channel_axis')!r}: must be a non-zero int (an axis other than the "
                f"batch axis) or null, got {axis!r}"
            )
        extra["channel_axis"] = axis
    adapter = flat.get("adapter", "custom")
    config = RoutingConfig.from_dict({k: flat[k] for k in _NUMBERS}, f"{where}: key {prefix or 'the file'!r}")
    spec = RoutingSpec.from_dict(
        {
            "blocks": flat["blocks"],
            "placement": flat["placement"],
            "io": flat.get("io") or {},
            "timestep_module": flat["timestep_module"] or "",
            "timestep_arg": arg,
            "timestep_kind": flat["timestep_kind"],
            "adapter": adapter if isinstance(adapter, str) else "custom",
        },
        f"{where}: key {prefix or 'the file'!r}",
    )
    return config, spec, extra


def _dotted(prefix: str | None, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _check_object(data: Any, where: str, prefix: str | None) -> None:
    if not isinstance(data, dict):
        what = f"key {prefix!r}" if prefix else "the file"
        raise ValueError(f"{where}: {what} must be a JSON object, got {type(data).__name__} {data!r:.80}")


#################################################################################
#                        Whole-model pickles of earlier dtr                      #
#################################################################################

_CARRY_OVER = (
    "load it with dtr {v}, save model.state_dict() (routing adds no keys), then build the model, load_state_dict "
    "and dtr.wrap it"
)

# Names of the hook methods whole-model pickles of dtr 0.1 refer to (see Routing.__getattr__).
V01_HOOKS = frozenset(
    {"_capture", "_release", "_residual_pre", "_residual_post", "_gate", "_anchor_pre", "_anchor_post"}
)


def unpickle_hooks_01() -> None:
    raise RuntimeError(
        "this model was pickled whole by dtr 0.1, whose forward hooks this dtr no longer has: "
        + _CARRY_OVER.format(v="0.1")
    )


def unpickle_routed_02(*args) -> None:
    raise RuntimeError(
        "this model was pickled whole by dtr 0.2, whose routing objects this dtr cannot rebuild: "
        + _CARRY_OVER.format(v="0.2")
    )


def unpickle_routed_03(*args) -> None:
    raise RuntimeError(
        "this model was pickled whole by dtr 0.3, whose routed classes this dtr no longer makes: "
        + _CARRY_OVER.format(v="0.3")
    )
