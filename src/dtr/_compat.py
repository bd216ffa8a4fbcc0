"""The few PyTorch APIs dtr uses that moved or appeared after the oldest torch it supports, in one place."""

from __future__ import annotations

import torch

try:  # torch >= 2.3
    from torch.compiler import is_compiling
except ImportError:  # torch 2.1-2.2
    from torch._dynamo import is_compiling  # type: ignore[no-redef]

try:  # torch >= 2.1
    from torch.compiler import assume_constant_result
except ImportError:
    from torch._dynamo import assume_constant_result  # type: ignore[no-redef]

__all__ = ["assume_constant_result", "is_compiling"]
