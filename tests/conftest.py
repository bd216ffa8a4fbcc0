"""Shared test set-up: the DiT recipe in examples/dit is imported the way its scripts import it."""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES_DIT = os.path.join(ROOT, "examples", "dit")
if EXAMPLES_DIT not in sys.path:
    sys.path.insert(0, EXAMPLES_DIT)

# Two cores: keep intra-op threads fixed so timings and results do not depend on the host.
torch.set_num_threads(1)
