"""Tests for dtr.weighting: loss weightings, ANT uncertainty weighting, intervals and clustering."""

import dataclasses
import itertools
import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtr.weighting import (
    LossWeighting,
    StratifiedTimestepSampler,
    UncertaintyWeighting,
    _snr_cost_by_end,
    cluster_intervals,
    interval_index,
    min_snr_weight,
    p2_weight,
    parse_loss_weight_type,
    snr_from_alphas_cumprod,
    snr_intervals,
    uniform_intervals,
)

FAST = settings(max_examples=60, deadline=None)


# --------------------------------------------------------------------------- schedules (as in ADM / DiT)


def linear_alphas_cumprod(T=1000):
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, T, dtype=np.float64))


def cosine_alphas_cumprod(T=1000, max_beta=0.999):
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)])
    return np.cumprod(1.0 - betas)


SCHEDULES = {"linear": linear_alphas_cumprod(), "cosine": cosine_alphas_cumprod()}


# --------------------------------------------------------------------------- SNR and closed forms


def test_snr_from_alphas_cumprod_numpy_and_torch():
    a = np.array([0.9999, 0.5, 0.2, 1e-6])
    expected = a / (1 - a)
    out = snr_from_alphas_cumprod(a)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, expected, rtol=1e-15)
    np.testing.assert_allclose(snr_from_alphas_cumprod([0.5, 0.2]), [1.0, 0.25])
    a32 = torch.tensor(a, dtype=torch.float32)
    t = snr_from_alphas_cumprod(a32)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    a64 = a32.double()  # float32 keeps 1 - a exact here, so only the input rounding matters
    np.testing.assert_allclose(t.numpy(), (a64 / (1 - a64)).numpy(), rtol=1e-6)
    assert snr_from_alphas_cumprod(torch.tensor(a)).dtype == torch.float64
    with pytest.raises(TypeError, match="alphas_cumprod"):
        snr_from_alphas_cumprod(torch.tensor([1, 0]))
    with pytest.raises(TypeError, match="alphas_cumprod"):
        snr_from_alphas_cumprod("0.5")


def test_snr_matches_paper_formulas():
    # DTR code: P2 uses 1 / (1 - a) - 1, Min-SNR uses (sqrt(a) / sqrt(1 - a)) ** 2.
    a = SCHEDULES["linear"]
    snr = snr_from_alphas_cumprod(a)
    np.testing.assert_allclose(snr, 1.0 / (1 - a) - 1, rtol=1e-9)
    np.testing.assert_allclose(snr, (np.sqrt(a) / np.sqrt(1 - a)) ** 2, rtol=1e-12)


SNR_VALUES = torch.tensor([0.1, 1.0, 5.0, 10.0, 100.0], dtype=torch.float64)


def test_min_snr_closed_forms():
    g = 5.0
    eps = min_snr_weight(SNR_VALUES, g, "epsilon")
    v = min_snr_weight(SNR_VALUES, g, "v")
    x0 = min_snr_weight(SNR_VALUES, g, "x0")
    np.testing.assert_allclose(eps.numpy(), [1.0, 1.0, 1.0, 0.5, 0.05])
    np.testing.assert_allclose(v.numpy(), [0.1 / 1.1, 0.5, 5 / 6, 5 / 11, 5 / 101])
    np.testing.assert_allclose(x0.numpy(), [0.1, 1.0, 5.0, 5.0, 5.0])
    assert eps.dtype == torch.float64 and eps.shape == SNR_VALUES.shape
    # default gamma is 5 and default prediction is epsilon
    np.testing.assert_allclose(min_snr_weight(SNR_VALUES).numpy(), eps.numpy())
    # epsilon form stays finite where SNR = 0
    assert min_snr_weight(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]


def test_p2_closed_form():
    snr = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    np.testing.assert_allclose(p2_weight(snr, 0.5, 1.0).numpy(), [1.0, 2**-0.5, 0.5])
    np.testing.assert_allclose(p2_weight(snr).numpy(), [1.0, 0.5, 0.25])
    np.testing.assert_allclose(p2_weight(snr, 2.0, 3.0).numpy(), [1 / 9, 1 / 16, 1 / 36])


@pytest.mark.parametrize(
    "call",
    [
        lambda: min_snr_weight(SNR_VALUES, 0.0),
        lambda: min_snr_weight(SNR_VALUES, -1.0),
        lambda: min_snr_weight(SNR_VALUES, float("nan")),
        lambda: min_snr_weight(SNR_VALUES, float("inf")),
        lambda: min_snr_weight(SNR_VALUES, 5.0, "eps"),
        lambda: p2_weight(SNR_VALUES, 0.0),
        lambda: p2_weight(SNR_VALUES, 1.0, 0.0),
        lambda: p2_weight(SNR_VALUES, float("nan"), 1.0),
    ],
)
def test_weight_bad_values_raise(call):
    with pytest.raises(ValueError, match="gamma|k|prediction"):
        call()


def test_weight_bad_types_raise():
    with pytest.raises(TypeError, match="snr"):
        min_snr_weight(np.ones(3))
    with pytest.raises(TypeError, match="snr"):
        p2_weight(torch.ones(3, dtype=torch.long))
    with pytest.raises(TypeError, match="gamma"):
        min_snr_weight(SNR_VALUES, "5")
    with pytest.raises(TypeError, match="gamma"):
        min_snr_weight(SNR_VALUES, True)
    with pytest.raises(ValueError, match="'epsilon', 'v', 'x0'"):
        LossWeighting("constant").weight(SNR_VALUES, prediction="sample")


@FAST
@given(
    schedule=st.sampled_from(sorted(SCHEDULES)),
    kind=st.sampled_from(["constant", "min_snr", "p2", "uw"]),
    gamma=st.floats(0.01, 4.0),
    k=st.floats(1e-3, 10.0),
    prediction=st.sampled_from(["epsilon", "v", "x0"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_weights_finite_and_positive_over_whole_schedules(schedule, kind, gamma, k, prediction, dtype):
    snr = torch.from_numpy(snr_from_alphas_cumprod(SCHEDULES[schedule])).to(dtype)
    assert snr.shape == (1000,)
    params = {"min_snr": dict(gamma=gamma), "p2": dict(gamma=gamma, k=k)}.get(kind, {})
    w = LossWeighting(kind, **params).weight(snr, prediction)
    assert w.shape == snr.shape and w.dtype == dtype
    assert torch.isfinite(w).all() and (w > 0).all()
    assert torch.isfinite(w[[0, -1]]).all() and (w[[0, -1]] > 0).all()  # t = 0 and t = T - 1
    if kind in ("constant", "uw"):
        assert (w == 1).all()


def test_loss_weighting_dispatches_to_closed_forms():
    snr = SNR_VALUES
    assert torch.equal(LossWeighting("min_snr", 5.0).weight(snr, "v"), min_snr_weight(snr, 5.0, "v"))
    assert torch.equal(LossWeighting("p2", 0.5, 2.0).weight(snr), p2_weight(snr, 0.5, 2.0))
    assert torch.equal(LossWeighting("uw").weight(snr), torch.ones_like(snr))


# --------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    "name, expected",
    [
        ("constant", LossWeighting("constant")),
        ("uw", LossWeighting("uw")),
        ("min_snr_5", LossWeighting("min_snr", gamma=5.0)),
        ("min_snr_5.0", LossWeighting("min_snr", gamma=5.0)),
        ("min_snr_0.5", LossWeighting("min_snr", gamma=0.5)),
        ("p2weight_1_1", LossWeighting("p2", gamma=1.0, k=1.0)),
        ("p2weight_0.5_1", LossWeighting("p2", gamma=0.5, k=1.0)),
        ("p2weight_1e-1_2.5", LossWeighting("p2", gamma=0.1, k=2.5)),
    ],
)
def test_parse_paper_spellings(name, expected):
    parsed = parse_loss_weight_type(name)
    assert parsed == expected
    assert parse_loss_weight_type(parsed.name) == parsed


def test_canonical_names():
    assert parse_loss_weight_type("min_snr_5.0").name == "min_snr_5"
    assert parse_loss_weight_type("p2weight_0.5_1").name == "p2weight_0.5_1"
    assert LossWeighting("p2").name == "p2weight_1_1"
    assert LossWeighting("min_snr").name == "min_snr_5"
    assert LossWeighting("min_snr").gamma == 5.0


@FAST
@given(
    kind=st.sampled_from(["constant", "min_snr", "p2", "uw"]),
    gamma=st.floats(1e-6, 1e6),
    k=st.floats(1e-6, 1e6),
)
def test_parser_round_trip(kind, gamma, k):
    params = {"min_snr": dict(gamma=gamma), "p2": dict(gamma=gamma, k=k)}.get(kind, {})
    w = LossWeighting(kind, **params)
    assert parse_loss_weight_type(w.name) == w


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Constant",
        "min_snr",
        "min_snr_",
        "min_snr_-5",
        "min_snr_nan",
        "min_snr_inf",
        "min_snr_5_1",
        "p2weight_1",
        "p2weight_1_",
        "p2weight_a_b",
        "p2weight_1_1_1",
        "uw ",
        "minsnr_5",
        "min_snr_1_0",
    ],
)
def test_parser_rejects_unknown(name):
    with pytest.raises(ValueError, match=r'"constant", "min_snr_<gamma>".*"p2weight_<gamma>_<k>".*"uw"'):
        parse_loss_weight_type(name)


def test_parser_rejects_bad_values_and_types():
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        parse_loss_weight_type("min_snr_0")
    with pytest.raises(ValueError, match="k must be a finite number > 0"):
        parse_loss_weight_type("p2weight_1_0")
    with pytest.raises(TypeError, match="loss_weight_type"):
        parse_loss_weight_type(5)


def test_loss_weighting_validation():
    with pytest.raises(ValueError, match="kind must be one of"):
        LossWeighting("snr")
    with pytest.raises(ValueError, match="takes no gamma"):
        LossWeighting("constant", gamma=1.0)
    with pytest.raises(ValueError, match="takes no k"):
        LossWeighting("min_snr", gamma=1.0, k=1.0)
    with pytest.raises(ValueError, match="gamma"):
        LossWeighting("min_snr", gamma=float("nan"))
    with pytest.raises(TypeError, match="gamma"):
        LossWeighting("p2", gamma="1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        LossWeighting("uw").kind = "constant"  # frozen


# --------------------------------------------------------------------------- uncertainty weighting


def uw_reference(loss, index, log_vars):
    """ANT-UW written out with Python loops."""
    k = log_vars.numel()
    total = 0.0
    for i in range(k):
        members = [loss[b] for b in range(loss.numel()) if int(index[b]) == i]
        if not members:
            continue
        mean = sum(members) / len(members) / k
        total = total + 0.5 * (torch.exp(-log_vars[i]) * mean + log_vars[i])
    return total


def make_uw(k, seed):
    uw = UncertaintyWeighting(k).double()
    with torch.no_grad():
        uw.log_vars.copy_(torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return uw


@FAST
@given(
    k=st.integers(1, 6),
    batch=st.integers(1, 24),
    seed=st.integers(0, 2**31 - 1),
    layout=st.sampled_from(["sorted", "shuffled", "missing"]),
)
def test_uw_matches_loop_formula_and_closed_form_gradient(k, batch, seed, layout):
    gen = torch.Generator().manual_seed(seed)
    uw = make_uw(k, seed)
    loss = torch.rand(batch, generator=gen, dtype=torch.float64) * 3
    high = max(k - 1, 1) if layout == "missing" else k  # "missing": last interval absent (and maybe more)
    index = torch.randint(0, high, (batch,), generator=gen)
    if layout == "sorted":
        index = index.sort().values
    out = uw(loss, index)
    assert out.dim() == 0
    expected = uw_reference(loss, index, uw.log_vars)
    torch.testing.assert_close(out, torch.as_tensor(expected, dtype=torch.float64))

    out.backward()
    s = uw.log_vars.detach()
    counts = torch.bincount(index, minlength=k).double()
    means = torch.zeros(k, dtype=torch.float64).index_add_(0, index, loss) / counts.clamp(min=1)
    grad = torch.where(counts > 0, 0.5 * (1 - torch.exp(-s) * means / k), torch.zeros_like(s))
    torch.testing.assert_close(uw.log_vars.grad, grad)


def test_uw_gradient_wrt_loss_and_paper_layout():
    k, per = 4, 3
    uw = make_uw(k, 0)
    loss = torch.rand(k * per, dtype=torch.float64, requires_grad=True)
    index = torch.arange(k).repeat_interleave(per)
    out = uw(loss, index)
    # the paper code: contiguous chunks of B / k samples, chunk mean / k, summed UW terms
    s = uw.log_vars
    paper = sum(0.5 * (torch.exp(-s[i]) * (loss[i * per : (i + 1) * per].mean() / k) + s[i]) for i in range(k))
    torch.testing.assert_close(out, paper)
    out.backward()
    expected = 0.5 * torch.exp(-s.detach())[index] / (per * k)
    torch.testing.assert_close(loss.grad, expected)


def test_uw_initial_state_weights_and_param_group():
    uw = UncertaintyWeighting(8)
    names = [n for n, _ in uw.named_parameters()]
    assert names == ["log_vars"] and uw.log_vars.shape == (8,) and (uw.log_vars == 0).all()
    assert torch.equal(uw.weights(), torch.ones(8)) and not uw.weights().requires_grad
    with torch.no_grad():
        uw.log_vars.fill_(math.log(2.0))
    torch.testing.assert_close(uw.weights(), torch.full((8,), 0.5))
    group = uw.param_group()
    assert group["lr"] == 0.025 and group["weight_decay"] == 0.0 and group["params"][0] is uw.log_vars
    assert uw.param_group(lr=0.1)["lr"] == 0.1
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))]}, uw.param_group()], lr=1e-4)
    assert opt.param_groups[1]["lr"] == 0.025
    # at init (s = 0) the loss is the plain mean of interval means / (2k)
    uw = UncertaintyWeighting(2)
    out = uw(torch.tensor([1.0, 3.0, 4.0]), torch.tensor([0, 0, 1]))
    torch.testing.assert_close(out, torch.tensor(0.5 * (2.0 / 2 + 4.0 / 2)))


def test_uw_loads_paper_checkpoint_key():
    uw = UncertaintyWeighting(3)
    uw.load_state_dict({"loss_scale": torch.tensor([0.1, 0.2, 0.3])})
    torch.testing.assert_close(uw.log_vars.detach(), torch.tensor([0.1, 0.2, 0.3]))
    other = UncertaintyWeighting(3)
    other.load_state_dict(uw.state_dict())
    assert torch.equal(other.log_vars, uw.log_vars)


def test_uw_half_precision_loss_uses_float32():
    uw = UncertaintyWeighting(2)
    out = uw(torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.tensor([0, 1]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor(0.5 * (0.5 + 1.0)))


def test_uw_validation():
    uw = UncertaintyWeighting(3)
    loss = torch.ones(4)
    with pytest.raises(ValueError, match=r"interval_index values must be in \[0, 3\)"):
        uw(loss, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        uw(loss, torch.tensor([0, -1, 2, 2]))
    with pytest.raises(ValueError, match="interval_index must have the shape"):
        uw(loss, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="per_sample_loss must have shape"):
        uw(torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="per_sample_loss must have shape"):
        uw(torch.ones(0), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError, match="interval_index"):
        uw(loss, torch.zeros(4))
    with pytest.raises(TypeError, match="per_sample_loss"):
        uw(torch.ones(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_intervals"):
        UncertaintyWeighting(0)
    with pytest.raises(TypeError, match="num_intervals"):
        UncertaintyWeighting(2.0)
    with pytest.raises(ValueError, match="lr"):
        uw.param_group(lr=0.0)


# --------------------------------------------------------------------------- intervals


def test_uniform_intervals_match_paper_clusters():
    # DTR util.initialize_cluster(8, 1000): (int(T / k * i), int(T / k * (i + 1)))
    paper = [(int(1000 / 8 * i), int(1000 / 8 * (i + 1))) for i in range(8)]
    assert uniform_intervals(1000, 8) == paper
    assert uniform_intervals(1000, 5) == [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]
    assert uniform_intervals(5, 5) == [(i, i + 1) for i in range(5)]
    assert uniform_intervals(7, 1) == [(0, 7)]


def check_tiling(intervals, T, k):
    assert len(intervals) == k
    assert intervals[0][0] == 0 and intervals[-1][1] == T
    for (_, e0), (s1, _) in zip(intervals, intervals[1:]):
        assert e0 == s1
    assert all(s < e for s, e in intervals)
    assert all(isinstance(v, int) for pair in intervals for v in pair)


@FAST
@given(T=st.integers(1, 2000), data=st.data())
def test_uniform_intervals_sizes(T, data):
    k = data.draw(st.integers(1, min(T, 64)))
    intervals = uniform_intervals(T, k)
    check_tiling(intervals, T, k)
    sizes = [e - s for s, e in intervals]
    assert max(sizes) - min(sizes) <= 1


def test_uniform_intervals_validation():
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 10\], got 11"):
        uniform_intervals(10, 11)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, \d+\], got 0"):
        uniform_intervals(10, 0)
    with pytest.raises(ValueError, match="num_timesteps"):
        uniform_intervals(0, 1)
    with pytest.raises(TypeError, match="k"):
        uniform_intervals(10, 2.0)


def brute_force_best(cost, T, k):
    """Minimum total cost over every split of [0, T) into k non-empty contiguous intervals."""
    best = math.inf
    for cuts in itertools.combinations(range(1, T), k - 1):
        bounds = (0, *cuts, T)
        best = min(best, sum(cost(bounds[i], bounds[i + 1] - 1) for i in range(k)))
    return best


def split_cost(intervals, cost):
    return sum(cost(s, e - 1) for s, e in intervals)


@FAST
@given(
    T=st.integers(1, 9),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
    form=st.sampled_from(["numpy", "torch", "callable"]),
)
def test_cluster_intervals_is_optimal(T, data, seed, form):
    k = data.draw(st.integers(1, T))
    rng = np.random.default_rng(seed)
    matrix = rng.normal(size=(T, T)) * rng.choice([0.01, 1.0, 100.0])
    matrix[np.tril_indices(T, -1)] = np.nan  # lower triangle must be ignored
    if form == "numpy":
        got = cluster_intervals(matrix, k)
    elif form == "torch":
        got = cluster_intervals(torch.from_numpy(matrix), k, num_timesteps=T)
    else:
        got = cluster_intervals(lambda l, r: matrix[l, r], k, num_timesteps=T)
    check_tiling(got, T, k)

    def cost(l, r):
        return matrix[l, r]

    assert split_cost(got, cost) == pytest.approx(brute_force_best(cost, T, k), rel=1e-12, abs=1e-12)


def test_cluster_intervals_closed_form_callable():
    # a convex size cost makes the balanced split optimal
    got = cluster_intervals(lambda l, r: (r - l + 1.0) ** 2, 7, num_timesteps=100)
    sizes = sorted(e - s for s, e in got)
    assert sizes == sorted(e - s for s, e in uniform_intervals(100, 7))
    # a constant (scalar) callable result is broadcast
    check_tiling(cluster_intervals(lambda l, r: 1.0, 3, num_timesteps=5), 5, 3)
    assert cluster_intervals(np.zeros((4, 4)), 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert cluster_intervals(np.zeros((4, 4)), 1) == [(0, 4)]


def test_cluster_intervals_validation():
    m = np.zeros((5, 5))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 5\], got 6"):
        cluster_intervals(m, 6)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, \d+\], got 0"):
        cluster_intervals(m, 0)
    with pytest.raises(ValueError, match="shape"):
        cluster_intervals(np.zeros((4, 5)), 2)
    with pytest.raises(ValueError, match="num_timesteps=4 does not match"):
        cluster_intervals(m, 2, num_timesteps=4)
    bad = m.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        cluster_intervals(bad, 2)
    with pytest.raises(ValueError, match="num_timesteps is required"):
        cluster_intervals(lambda l, r: l + r, 2)
    with pytest.raises(ValueError, match="one value per"):
        cluster_intervals(lambda l, r: np.zeros(3), 2, num_timesteps=5)
    with pytest.raises(TypeError, match="cost"):
        cluster_intervals([[0.0]], 1)


def snr_cost_reference(snr, l, r):
    c = (l + r + 1) // 2
    return sum(abs(snr[t] - snr[c]) for t in range(l, r + 1))


@FAST
@given(T=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_snr_cost_table_matches_brute_force(T, seed):
    rng = np.random.default_rng(seed)
    snr = np.exp(rng.normal(size=T) * 4)  # not monotone, wide range
    table = _snr_cost_by_end(snr)
    for l in range(T):
        for r in range(T):
            if l <= r:
                assert table[r, l] == pytest.approx(snr_cost_reference(snr, l, r), rel=1e-12, abs=1e-300)
            else:
                assert table[r, l] == math.inf


@FAST
@given(
    T=st.integers(1, 9),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from(["random", "increasing", "decreasing", "constant"]),
)
def test_snr_intervals_optimal(T, data, seed, shape):
    k = data.draw(st.integers(1, T))
    rng = np.random.default_rng(seed)
    snr = np.exp(rng.normal(size=T) * 3)
    snr = {"random": snr, "increasing": np.sort(snr), "decreasing": np.sort(snr)[::-1], "constant": np.full(T, 2.0)}[
        shape
    ]
    got = snr_intervals(torch.from_numpy(snr.copy()) if seed % 2 else snr, k)
    check_tiling(got, T, k)

    def cost(l, r):
        return snr_cost_reference(snr, l, r)

    assert split_cost(got, cost) == pytest.approx(brute_force_best(cost, T, k), rel=1e-9, abs=1e-12)


def test_snr_intervals_full_schedule():
    snr = snr_from_alphas_cumprod(SCHEDULES["linear"])
    start = time.perf_counter()
    got = snr_intervals(snr, 8)
    elapsed = time.perf_counter() - start
    check_tiling(got, 1000, 8)
    assert elapsed < 2.0  # ~0.05 s on a laptop core; guards against an O(T^3) regression

    def cost(l, r):
        return snr_cost_reference(snr, l, r)

    assert split_cost(got, cost) <= split_cost(uniform_intervals(1000, 8), cost)
    check_tiling(snr_intervals(torch.from_numpy(snr_from_alphas_cumprod(SCHEDULES["cosine"])), 8), 1000, 8)


def test_snr_intervals_validation():
    with pytest.raises(ValueError, match="snr must be a 1-D"):
        snr_intervals(np.ones((2, 2)), 1)
    with pytest.raises(ValueError, match="snr must be finite"):
        snr_intervals(np.array([1.0, np.inf]), 1)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\], got 4"):
        snr_intervals(np.ones(3), 4)


# --------------------------------------------------------------------------- interval_index


@st.composite
def random_intervals(draw, max_T=60):
    T = draw(st.integers(1, max_T))
    cuts = sorted(draw(st.sets(st.integers(1, T - 1), max_size=T - 1))) if T > 1 else []
    bounds = [0, *cuts, T]
    return list(zip(bounds[:-1], bounds[1:]))


@FAST
@given(intervals=random_intervals(), data=st.data(), dtype=st.sampled_from([torch.int64, torch.int32]))
def test_interval_index_matches_loop(intervals, data, dtype):
    T = intervals[-1][1]
    ts = data.draw(st.lists(st.integers(0, T - 1), min_size=0, max_size=40))
    t = torch.tensor(ts, dtype=dtype)
    got = interval_index(t, intervals)
    expected = [next(i for i, (s, e) in enumerate(intervals) if s <= v < e) for v in ts]
    assert got.dtype == torch.long and got.tolist() == expected


def test_interval_index_shapes_and_endpoints():
    intervals = uniform_intervals(1000, 8)
    t = torch.tensor([[0, 124], [125, 999]])
    assert interval_index(t, intervals).tolist() == [[0, 0], [1, 7]]
    assert interval_index(torch.tensor(500), intervals).item() == 4
    assert interval_index([0, 3], [(0, 10)]).tolist() == [0, 0]


@pytest.mark.parametrize(
    "intervals, match",
    [
        ([(1, 5)], "start at 0"),
        ([(0, 3), (4, 6)], "contiguous"),  # gap
        ([(0, 4), (3, 6)], "contiguous"),  # overlap
        ([(3, 6), (0, 3)], "start at 0"),  # unsorted
        ([(0, 3), (6, 9), (3, 6)], "contiguous"),  # unsorted
        ([(0, 3), (3, 3)], "empty"),
        ([], "at least one"),
    ],
)
def test_bad_intervals_raise(intervals, match):
    with pytest.raises(ValueError, match=match):
        interval_index(torch.tensor([0]), intervals)
    with pytest.raises(ValueError, match=match):
        StratifiedTimestepSampler(intervals)


def test_interval_index_validation():
    intervals = uniform_intervals(10, 2)
    with pytest.raises(ValueError, match=r"t must be in \[0, 10\)"):
        interval_index(torch.tensor([0, 10]), intervals)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        interval_index(torch.tensor([-1]), intervals)
    with pytest.raises(TypeError, match="integer"):
        interval_index(torch.tensor([1.0]), intervals)
    with pytest.raises(TypeError, match="pair"):
        interval_index(torch.tensor([1]), [(0, 1.5)])
    with pytest.raises(TypeError, match="intervals"):
        StratifiedTimestepSampler(5)


# --------------------------------------------------------------------------- sampler


def test_sampler_equal_shares_and_layout():
    intervals = uniform_intervals(1000, 8)
    sampler = StratifiedTimestepSampler(intervals)
    assert sampler.num_intervals == 8 and sampler.intervals == intervals and sampler.num_timesteps == 1000
    t = sampler.sample(256, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (256,)
    idx = interval_index(t, intervals)
    assert torch.bincount(idx, minlength=8).tolist() == [32] * 8
    assert torch.equal(idx, torch.arange(8).repeat_interleave(32))  # laid out interval by interval


@FAST
@given(intervals=random_intervals(max_T=30), batch=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_sampler_counts_and_range(intervals, batch, seed):
    sampler = StratifiedTimestepSampler(intervals)
    k = len(intervals)
    t = sampler.sample(batch, generator=torch.Generator().manual_seed(seed))
    assert t.shape == (batch,) and t.dtype == torch.long
    assert ((t >= 0) & (t < intervals[-1][1])).all()
    counts = torch.bincount(interval_index(t, intervals), minlength=k)
    assert counts.sum() == batch
    assert counts.max() - counts.min() <= 1
    assert (counts >= batch // k).all() and int((counts > batch // k).sum()) == batch % k


def test_sampler_reproducible_and_remainder_random():
    sampler = StratifiedTimestepSampler(uniform_intervals(1000, 8))
    a = sampler.sample(37, generator=torch.Generator().manual_seed(123))
    b = sampler.sample(37, generator=torch.Generator().manual_seed(123))
    c = sampler.sample(37, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b) and not torch.equal(a, c)
    extras = set()
    for seed in range(20):
        t = sampler.sample(11, generator=torch.Generator().manual_seed(seed))
        counts = torch.bincount(interval_index(t, sampler.intervals), minlength=8)
        assert counts.tolist().count(2) == 3 and counts.tolist().count(1) == 5
        extras.add(tuple(torch.nonzero(counts == 2).flatten().tolist()))
    assert len(extras) > 1  # which intervals get the extra sample is drawn, not fixed
    assert sampler.sample(5).shape == (5,)  # global RNG when no generator
    assert sampler.sample(5, device="cpu").device.type == "cpu"


def test_sampler_uniform_within_interval():
    sampler = StratifiedTimestepSampler([(0, 4), (4, 5), (5, 8)])
    t = sampler.sample(30000, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(t, minlength=8).double()
    share = 10000.0
    assert freq[4] == share
    assert ((freq[:4] / share - 1 / 4).abs() < 0.02).all()
    assert ((freq[5:] / share - 1 / 3).abs() < 0.02).all()


def test_sampler_validation():
    sampler = StratifiedTimestepSampler(uniform_intervals(10, 2))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        sampler.sample(0)
    with pytest.raises(TypeError, match="batch_size"):
        sampler.sample(2.0)
    with pytest.raises(TypeError, match="generator"):
        sampler.sample(2, generator=0)
