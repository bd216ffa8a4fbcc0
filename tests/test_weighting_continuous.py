"""ANT-UW on continuous noise levels: float intervals tiling [0, 1], their clustering, the stratified sampler's
truncated densities (Kolmogorov-Smirnov against CDFs written out here), parity with diffusers' SD3 helpers, and
uncertainty weighting by interval or by EDM2's continuous log-variance."""

import copy
import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from dtr.weighting import (
    ContinuousUncertaintyWeighting,
    FourierFeatures,
    LossWeighting,
    StratifiedTimestepSampler,
    UncertaintyWeighting,
    cluster_intervals,
    flow_snr,
    interval_index,
    quantile_intervals,
    snr_intervals,
    uniform_intervals,
    unit_intervals,
)

FAST = settings(max_examples=60, deadline=None)
FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@st.composite
def float_intervals(draw, max_k=8):
    """Random contiguous float intervals tiling [0, 1]: sorted distinct cut points in (0, 1)."""
    cuts = draw(st.lists(st.floats(1e-6, 1 - 1e-6), max_size=max_k - 1, unique=True))
    bounds = [0.0, *sorted(cuts), 1.0]
    return list(zip(bounds[:-1], bounds[1:]))


def home_interval(v, intervals):
    """The interval holding noise level v, written out: [a, b) for all but the last, which is [a, 1]."""
    for i, (a, b) in enumerate(intervals):
        if a <= v < b or (i == len(intervals) - 1 and v == 1.0):
            return i
    raise AssertionError(f"{v} is in no interval")


# --------------------------------------------------------------------------- float intervals


def test_unit_intervals():
    assert unit_intervals(4) == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert unit_intervals(1) == [(0.0, 1.0)]
    got = unit_intervals(7)
    assert got[0][0] == 0.0 and got[-1][1] == 1.0 and all(e == s for (_, e), (s, _) in zip(got, got[1:]))
    assert all(isinstance(v, float) for pair in got for v in pair)
    with pytest.raises(ValueError, match=r"k must be an int >= 1, got 0"):
        unit_intervals(0)
    with pytest.raises(TypeError, match="k"):
        unit_intervals(2.0)


@pytest.mark.parametrize(
    "intervals, error, match",
    [
        ([(0.1, 1.0)], ValueError, r"tiling \[0, 1\] \(noise levels\); the first interval must start at 0.0"),
        ([(0.0, 0.5), (0.6, 1.0)], ValueError, "contiguous"),  # gap
        ([(0.0, 0.5), (0.4, 1.0)], ValueError, "contiguous"),  # overlap
        ([(0.5, 1.0), (0.0, 0.5)], ValueError, "start at 0.0"),  # unsorted
        ([(0.0, 0.5), (0.5, 0.5), (0.5, 1.0)], ValueError, "empty"),
        ([(0.0, 0.5)], ValueError, r"the last one must end at 1.0, got 0.5"),
        ([(0.0, 500.0), (500.0, 1000.0)], ValueError, "give integer timesteps as ints"),
        ([(0.0, float("nan"))], ValueError, "finite"),
        ([(0.0, math.inf)], ValueError, "finite"),
        ([(0.0, 0.5), (0.5, 1)], TypeError, r"intervals\[1\] .* pair of ints \(timesteps\) or of floats"),
        ([(0, 5), (5.0, 10.0)], TypeError, r"intervals\[1\] = \(5.0, 10.0\) must be a pair of ints \(timesteps\)"),
        ([(0.0, 0.5), (5, 10)], TypeError, r"must be a pair of floats \(noise levels\), like intervals\[0\]"),
        ([(0.0, 0.5, 1.0)], TypeError, "pair"),
    ],
)
def test_bad_float_intervals_raise(intervals, error, match):
    with pytest.raises(error, match=match):
        interval_index(torch.tensor([0.5]), intervals)
    with pytest.raises(error, match=match):
        StratifiedTimestepSampler(intervals)
    with pytest.raises(error, match=match):
        UncertaintyWeighting(intervals=intervals)


def test_numpy_floats_are_float_intervals():
    bounds = np.linspace(0, 1, 5)
    intervals = list(zip(bounds[:-1], bounds[1:]))
    assert StratifiedTimestepSampler(intervals).intervals == unit_intervals(4)
    assert StratifiedTimestepSampler([(np.int64(0), np.int64(10))]).intervals == [(0, 10)]


# --------------------------------------------------------------------------- interval_index on noise levels


@FAST
@given(intervals=float_intervals(), data=st.data(), dtype=st.sampled_from(FLOATS))
def test_interval_index_on_noise_levels_matches_loop(intervals, data, dtype):
    edges = [a for a, _ in intervals] + [1.0]
    values = data.draw(st.lists(st.one_of(st.floats(0.0, 1.0), st.sampled_from(edges)), max_size=40))
    t = torch.tensor(values, dtype=torch.float64).to(dtype)  # the levels as the dtype holds them
    got = interval_index(t, intervals)
    expected = [home_interval(v, intervals) for v in t.double().tolist()]
    assert got.dtype == torch.long and got.tolist() == expected


def test_interval_index_on_noise_levels_ends_and_shapes():
    intervals = unit_intervals(4)
    t = torch.tensor([[0.0, 0.25], [0.7499999, 1.0]])
    assert interval_index(t, intervals).tolist() == [[0, 1], [2, 3]]  # s = 1 is in the last interval
    assert interval_index(torch.tensor(1.0, dtype=torch.float64), [(0.0, 1.0)]).item() == 0
    with pytest.raises(TypeError, match=r"noise levels in \[0, 1\] \(a float dtype\) for float intervals"):
        interval_index(torch.tensor([0, 1]), intervals)
    for bad in ([1.0001], [-1e-9], [float("nan")]):
        with pytest.raises(ValueError, match=r"t must be noise levels in \[0, 1\]"):
            interval_index(torch.tensor(bad), intervals)
    with pytest.raises(TypeError, match="integer timesteps for integer intervals"):
        interval_index(torch.tensor([0.5]), uniform_intervals(10, 2))


# --------------------------------------------------------------------------- clustering on a grid of noise levels


def brute_force_float_split(cost, grid, k):
    """Cheapest split of the grid's cells into k contiguous groups, as (cost, float intervals), by enumeration."""
    import itertools

    n = len(grid) - 1
    best = (math.inf, None)
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        total = sum(cost(bounds[i], bounds[i + 1] - 1) for i in range(k))
        if total < best[0]:
            best = (total, [(grid[bounds[i]], grid[bounds[i + 1]]) for i in range(k)])
    return best


@FAST
@given(n=st.integers(1, 8), data=st.data(), seed=st.integers(0, 2**31 - 1), form=st.sampled_from(["matrix", "fn"]))
def test_cluster_intervals_on_a_grid_is_optimal(n, data, seed, form):
    k = data.draw(st.integers(1, n))
    rng = np.random.default_rng(seed)
    grid = [0.0, *np.sort(rng.choice(np.arange(1, 1000), n - 1, replace=False) / 1000).tolist(), 1.0]
    matrix = rng.normal(size=(n, n))
    arg = matrix if form == "matrix" else (lambda l, r: matrix[l, r])
    got = cluster_intervals(arg, k, grid=grid)
    assert interval_index(torch.tensor([0.5]), got).shape == (1,)  # valid float intervals
    assert [a for a, _ in got] == sorted({a for a, _ in got}) and all(isinstance(v, float) for p in got for v in p)
    index = {g: i for i, g in enumerate(grid)}

    def cost(l, r):
        return matrix[l, r]

    total = sum(cost(index[a], index[b] - 1) for a, b in got)
    assert total == pytest.approx(brute_force_float_split(cost, grid, k)[0], rel=1e-12, abs=1e-12)


def test_cluster_intervals_grid_forms_and_validation():
    cost = np.abs(np.subtract.outer(np.arange(10.0), np.arange(10.0)))  # any cost; same table either way
    by_int = cluster_intervals(cost, 3, grid=10)
    by_array = cluster_intervals(cost, 3, grid=np.linspace(0, 1, 11))
    by_tensor = cluster_intervals(torch.from_numpy(cost), 3, grid=torch.linspace(0, 1, 11, dtype=torch.float64))
    integer = cluster_intervals(cost, 3)
    assert by_int == [(a / 10, b / 10) for a, b in integer]
    assert by_array == by_tensor and [(round(a, 12), round(b, 12)) for a, b in by_array] == [
        (round(a, 12), round(b, 12)) for a, b in by_int
    ]
    with pytest.raises(ValueError, match="does not match the grid's 5 cells"):
        cluster_intervals(cost, 3, grid=5)
    with pytest.raises(ValueError, match="num_timesteps=4 does not match the grid's 5 cells"):
        cluster_intervals(lambda l, r: l + r, 2, num_timesteps=4, grid=5)
    with pytest.raises(ValueError, match=r"grid boundaries must increase strictly from 0.0 to 1.0"):
        cluster_intervals(cost, 3, grid=np.linspace(0, 2, 11))
    with pytest.raises(ValueError, match=r"grid boundaries must increase strictly"):
        cluster_intervals(np.zeros((3, 3)), 1, grid=[0.0, 0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="grid must be 1-D"):
        cluster_intervals(np.zeros((1, 1)), 1, grid=[1.0])
    with pytest.raises(ValueError, match="grid must be an int >= 1"):
        cluster_intervals(np.zeros((1, 1)), 1, grid=0)
    with pytest.raises(TypeError, match="grid must be an int"):
        cluster_intervals(np.zeros((1, 1)), 1, grid="ten")


def test_snr_intervals_on_flow_noise_levels():
    """ANT's SNR clustering of the flow path: one SNR per cell (at its midpoint), optimal against brute force."""
    n, k = 9, 3
    grid = np.linspace(0, 1, n + 1)
    mid = (grid[:-1] + grid[1:]) / 2
    snr = ((1 - mid) / mid) ** 2
    got = snr_intervals(torch.from_numpy(snr), k, grid=n)

    def cost(l, r):
        c = (l + r + 1) // 2
        return sum(abs(snr[t] - snr[c]) for t in range(l, r + 1))

    best, split = brute_force_float_split(cost, [i / n for i in range(n + 1)], k)
    assert got == split
    np.testing.assert_allclose(flow_snr(torch.from_numpy(mid)).numpy(), snr, rtol=1e-14)
    with pytest.raises(ValueError, match="snr has 9 values but the grid has 4 cells"):
        snr_intervals(snr, 2, grid=4)


# --------------------------------------------------------------------------- the stratified sampler on noise levels


DENSITY_CASES = [
    dict(density="uniform"),
    dict(density="logit_normal"),
    dict(density="logit_normal", logit_mean=-0.7, logit_std=0.6),
    dict(density="logit_normal", logit_mean=1.5, logit_std=2.0),
    dict(density="mode"),  # SD3's default scale 1.29
    dict(density="mode", mode_scale=-0.8),
    dict(density="mode", mode_scale=2 / (math.pi - 2)),  # the largest scale with a monotone map
    dict(density="uniform", shift=3.0),
    dict(density="logit_normal", shift=3.0),
    dict(density="mode", mode_scale=0.5, shift=0.4),
]


@functools.lru_cache
def mode_table(scale):
    """SD3's mode map as diffusers writes it, s = f(u) = 1 - u - c (cos^2(pi u / 2) - 1 + u), on 2**20 + 1 points."""
    u = np.linspace(0.0, 1.0, 2**20 + 1)
    return u, 1 - u - scale * (np.cos(np.pi * u / 2) ** 2 - 1 + u)


def mode_cdf(x, scale):
    """SD3's mode density (u uniform, f decreasing): F(x) = P(f(u) <= x) = 1 - f^-1(x), f inverted by linear
    interpolation of its table (error ~1e-12)."""
    u, f = mode_table(scale)
    return 1 - np.interp(np.asarray(x, dtype=np.float64), f[::-1], u[::-1])


def base_cdf(case):
    """The CDF on [0, 1] of a density case, written out with scipy (not the library's code)."""
    density, shift = case["density"], case.get("shift", 1.0)
    if density == "uniform":
        cdf = np.asarray
    elif density == "logit_normal":
        m, sd = case.get("logit_mean", 0.0), case.get("logit_std", 1.0)

        def cdf(x):
            with np.errstate(divide="ignore"):
                return stats.norm.cdf((special.logit(np.asarray(x, dtype=np.float64)) - m) / sd)
    else:

        def cdf(x):
            return mode_cdf(x, case.get("mode_scale", 1.29))

    def unshifted(x):  # s = shift * s0 / (1 + (shift - 1) * s0)  <=>  s0 = s / (shift - (shift - 1) * s)
        x = np.asarray(x, dtype=np.float64)
        return cdf(x / (shift - (shift - 1) * x))

    return unshifted


def base_quantile(case):
    """The inverse CDF of a density case, written out with scipy and diffusers' mode formula (u = 1 - p)."""
    density, shift = case["density"], case.get("shift", 1.0)

    def quantile(p):
        if density == "uniform":
            s0 = p
        elif density == "logit_normal":
            s0 = special.expit(case.get("logit_mean", 0.0) + case.get("logit_std", 1.0) * stats.norm.ppf(p))
        else:
            c, u = case.get("mode_scale", 1.29), 1 - p
            s0 = 1 - u - c * (np.cos(np.pi * u / 2) ** 2 - 1 + u)
        return shift * s0 / (1 + (shift - 1) * s0)

    return quantile


def truncated_cdf(cdf, a, b):
    lo, hi = cdf(np.array([a]))[0], cdf(np.array([b]))[0]
    return lambda x: (cdf(np.clip(x, a, b)) - lo) / (hi - lo)


@pytest.mark.parametrize("case", DENSITY_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_sampler_matches_the_truncated_density_in_every_interval(case):
    """Each interval's share against the truncated CDF written out here, and the batch against their mixture.

    The sampler inverts the CDF, so one seed gives every density the same uniform draws and the same KS statistic:
    equal p-values across the cases (0.155 per-interval minimum, 0.983 mixture) mean each inversion is exact."""
    intervals = [(0.0, 0.1), (0.1, 0.35), (0.35, 0.5), (0.5, 0.9), (0.9, 0.97), (0.97, 1.0)]
    sampler = StratifiedTimestepSampler(intervals, **case)
    per = 3000
    s = sampler.sample(per * len(intervals), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    index = interval_index(s, intervals)
    assert torch.equal(index, torch.arange(len(intervals)).repeat_interleave(per))
    cdf = base_cdf(case)
    pvalues = []
    for i, (a, b) in enumerate(intervals):
        chunk = s[index == i].numpy()
        pvalues.append(stats.kstest(chunk, truncated_cdf(cdf, a, b)).pvalue)
    # the whole batch: an equal mixture of the truncated densities
    mix = stats.kstest(
        s.numpy(), lambda x: sum(truncated_cdf(cdf, a, b)(x) for a, b in intervals) / len(intervals)
    ).pvalue
    assert min(pvalues) > 1e-3 and mix > 1e-3, (pvalues, mix)


def test_ks_test_has_power():
    """The same KS check rejects samples of a different density: the test above is not vacuous."""
    intervals = [(0.0, 0.5), (0.5, 1.0)]
    s = StratifiedTimestepSampler(intervals, "logit_normal", logit_std=0.5).sample(
        6000, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    wrong = truncated_cdf(base_cdf(dict(density="uniform")), 0.0, 0.5)
    assert stats.kstest(s[:3000].numpy(), wrong).pvalue < 1e-10
    shifted = truncated_cdf(base_cdf(dict(density="logit_normal", logit_std=0.5, shift=1.2)), 0.5, 1.0)
    assert stats.kstest(s[3000:].numpy(), shifted).pvalue < 1e-3


def test_sampler_reaches_far_tails():
    """A narrow interval far in the logit-normal's upper tail (mass ~1e-10) is sampled by its own law (the
    normal's tail is mirrored, not rounded away), and a level with no float64 mass at all is refused."""
    case = dict(density="logit_normal", logit_std=1.0)
    intervals = [(0.0, 0.999999), (0.999999, 0.9999999), (0.9999999, 1.0)]
    s = StratifiedTimestepSampler(intervals, **case).sample(
        3000, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    cdf = base_cdf(case)
    tail = s[1000:2000].numpy()
    # the truncated CDF in the tail, from scipy's survival function (the CDF itself rounds to 1 there)
    sf = stats.norm.sf(special.logit(np.array([0.999999, 0.9999999])))

    def tail_cdf(x):
        return (sf[0] - stats.norm.sf(special.logit(np.clip(x, 0.999999, 0.9999999)))) / (sf[0] - sf[1])

    assert stats.kstest(tail, tail_cdf).pvalue > 1e-3
    assert cdf(np.array([0.999999]))[0] > 1 - 1e-5
    with pytest.raises(ValueError, match=r"intervals\[1\] = \(0.99999, 1.0\) has probability 0 in float64"):
        StratifiedTimestepSampler([(0.0, 0.99999), (0.99999, 1.0)], "logit_normal", logit_std=0.1)


@pytest.mark.parametrize("case", DENSITY_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_quantile_intervals_have_equal_mass_and_keep_the_density(case):
    """Boundaries at the density's quantiles i / k (the CDF written out here), and ANT's equal share per interval
    then draws the density itself: the whole stratified batch passes a KS test against the plain CDF."""
    k = 8
    intervals = quantile_intervals(k, **case)
    assert len(intervals) == k and intervals[0][0] == 0.0 and intervals[-1][1] == 1.0
    cdf = base_cdf(case)
    inner = np.array([a for a, _ in intervals[1:]])
    np.testing.assert_allclose(inner, base_quantile(case)(np.arange(1, k) / k), rtol=1e-12)
    np.testing.assert_allclose(cdf(inner), np.arange(1, k) / k, atol=1e-5)  # the mode table is coarse at its flat point
    s = StratifiedTimestepSampler(intervals, **case).sample(
        8000, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    assert stats.kstest(s.numpy(), cdf).pvalue > 1e-3


def test_quantile_intervals_validation():
    assert quantile_intervals(1, "logit_normal") == [(0.0, 1.0)]
    assert quantile_intervals(4) == unit_intervals(4)
    assert quantile_intervals(2, shift=3.0) == [(0.0, 0.75), (0.75, 1.0)]  # 3 * 0.5 / (1 + 2 * 0.5)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        quantile_intervals(0)
    with pytest.raises(ValueError, match="density must be one of"):
        quantile_intervals(2, "normal")
    with pytest.raises(ValueError, match="quantiles of density='logit_normal'.* are not distinct in float64"):
        quantile_intervals(4, "logit_normal", logit_mean=40.0, logit_std=0.1)  # every quantile rounds to 1.0


@FAST
@given(
    intervals=float_intervals(),
    batch=st.integers(1, 50),
    seed=st.integers(0, 2**31 - 1),
    case=st.sampled_from(DENSITY_CASES),
    dtype=st.sampled_from(FLOATS),
)
def test_sampler_noise_levels_stay_in_their_interval_in_every_dtype(intervals, batch, seed, case, dtype):
    try:
        sampler = StratifiedTimestepSampler(intervals, **case)
        t = sampler.sample(batch, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    except ValueError as e:  # an interval the dtype cannot hold, or with no float64 mass under the density
        assert "holds no" in str(e) or "probability 0" in str(e)  # noqa: PT017
        return
    k = len(intervals)
    assert t.shape == (batch,) and t.dtype == dtype
    counts = torch.bincount(interval_index(t, intervals), minlength=k)
    assert counts.max() - counts.min() <= 1 and counts.sum() == batch
    layout = [home_interval(v, intervals) for v in t.double().tolist()]
    assert layout == sorted(layout)  # laid out interval by interval, each sample inside its own


def test_sampler_dtype_rounding_keeps_the_interval():
    intervals = [(0.0, 0.1), (0.1, 1.0)]
    sampler = StratifiedTimestepSampler(intervals)
    for dtype in FLOATS:
        t = sampler.sample(4000, generator=torch.Generator().manual_seed(0), dtype=dtype)
        assert interval_index(t, intervals).tolist() == [0] * 2000 + [1] * 2000
        assert float(t[:2000].max()) < 0.1 <= float(t[2000:].min())
    narrow = [(0.0, 0.501), (0.501, 0.502), (0.502, 1.0)]  # bfloat16 holds 0.5 and 0.50390625, nothing between
    with pytest.raises(ValueError, match=r"intervals\[1\] = \(0.501, 0.502\) holds no torch.bfloat16 value"):
        StratifiedTimestepSampler(narrow).sample(3, dtype=torch.bfloat16)
    assert interval_index(StratifiedTimestepSampler(narrow).sample(3), narrow).tolist() == [0, 1, 2]


def test_sampler_float_reproducible_and_shares():
    sampler = StratifiedTimestepSampler(unit_intervals(8), "logit_normal")
    assert sampler.num_intervals == 8 and sampler.num_timesteps is None
    a = sampler.sample(37, generator=torch.Generator().manual_seed(123))
    b = sampler.sample(37, generator=torch.Generator().manual_seed(123))
    c = sampler.sample(37, generator=torch.Generator().manual_seed(124))
    assert a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)
    counts = torch.bincount(interval_index(a, sampler.intervals), minlength=8).tolist()
    assert sorted(counts) == [4] * 3 + [5] * 5
    assert sampler.sample(5).shape == (5,)  # global RNG when no generator
    assert sampler.sample(5, device="cpu", dtype=torch.float64).dtype == torch.float64
    assert "density='logit_normal', logit_mean=0.0, logit_std=1.0" in repr(sampler)


def test_integer_sampler_unchanged_draws():
    """Integer intervals draw what they drew before float intervals existed (same RNG use, same arithmetic)."""
    intervals = uniform_intervals(1000, 8)
    gen = torch.Generator().manual_seed(5)
    got = StratifiedTimestepSampler(intervals).sample(37, generator=gen)
    ref = torch.Generator().manual_seed(5)
    counts = torch.full((8,), 4, dtype=torch.long)
    counts[torch.randperm(8, generator=ref)[:5]] += 1
    which = torch.repeat_interleave(torch.arange(8), counts)
    u = torch.rand(37, generator=ref, dtype=torch.float64)
    expected = torch.tensor([s for s, _ in intervals])[which] + (u * 125).long()
    assert torch.equal(got, expected) and got.dtype == torch.int64


def test_sampler_density_validation():
    with pytest.raises(ValueError, match=r"density='logit_normal'.*apply to float intervals"):
        StratifiedTimestepSampler(uniform_intervals(10, 2), "logit_normal")
    with pytest.raises(ValueError, match=r"shift=3.0: densities apply to float intervals"):
        StratifiedTimestepSampler(uniform_intervals(10, 2), shift=3.0)
    with pytest.raises(ValueError, match="logit_mean, logit_std"):
        StratifiedTimestepSampler(uniform_intervals(10, 2), logit_mean=0.0, logit_std=1.0)
    iv = unit_intervals(2)
    with pytest.raises(ValueError, match="density must be one of 'uniform', 'logit_normal', 'mode'"):
        StratifiedTimestepSampler(iv, "lognorm")
    with pytest.raises(ValueError, match="logit_std applies to density='logit_normal' only"):
        StratifiedTimestepSampler(iv, "mode", logit_std=1.0)
    with pytest.raises(ValueError, match="mode_scale applies to density='mode' only"):
        StratifiedTimestepSampler(iv, mode_scale=1.0)
    with pytest.raises(ValueError, match=r"mode_scale must be in \[-1, 1.75"):
        StratifiedTimestepSampler(iv, "mode", mode_scale=1.8)
    with pytest.raises(ValueError, match=r"mode_scale must be in \[-1"):
        StratifiedTimestepSampler(iv, "mode", mode_scale=-1.01)
    with pytest.raises(ValueError, match="logit_std must be a finite number > 0"):
        StratifiedTimestepSampler(iv, "logit_normal", logit_std=0.0)
    with pytest.raises(ValueError, match="logit_mean must be a finite number"):
        StratifiedTimestepSampler(iv, "logit_normal", logit_mean=math.inf)
    with pytest.raises(ValueError, match="shift must be a finite number > 0"):
        StratifiedTimestepSampler(iv, shift=0.0)
    with pytest.raises(ValueError, match="dtype must be a floating-point dtype for float intervals"):
        StratifiedTimestepSampler(iv).sample(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="dtype must be None or torch.int64 for integer intervals"):
        StratifiedTimestepSampler(uniform_intervals(10, 2)).sample(2, dtype=torch.float32)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        StratifiedTimestepSampler(iv).sample(2, dtype="float32")


# --------------------------------------------------------------------------- parity with diffusers' SD3 helpers


@pytest.mark.parametrize(
    "scheme, kwargs, case",
    [
        ("none", {}, dict(density="uniform")),
        ("logit_normal", dict(logit_mean=0.0, logit_std=1.0), dict(density="logit_normal")),
        (
            "logit_normal",
            dict(logit_mean=-0.5, logit_std=1.5),
            dict(density="logit_normal", logit_mean=-0.5, logit_std=1.5),
        ),
        ("mode", dict(mode_scale=1.29), dict(density="mode", mode_scale=1.29)),
        ("mode", dict(mode_scale=-0.5), dict(density="mode", mode_scale=-0.5)),
    ],
)
def test_one_interval_is_diffusers_density(scheme, kwargs, case):
    """One interval [0, 1] is the plain density: the same law as diffusers' compute_density_for_timestep_sampling
    (two-sample KS), and both match the CDF written out here."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    n = 20000
    torch.manual_seed(0)
    theirs = compute_density_for_timestep_sampling(scheme, n, **kwargs).double().numpy()
    ours = StratifiedTimestepSampler([(0.0, 1.0)], **case).sample(
        n, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    cdf = base_cdf(case)
    same = stats.ks_2samp(ours.numpy(), theirs).pvalue
    ours_p, theirs_p = stats.kstest(ours.numpy(), cdf).pvalue, stats.kstest(theirs, cdf).pvalue
    assert same > 1e-3 and ours_p > 1e-3 and theirs_p > 1e-3


def test_constant_flow_weight_is_diffusers_none_weighting():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = torch.rand(64, generator=torch.Generator().manual_seed(0))
    ours = LossWeighting("constant").weight(flow_snr(sigmas), "flow")
    assert torch.equal(ours, compute_loss_weighting_for_sd3("none", sigmas))


# --------------------------------------------------------------------------- ANT-UW on float intervals


def uw_formula(loss, index, log_vars):
    """ANT-UW written out: sum over present intervals of 0.5 * (exp(-s_i) * mean_i / k + s_i)."""
    k = len(log_vars)
    total = 0.0
    for i in range(k):
        members = [float(loss[b]) for b in range(len(loss)) if index[b] == i]
        if members:
            total += 0.5 * (math.exp(-log_vars[i]) * sum(members) / len(members) / k + log_vars[i])
    return total


@FAST
@given(intervals=float_intervals(), seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 30))
def test_uw_on_noise_levels_is_the_ant_formula(intervals, seed, batch):
    gen = torch.Generator().manual_seed(seed)
    uw = UncertaintyWeighting(intervals=intervals).double()
    with torch.no_grad():
        uw.log_vars.copy_(torch.randn(len(intervals), generator=gen, dtype=torch.float64))
    s = torch.rand(batch, generator=gen, dtype=torch.float64)
    s[0] = 1.0  # the top end belongs to the last interval
    loss = torch.rand(batch, generator=gen, dtype=torch.float64) * 3
    index = [home_interval(v, intervals) for v in s.tolist()]
    expected = uw_formula(loss, index, uw.log_vars.tolist())
    assert uw(loss, t=s).item() == pytest.approx(expected, rel=1e-12)
    assert torch.equal(uw(loss, t=s), uw(loss, interval_index(s, intervals)))


def test_uw_with_intervals_construction_and_validation():
    uw = UncertaintyWeighting(intervals=unit_intervals(4))
    assert uw.num_intervals == 4 and uw.intervals == unit_intervals(4)
    assert [n for n, _ in uw.named_parameters()] == ["log_vars"] and list(uw.state_dict()) == ["log_vars"]
    assert "intervals=[(0.0, 0.25)" in repr(uw)
    assert UncertaintyWeighting(4, intervals=unit_intervals(4)).num_intervals == 4
    ints = UncertaintyWeighting(intervals=uniform_intervals(1000, 8))
    t = torch.tensor([0, 124, 125, 999])
    assert torch.equal(ints(torch.ones(4), t=t), ints(torch.ones(4), torch.tensor([0, 0, 1, 7])))
    copy.deepcopy(uw)(torch.ones(2), t=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="num_intervals=3 does not match the 4 intervals"):
        UncertaintyWeighting(3, intervals=unit_intervals(4))
    with pytest.raises(TypeError, match="needs num_intervals or intervals"):
        UncertaintyWeighting()
    with pytest.raises(ValueError, match="give interval_index or t, not both"):
        uw(torch.ones(2), torch.tensor([0, 1]), t=torch.tensor([0.1, 0.3]))
    with pytest.raises(ValueError, match=r"t= needs the intervals"):
        UncertaintyWeighting(4)(torch.ones(2), t=torch.tensor([0.1, 0.3]))
    with pytest.raises(TypeError, match="interval_index must be an integer"):
        uw(torch.ones(2))
    with pytest.raises(ValueError, match=r"t must be noise levels in \[0, 1\]"):
        uw(torch.ones(2), t=torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="interval_index must have the shape of per_sample_loss"):
        uw(torch.ones(2), t=torch.tensor([0.1, 0.2, 0.3]))


# --------------------------------------------------------------------------- EDM2's continuous log-variance


def test_fourier_features_closed_form_and_seed():
    ff = FourierFeatures(16, bandwidth=2.0, seed=3)
    gen = torch.Generator().manual_seed(3)  # frequencies ~ N(0, bandwidth^2), phases ~ U[0, 1), float64 draws
    freqs = (torch.randn(16, generator=gen, dtype=torch.float64) * 2.0).float()
    phases = torch.rand(16, generator=gen, dtype=torch.float64).float()
    assert torch.equal(ff.freqs, freqs) and torch.equal(ff.phases, phases)
    assert sorted(ff.state_dict()) == ["freqs", "phases"]
    x = torch.tensor([0.0, 0.3, 1.0])
    expected = [[math.sqrt(2) * math.cos(2 * math.pi * (f * v + p)) for f, p in zip(freqs, phases)] for v in x]
    torch.testing.assert_close(ff(x), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert not torch.equal(FourierFeatures(16, seed=4).freqs, FourierFeatures(16, seed=3).freqs)
    # mean square 1 per feature over a uniform phase (EDM2's magnitude preservation)
    many = FourierFeatures(20000, seed=0)(torch.tensor([0.37]))
    assert float((many**2).mean()) == pytest.approx(1.0, abs=0.03)
    with pytest.raises(ValueError, match="num_channels"):
        FourierFeatures(0)
    with pytest.raises(ValueError, match="bandwidth"):
        FourierFeatures(8, bandwidth=0.0)


def test_continuous_uw_initial_state_and_closed_form_gradient():
    m = ContinuousUncertaintyWeighting(num_channels=32).double()
    assert [n for n, _ in m.named_parameters()] == ["linear.weight", "linear.bias"]
    assert sorted(m.state_dict()) == ["fourier.freqs", "fourier.phases", "linear.bias", "linear.weight"]
    s = torch.tensor([0.0, 0.2, 0.7, 1.0], dtype=torch.float64)
    loss = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64, requires_grad=True)
    assert m.log_var(s).tolist() == [0.0] * 4 and m.weights(s).tolist() == [1.0] * 4
    assert m(loss, s).item() == pytest.approx(3.0)  # u = 0: the plain mean
    with torch.no_grad():
        m.linear.bias.fill_(math.log(2.0))
    out = m(loss, s)
    assert out.item() == pytest.approx(3.0 / 2 + math.log(2.0))
    out.backward()
    # d/du mean(L e^-u + u) = mean(1 - L e^-u); u = bias here
    assert m.linear.bias.grad.item() == pytest.approx(float(np.mean(1 - np.array([1.0, 2.0, 3.0, 6.0]) / 2)))
    torch.testing.assert_close(loss.grad, torch.full((4,), 0.5 / 4, dtype=torch.float64))
    group = m.param_group()
    assert group["lr"] == 0.01 and group["weight_decay"] == 0.0
    assert [id(p) for p in group["params"]] == [id(m.linear.weight), id(m.linear.bias)]
    assert m.param_group(lr=0.1)["lr"] == 0.1


def test_continuous_uw_dtypes_and_validation():
    m = ContinuousUncertaintyWeighting()
    out = m(torch.ones(3, dtype=torch.bfloat16), torch.tensor([0.0, 0.5, 1.0], dtype=torch.bfloat16))
    assert out.dtype == torch.float32 and out.item() == 1.0
    with pytest.raises(ValueError, match=r"s must be noise levels in \[0, 1\]"):
        m(torch.ones(2), torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"s must be noise levels in \[0, 1\]"):
        m.weights(torch.tensor([float("nan")]))
    with pytest.raises(TypeError, match=r"s must be a floating-point torch.Tensor of shape \(B,\)"):
        m(torch.ones(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="s must have the shape of per_sample_loss"):
        m(torch.ones(2), torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"per_sample_loss must have shape \(B,\)"):
        m(torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(TypeError, match="per_sample_loss"):
        m(torch.ones(2, dtype=torch.long), torch.ones(2))
    with pytest.raises(ValueError, match="lr"):
        m.param_group(lr=-1.0)


def test_continuous_uw_learns_the_log_of_the_loss_curve():
    """On noisy per-sample losses L(s) * chi2_8 / 8 (mean L(s)), training u alone reaches the optimum of
    E[L / exp(u) + u], u(s) = log L(s): within 0.05 everywhere on [0, 1] (measured 0.016 max, 0.006 mean)."""

    def curve(s):  # a smooth per-level loss with a 20x range, rising then falling like a flow model's
        return torch.exp(1.2 * torch.sin(2.5 * s) - 2.0 * s**2) + 0.1

    torch.manual_seed(0)
    m = ContinuousUncertaintyWeighting().double()
    steps, batch = 1000, 512
    opt = torch.optim.Adam([m.param_group()])
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        s = torch.rand(batch, generator=gen, dtype=torch.float64)
        noise = (torch.randn(batch, 8, generator=gen, dtype=torch.float64) ** 2).mean(1)
        loss = m(curve(s) * noise, s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    error = (m.log_var(grid).detach() - torch.log(curve(grid))).abs()
    assert float(error.max()) < 0.05 and float(error.mean()) < 0.02, (float(error.max()), float(error.mean()))
