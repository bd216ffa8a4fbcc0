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


def flux_sigmas(steps: int = 28, mu: float = 1.15) -> torch.Tensor:
    """The noise levels FluxPipeline samples at (FlowMatchEulerDiscreteScheduler with dynamic shifting; ``mu`` 1.15
    is its value at 1024x1024): linspace(1, 1/steps, steps), shifted as exp(mu) / (exp(mu) + 1/s - 1)."""
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    shift = torch.exp(torch.tensor(mu, dtype=torch.float64))
    return shift / (shift + (1 / s - 1))


def plot_task_axes(path: str, steps: int = 28, mu: float = 1.15, num_tasks: int = 1000) -> dict:
    """Both timestep -> task maps (``task_axis`` "linear" and "logsnr") for a flow model's noise levels s in [0, 1]
    (left), and the tasks Flux's shifted schedule visits with each (right); returns the tasks per step of each map."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("dtr.viz needs matplotlib: pip install 'denoising-task-routing[examples]'") from e
    from .timesteps import timesteps_to_tasks

    s = torch.linspace(0, 1, 501, dtype=torch.float64)
    sigmas = flux_sigmas(steps, mu)
    tasks = {axis: timesteps_to_tasks(sigmas, num_tasks, "unit", axis) for axis in ("linear", "logsnr")}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=150)
    for axis, style in (("linear", "-"), ("logsnr", "--")):
        left.plot(s.numpy(), timesteps_to_tasks(s, num_tasks, "unit", axis).numpy(), style, label=axis)
        right.plot(range(steps), tasks[axis].numpy(), style + "o", markersize=3, label=axis)
    left.set_xlabel("flow noise level s (0 = data)")
    left.set_ylabel(f"task (of {num_tasks}; DDPM index)")
    left.set_title("timestep -> task")
    right.set_xlabel(f"sampling step (FluxPipeline, {steps} steps, shift exp({mu:g}))")
    right.set_ylabel("task")
    right.set_title("tasks Flux's schedule visits")
    for ax in (left, right):
        ax.legend(title="task_axis")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return tasks
