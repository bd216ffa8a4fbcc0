"""Pictures of the task masks: which channels each denoising task activates (needs matplotlib)."""

from __future__ import annotations

import torch

from .masks import task_masks


def plot_masks(
    path: str,
    channels: int = 1152,
    sharing_ratio: float = 0.8,
    alpha: float = 4.0,
    num_tasks: int = 1000,
    method: str = "dtr",
    seed: int | None = 0,
    title: str | None = None,
) -> torch.Tensor:
    """Render the (T, C) mask table as a PNG (tasks down, channels across; active = dark); returns the masks."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # matplotlib is an optional dependency of the library
        raise ImportError("dtr.viz needs matplotlib: pip install 'denoising-task-routing[examples]'") from e
    masks = task_masks(num_tasks, channels, sharing_ratio, alpha, method, seed)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=150)
    ax.imshow(masks.numpy(), aspect="auto", cmap="Greys", interpolation="nearest")
    ax.set_xlabel("channel")
    ax.set_ylabel("task t (0 = least noise)")
    active = int(masks[0].sum())
    ax.set_title(title or f"{method} masks: C={channels}, {active} active ({sharing_ratio:g}), alpha={alpha:g}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return masks
