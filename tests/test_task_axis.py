"""``task_axis="logsnr"``: a flow noise level s routes to the DDPM task of equal log-SNR (issue 25).

The map is checked against a brute force written out here (the linear schedule's log-SNR table, the flow path's
log-SNR, the nearest task), on every timestep convention; the default stays the linear map, bit for bit.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dtr

T = 1000


def ddpm_logsnr(num_tasks: int = T) -> np.ndarray:
    """DiT's linear schedule over ``num_tasks`` steps (betas 1e-4 .. 0.02, scaled by 1000 / T), log(abar / (1-abar))."""
    scale = 1000 / num_tasks
    abar = np.cumprod(1 - np.linspace(scale * 1e-4, scale * 0.02, num_tasks))
    return np.log(abar / (1 - abar))


def nearest_tasks(s: np.ndarray, num_tasks: int = T) -> list[set[int]]:
    """For each s, the DDPM task(s) whose log-SNR is nearest to the flow path's, 2 log((1 - s) / s); a near tie
    (within 1e-9) admits both neighbours."""
    table = ddpm_logsnr(num_tasks)
    out = []
    for v in s:
        flow = np.inf if v == 0 else -np.inf if v == 1 else 2 * (np.log1p(-v) - np.log(v))  # no overflow for tiny v
        d = np.abs(table - flow)
        best = d.min()
        out.append({int(i) for i in np.flatnonzero(d <= best + 1e-9)})
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=16))
def test_logsnr_tasks_are_the_nearest_ddpm_task_by_log_snr(levels):
    s = torch.tensor(levels, dtype=torch.float64)
    got = dtr.timesteps_to_tasks(s, T, "unit", "logsnr").tolist()
    for g, want in zip(got, nearest_tasks(s.numpy())):
        assert g in want


@pytest.mark.parametrize("kind", ["unit", "unit_reversed", "index", "index_reversed"])
def test_every_timestep_convention_maps_its_noise_level(kind):
    s = torch.tensor([0.0, 0.01, 0.2, 0.5, 0.77, 0.99, 1.0], dtype=torch.float64)
    value = {"unit": s, "unit_reversed": 1 - s, "index": s * T, "index_reversed": (1 - s) * T}[kind]
    got = dtr.timesteps_to_tasks(value, T, kind, "logsnr")
    assert got.tolist() == dtr.timesteps_to_tasks(s, T, "unit", "logsnr").tolist()
    assert got[0] == 0 and got[-1] == T - 1  # data is task 0, pure noise the last task


def test_snr_one_meets_the_ddpm_task_of_snr_one():
    task = int(dtr.timesteps_to_tasks(torch.tensor(0.5), T, "unit", "logsnr"))
    assert task == int(np.abs(ddpm_logsnr()).argmin())


def test_the_linear_axis_is_the_default_and_unchanged():
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(dtr.timesteps_to_tasks(s, T, "unit"), torch.round(s * (T - 1)).long())
    assert dtr.RoutingConfig().task_axis == "linear"
    with pytest.raises(ValueError, match="task_axis must be one of 'linear', 'logsnr'; got 'snr'"):
        dtr.wrap(nn.Linear(2, 2), task_axis="snr")


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16))

    def forward(self, x):
        return x + self.inner(x)


class Flow(nn.Module):
    """A flow-matching model on tokens, timestep = s in [0, 1] (0 = data)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Residual() for _ in range(2)])

    def forward(self, x, timestep):
        for block in self.blocks:
            x = block(x)
        return x


def flow_model():
    return Flow()


@pytest.mark.parametrize("compiled", [False, True])
def test_a_flow_model_routed_on_the_logsnr_axis(compiled):
    model = flow_model()
    routing = dtr.wrap(model, sharing_ratio=0.5, task_axis="logsnr", timestep_kind="unit", blocks=r"blocks\.\d")
    assert "task_axis=logsnr" in routing.summary()
    x, s = torch.randn(3, 5, 16), torch.tensor([0.05, 0.5, 0.93])
    tasks = dtr.timesteps_to_tasks(s, T, "unit", "logsnr")
    m = dtr.task_masks(T, 16, 0.5, 4.0)[tasks].float()[:, None, :]
    want = x
    for block in model.blocks:
        want = (m * want + block.inner(m * want)) + (1 - m) * want
    run = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=compiled) if compiled else model
    with torch.no_grad():
        torch.testing.assert_close(run(x, s), want, rtol=1e-5, atol=1e-6)
        linear = dtr.timesteps_to_tasks(s, T, "unit")
        assert not torch.equal(tasks, linear)  # the two axes route these levels differently


def test_task_axis_is_saved_and_loaded_with_the_routing():
    model = flow_model()
    routing = dtr.wrap(model, task_axis="logsnr", timestep_kind="unit", blocks=r"blocks\.\d")
    data = json.loads(json.dumps(routing.to_dict()))
    assert data["config"]["task_axis"] == "logsnr"
    copy_ = flow_model()
    assert dtr.wrap_from_config(copy_, data).config.task_axis == "logsnr"


def test_the_command_line_draws_both_maps(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "dtr", "task-axes", "--steps", "8", "--out", str(tmp_path / "a.png")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a.png").stat().st_size > 1000 and "linear:" in r.stdout and "logsnr:" in r.stdout
