"""One way to find a module's argument in its calls: declared by name or position, located once in ``forward``'s
signature, read from (and replaced in) each call's ``args`` and ``kwargs``.  The timestep, a block's stream, a
joined stream's valid-token mask and the image-token count are all arguments found this way; every error about one
names it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclass(frozen=True)
class Argument:
    """An argument of a ``forward``: its keyword and its position (either may be None)."""

    name: str | None
    position: int | None
    owner: str  # "DiT.forward", for messages
    role: str = "timestep"  # what the argument is, for messages

    def describe(self) -> str:
        parts = [repr(self.name)] if self.name is not None else []
        if self.position is not None:
            parts.append(f"position {self.position}")
        return f"argument {' at '.join(parts)} of {self.owner}"

    def find(self, args: tuple, kwargs: dict) -> tuple[Any, str | int | None]:
        """(value, where: its keyword or position), or (None, None) when the call does not pass it."""
        if self.name is not None and self.name in kwargs:
            return kwargs[self.name], self.name
        if self.position is not None and self.position < len(args):
            return args[self.position], self.position
        return None, None

    def read(self, args: tuple, kwargs: dict, hint: str = "") -> Any:
        """The argument's value in a call; an error names it when the call does not pass it."""
        value, where = self.find(args, kwargs)
        if where is None:
            raise ValueError(
                f"dtr: no {self.role} argument in this call of {self.owner}: dtr reads {self.describe()}, and the "
                f"call had {len(args)} positional arguments and keywords {sorted(kwargs)}{hint}"
            )
        return value


def replaced(args: tuple, kwargs: dict, where: str | int, value: Any) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with the argument at ``where`` (a keyword or a position) set to ``value``."""
    if isinstance(where, str):
        return args, {**kwargs, where: value}
    return (*args[:where], value, *args[where + 1 :]), kwargs


def parameters(forward: Callable) -> list[inspect.Parameter] | None:
    """The parameters of an unbound ``forward`` without ``self``, or None when it has no readable signature."""
    try:
        return list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None


def locate(forward: Callable, arg: str | int, owner: str, role: str) -> Argument:
    """``arg`` (a name or a position) located in an unbound ``forward``'s signature, found by either in calls."""
    params = parameters(forward)
    if params is None:  # no signature (a builtin): take the argument as given
        return Argument(arg if isinstance(arg, str) else None, arg if isinstance(arg, int) else None, owner, role)
    positional = [p for p in params if p.kind in _POSITIONAL]
    if isinstance(arg, int):
        keyword = arg < len(positional) and positional[arg].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        return Argument(positional[arg].name if keyword else None, arg, owner, role)
    names = [p.name for p in positional]
    return Argument(arg, names.index(arg) if arg in names else None, owner, role)


def positional_names(params: list[inspect.Parameter]) -> list[str]:
    return [p.name for p in params if p.kind in _POSITIONAL]
