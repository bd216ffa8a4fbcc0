"""Shared test set-up for every test: fixed threads and the `cuda` marker.  The library's tests need nothing but
`src/` (their small models are in tests/helpers.py); tests/recipe and tests/examples put their folders on the path."""

import torch

# Two cores: keep intra-op threads fixed so timings and results do not depend on the host.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are deselected, not skipped, without a GPU: a CPU run neither runs nor counts them."""
    if torch.cuda.is_available():
        return
    cuda = [item for item in items if item.get_closest_marker("cuda")]
    if cuda:
        config.hook.pytest_deselected(items=cuda)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]
