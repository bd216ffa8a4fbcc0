"""The recipe's tests (examples/dit): its modules import each other by plain name, as its scripts do.

Helpers shared by these tests live in recipe_helpers.py and the independent references in recipe_reference.py;
both are imported by name, so this folder goes on sys.path too (whatever pytest's import mode).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES_DIT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples", "dit")
for path in (HERE, EXAMPLES_DIT):
    if path not in sys.path:
        sys.path.insert(0, path)
