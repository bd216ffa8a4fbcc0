"""dtr.weighting for flow matching: the flow SNR and the paper's weightings written for the velocity target.

The path is ``x_s = (1 - s) * x0 + s * eps`` with velocity ``v = eps - x0``; a model's velocity prediction
``v_hat`` is the epsilon prediction ``eps_hat = x_s + (1 - s) * v_hat``. Each flow weight must be the epsilon
objective of the paper: ``w_flow * |v - v_hat|^2 == w_eps * |eps - eps_hat|^2`` for every s.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtr.weighting import LossWeighting, flow_snr, min_snr_weight, p2_weight

FAST = settings(max_examples=80, deadline=None)


# --------------------------------------------------------------------------- flow_snr


def test_flow_snr_closed_form_and_ends():
    s = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    expected = [math.inf, 81.0, 9.0, 1.0, 1 / 9, 0.0]
    np.testing.assert_allclose(flow_snr(s).numpy(), expected, rtol=1e-15)
    half = flow_snr(torch.tensor([0.5, 0.0, 1.0], dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.tolist() == [1.0, math.inf, 0.0]
    assert flow_snr(torch.tensor(0.5)).shape == ()
    assert flow_snr(torch.zeros(0)).shape == (0,)


@FAST
@given(s=st.floats(0.0, 1.0))
def test_flow_snr_is_signal_over_noise_variance(s):
    # x_s = (1 - s) x0 + s eps: signal amplitude 1 - s, noise amplitude s
    snr = flow_snr(torch.tensor([s], dtype=torch.float64)).item()
    if s == 0:
        assert snr == math.inf
    else:
        ratio = (1 - s) / s
        assert snr == pytest.approx(ratio * ratio, rel=1e-14)  # inf where the square overflows float64


@pytest.mark.parametrize("bad", [[-0.1], [1.0 + 1e-7], [float("nan")], [0.5, 2.0], [-math.inf]])
def test_flow_snr_rejects_levels_outside_unit_interval(bad):
    with pytest.raises(ValueError, match=r"s must hold noise levels in \[0, 1\]"):
        flow_snr(torch.tensor(bad, dtype=torch.float64))


def test_flow_snr_rejects_non_tensors():
    with pytest.raises(TypeError, match="s must be a torch.Tensor"):
        flow_snr(0.5)
    with pytest.raises(TypeError, match="s must be a floating-point tensor"):
        flow_snr(torch.tensor([0, 1]))


# --------------------------------------------------------------------------- the weight identity


def eps_weight(kind, snr, gamma, k):
    """The paper's epsilon-loss weights, written out: Min-SNR min(SNR, gamma) / SNR, P2 1 / (k + SNR) ** gamma."""
    if kind == "min_snr":
        return min(snr, gamma) / snr if snr > 0 else 1.0  # min(SNR, gamma) / SNR -> 1 as SNR -> 0
    return (k + snr) ** -gamma


def flow_weight(kind, snr, gamma, k):
    if kind == "min_snr":
        return min_snr_weight(torch.tensor([snr], dtype=torch.float64), gamma, "flow").item()
    return p2_weight(torch.tensor([snr], dtype=torch.float64), gamma, k, prediction="flow").item()


@FAST
@given(
    s=st.floats(0.0, 1.0, exclude_max=True),
    kind=st.sampled_from(["min_snr", "p2"]),
    gamma=st.floats(0.05, 20.0),
    k=st.floats(0.01, 10.0),
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(7,), (2, 3, 4)]),
)
def test_flow_weight_is_the_epsilon_objective_for_velocity(s, kind, gamma, k, seed, shape):
    gen = torch.Generator().manual_seed(seed)
    x0, eps, eps_hat = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    x_s = (1 - s) * x0 + s * eps
    v = eps - x0
    v_hat = (eps_hat - x_s) / (1 - s)  # the same prediction as eps_hat, as a velocity
    ratio = (1 - s) / s if s > 0 else math.inf
    snr = ratio * ratio  # (1 - s)^2 / s^2, inf where it overflows float64
    lhs = flow_weight(kind, snr, gamma, k) * torch.sum((v - v_hat) ** 2).item()
    rhs = eps_weight(kind, snr, gamma, k) * torch.sum((eps - eps_hat) ** 2).item()
    assert lhs == pytest.approx(rhs, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("kind", ["min_snr", "p2"])
def test_flow_weights_at_the_ends(kind):
    """s = 0 (SNR = inf): the epsilon weight is 0 (Min-SNR gamma / inf; P2 1 / inf), so is the flow weight.
    s = 1 (SNR = 0): eps_hat = x_s + 0 * v_hat = eps whatever v_hat is, so the epsilon loss is 0: weight 0."""
    snr = torch.tensor([math.inf, 0.0], dtype=torch.float64)
    w = LossWeighting(kind).weight(snr, "flow")
    assert w.tolist() == [0.0, 0.0]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # no NaN anywhere on [0, 1] in low precision
        w = LossWeighting(kind).weight(flow_snr(torch.linspace(0, 1, 1001, dtype=dtype)), "flow")
        assert torch.isfinite(w).all() and (w >= 0).all() and w[0] == 0 and w[-1] == 0


def test_flow_weight_closed_forms():
    s = torch.tensor([0.1, 0.25, 0.5, 0.75], dtype=torch.float64)
    snr = flow_snr(s)  # 81, 9, 1, 1/9
    # Min-SNR-5: min(SNR, 5) * s^2
    np.testing.assert_allclose(min_snr_weight(snr, 5.0, "flow").numpy(), [0.05, 5 / 16, 0.25, 1 / 16], rtol=1e-14)
    # P2 (gamma 1, k 1): (1 - s)^2 / (1 + SNR)
    np.testing.assert_allclose(
        p2_weight(snr, prediction="flow").numpy(), [0.81 / 82, 0.5625 / 10, 0.125, 0.0625 / (10 / 9)], rtol=1e-14
    )


@FAST
@given(
    kind=st.sampled_from(["constant", "min_snr", "p2", "uw"]),
    prediction=st.sampled_from(["epsilon", "v", "x0", "flow"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_loss_weighting_flow_dispatch(kind, prediction, dtype):
    snr = flow_snr(torch.linspace(0, 1, 101, dtype=dtype))
    w = LossWeighting(kind).weight(snr, prediction)
    if kind in ("constant", "uw"):
        assert torch.equal(w, torch.ones_like(snr))  # the plain velocity loss (SiT's default) for flow
    elif kind == "min_snr":
        assert torch.equal(w, min_snr_weight(snr, 5.0, prediction))
    else:  # P2 on epsilon, v and x0 is the paper code's target-independent weight, unchanged
        assert torch.equal(w, p2_weight(snr, 1.0, 1.0, "flow" if prediction == "flow" else "epsilon"))


def test_p2_default_prediction_is_todays_weight():
    snr = torch.tensor([0.0, 0.3, 1.0, 7.0, math.inf], dtype=torch.float64)
    assert torch.equal(p2_weight(snr, 0.5, 2.0), torch.pow(2.0 + snr, -0.5))
    assert torch.equal(p2_weight(snr, 0.5, 2.0, prediction="epsilon"), torch.pow(2.0 + snr, -0.5))


def test_flow_weight_validation():
    snr = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="prediction must be one of 'epsilon', 'flow'"):
        p2_weight(snr, prediction="v")
    with pytest.raises(ValueError, match="prediction must be one of 'epsilon', 'v', 'x0', 'flow'"):
        min_snr_weight(snr, prediction="velocity")
    for bad in ([-1.0], [float("nan")]):
        with pytest.raises(ValueError, match="snr must be >= 0"):
            min_snr_weight(torch.tensor(bad), prediction="flow")
        with pytest.raises(ValueError, match="snr must be >= 0"):
            LossWeighting("p2").weight(torch.tensor(bad), "flow")
