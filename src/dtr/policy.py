"""What routing does differently eagerly, under torch.compile, under torch.func and without autograd: the mode a
routed call runs in is asked once (``mode()``), and every decision that depends on it is a table here, so that one
page says all of it.

- Eager with autograd (GRAD): fused autograd Functions (one backward pass for the mask and the add-back), masks
  built once per call and width, checkpoint regions looked up (a region may be recorded or recomputed).
- torch.func transforms active (TRANSFORMS): autograd Functions of the ``setup_context`` style, which the transforms
  need (4x dearer per call, so only then); timestep values checked on the tensors the transforms wrap.
- Eager without autograd (NO_GRAD): plain tensor ops (no graph to build), masks cached per call, the masked input
  handed to the block without a reference kept (it can be freed as soon as the block drops it).
- torch.compile (COMPILING, TorchDynamo tracing): plain tensor ops that inductor fuses and differentiates; masks
  built inline (a cache write inside a checkpointed region is a side effect TorchDynamo cannot trace); window tables
  are constants of the graph; timesteps checked by a device assert; checkpoint regions never looked up (compiled
  graphs recompute their own regions, and modules compiled on their own are entered through an eager step that
  looks).
"""

from __future__ import annotations

import torch
from torch.compiler import is_compiling

GRAD, TRANSFORMS, NO_GRAD, COMPILING = "grad", "transforms", "no_grad", "compiling"
FUSED, TRANSFORMABLE, PLAIN = "fused", "transformable", "plain"


def mode() -> str:
    """The mode of the routed call running now (asked once per routed module call)."""
    if is_compiling():
        return COMPILING
    if not torch.is_grad_enabled():
        return NO_GRAD
    if torch._C._are_functorch_transforms_active():
        return TRANSFORMS
    return GRAD


# How the residual placement computes block(m * x) + (1 - m) * x in each mode.
RESIDUAL_OPS = {GRAD: FUSED, TRANSFORMS: TRANSFORMABLE, NO_GRAD: PLAIN, COMPILING: PLAIN}
# Modes that keep a call's masks for the rest of the call, and hand the masked input over without a reference.
EAGER = frozenset({GRAD, TRANSFORMS, NO_GRAD})
# Modes in which a routed module asks which checkpoint region runs even while a call is in progress (a region may be
# recording); in NO_GRAD only where no call is in progress, which is how the no_grad part of a recomputation in the
# backward pass looks; never while COMPILING (TorchDynamo cannot read the region).
CHECKPOINT_ALWAYS = frozenset({GRAD, TRANSFORMS})
CHECKPOINT_WITHOUT_CALL = frozenset({GRAD, TRANSFORMS, NO_GRAD})


def compiling() -> bool:
    """Whether TorchDynamo (torch.compile, torch.export) is tracing this code."""
    return is_compiling()


def tags_recomputation() -> bool:
    """Whether a model call notes the checkpoint region it was opened in (eager autograd), so that a region
    recomputing whole model calls (CFG, self-conditioning) routes each by its own timesteps."""
    return not is_compiling() and torch.is_grad_enabled()


def plain_values(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose values ``t`` stands for: ``t`` itself, or, under torch.func transforms, the tensor they
    wrap (all samples of a vmap), whose values can be read without data-dependent control flow in the transform."""
    if is_compiling():
        return t
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def checks_values_now(t: torch.Tensor) -> bool:
    """Whether a value check may read ``t`` on the host now (eager, CPU), rather than by a device-side assert that
    fails at the next synchronisation (accelerators: no sync on the hot path; compiling: no data-dependent branch)."""
    return not is_compiling() and t.device.type == "cpu"
