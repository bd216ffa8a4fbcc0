"""The few PyTorch APIs dtr uses that need care across the versions it supports (torch >= 2.8), in one place."""

from __future__ import annotations

import sys

import torch
import torch.compiler


def assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing TorchDynamo at ``import dtr`` (1-2 s).

    The public API imports ``torch._dynamo`` and then only sets this marker on ``fn`` (torch 2.1 through 2.14);
    tests/test_compile.py checks that the two agree, so a torch that changes the marker fails a test, not a user.
    """
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


__all__ = ["assume_constant_result"]
