"""dtr.task_masks: the DTR window masks against the paper code's float64 formula, and R-TR masks."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtr
from dtr.timesteps import timesteps_to_tasks


def paper_starts(T, C, ratio, alpha):
    """The paper code's formula, written out: np.round(np.linspace(0, 1, T) ** alpha * (C - C_b))."""
    c_b = int(C * ratio)
    return np.round(np.linspace(0, 1, T) ** alpha * (C - c_b)).astype(int), c_b


@st.composite
def mask_args(draw, max_t=1200, max_c=600):
    T = draw(st.integers(2, max_t))
    C = draw(st.integers(1, max_c))
    ratio = draw(st.floats(1.0 / C, 1.0, allow_nan=False).filter(lambda r: int(C * r) >= 1))
    alpha = draw(st.floats(0.05, 10.0))
    return T, C, ratio, alpha


@settings(max_examples=150, deadline=None)
@given(mask_args())
def test_dtr_masks_window_properties_and_paper_formula(args):
    T, C, ratio, alpha = args
    masks = dtr.task_masks(T, C, ratio, alpha)
    assert masks.dtype == torch.bool and masks.shape == (T, C)
    m = masks.numpy().astype(int)
    c_b = int(C * ratio)
    assert (m.sum(1) == c_b).all()
    # one contiguous window: exactly one rising edge when the row is padded with a zero on the left
    edges = np.diff(np.pad(m, ((0, 0), (1, 0))), axis=1)
    assert ((edges == 1).sum(1) == 1).all()
    starts = m.argmax(1)
    assert (np.diff(starts) >= 0).all()
    assert starts[0] == 0 and starts[-1] == C - c_b
    ref, _ = paper_starts(T, C, ratio, alpha)
    np.testing.assert_array_equal(starts, ref)
    ref_mask = np.zeros((T, C), dtype=bool)
    for t in range(T):
        ref_mask[t, ref[t] : ref[t] + c_b] = True
    np.testing.assert_array_equal(masks.numpy(), ref_mask)


def test_dtr_masks_known_values_dit_l():
    # DiT-L/2 width 1024 at beta 0.8: 819 active channels, the window slides over 205 channels.
    masks = dtr.task_masks(1000, 1024, 0.8, 4.0)
    starts = masks.int().argmax(1)
    assert int(masks[0].sum()) == 819
    assert starts[0] == 0 and starts[999] == 205
    # (500/999)^4 * 205 = 12.87 -> 13; (900/999)^4 * 205 = 135.06 -> 135; (100/999)^4 * 205 = 0.0206 -> 0
    assert starts[500] == 13 and starts[900] == 135 and starts[100] == 0
    # alpha > 1: the window moves little at low t and fast at high t
    assert starts[499] - starts[0] < starts[999] - starts[500]


def test_rounding_is_half_to_even():
    # C - C_b = 2 and alpha = 1 over T = 5: t/(T-1) * 2 = 0, .5, 1, 1.5, 2 -> 0, 0, 1, 2, 2 (banker's rounding)
    starts = dtr.window_starts(5, 10, 0.8, 1.0)
    np.testing.assert_array_equal(starts, [0, 0, 1, 2, 2])


def test_sharing_ratio_one_is_all_channels():
    assert dtr.task_masks(50, 33, 1.0).all()


@settings(max_examples=60, deadline=None)
@given(mask_args(max_t=300, max_c=300), st.integers(0, 2**40), st.integers(0, 64))
def test_random_masks_count_and_reproducible(args, seed, block):
    T, C, ratio, alpha = args
    a = dtr.task_masks(T, C, ratio, method="random", seed=seed, block=block)
    b = dtr.task_masks(T, C, ratio, method="random", seed=seed, block=block)
    assert torch.equal(a, b)
    assert (a.sum(1) == int(C * ratio)).all()


def test_random_masks_differ_across_blocks_seeds_and_tasks():
    a = dtr.task_masks(1000, 256, 0.8, method="random", seed=0, block=0)
    b = dtr.task_masks(1000, 256, 0.8, method="random", seed=0, block=1)
    c = dtr.task_masks(1000, 256, 0.8, method="random", seed=1, block=0)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) == 1000  # every task its own subset
    # each channel is active for about 80% of the tasks: the draw is not biased towards low channels
    freq = a.float().mean(0)
    assert freq.min() > 0.65 and freq.max() < 0.95
    # two blocks agree on a channel about as often as independent draws would: 0.8^2 + 0.2^2 = 0.68
    agree = (a == b).float().mean().item()
    assert abs(agree - 0.68) < 0.02


def test_random_seed_none_uses_torch_generator():
    torch.manual_seed(3)
    a = dtr.task_masks(10, 20, 0.5, method="random")
    torch.manual_seed(3)
    b = dtr.task_masks(10, 20, 0.5, method="random")
    assert torch.equal(a, b)


@pytest.mark.parametrize("ratio", [0, 0.0, -0.5, 1.0001, 2, float("nan"), float("inf")])
def test_bad_sharing_ratio(ratio):
    with pytest.raises(ValueError, match=r"sharing_ratio must be in \(0, 1\]"):
        dtr.task_masks(10, 16, ratio)


@pytest.mark.parametrize("ratio", ["0.8", None, True])
def test_sharing_ratio_type(ratio):
    with pytest.raises(TypeError, match="sharing_ratio"):
        dtr.task_masks(10, 16, ratio)


def test_ratio_too_small_for_width():
    with pytest.raises(ValueError, match="leaves no active channel for width 8"):
        dtr.task_masks(10, 8, 0.1)


@given(st.integers(2, 5000))
def test_the_suggested_smallest_ratio_works_for_every_width(channels):
    """The error suggests a ratio; that ratio must leave one channel (at widths 48 and 64 a rounded 1/C did not)."""
    with pytest.raises(ValueError, match="use sharing_ratio >= ") as info:
        dtr.active_channels(channels, 0.5 / channels)
    suggested = float(str(info.value).rsplit(">= ", 1)[1])
    assert dtr.active_channels(channels, suggested) == 1
    assert suggested <= 2 / channels  # the smallest such decimal, not any ratio that works


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf")])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        dtr.task_masks(10, 16, 0.8, alpha)


@pytest.mark.parametrize("T", [0, -5])
def test_bad_num_tasks(T):
    with pytest.raises(ValueError, match="num_tasks must be an int >= 1"):
        dtr.task_masks(T, 16)
    with pytest.raises(TypeError, match="num_tasks"):
        dtr.task_masks(2.5, 16)


def test_bad_method_and_channels():
    with pytest.raises(ValueError, match="method must be one of 'dtr', 'random'"):
        dtr.task_masks(10, 16, method="learned")
    with pytest.raises(ValueError, match="channels must be an int >= 1"):
        dtr.task_masks(10, 0)


# -- timestep -> task ---------------------------------------------------------------------------


def test_timesteps_to_tasks_forms():
    T = 1000
    assert torch.equal(timesteps_to_tasks(torch.tensor([0, 5, 999]), T), torch.tensor([0, 5, 999]))
    assert timesteps_to_tasks(7, T).item() == 7
    assert timesteps_to_tasks(torch.tensor(3), T).ndim == 0
    # float DDPM timesteps round to the nearest task; flow matching's 1000.0 is task 999
    assert torch.equal(timesteps_to_tasks(torch.tensor([0.4, 0.6, 998.7, 1000.0]), T), torch.tensor([0, 1, 999, 999]))
    # continuous time: "unit" has data at 0, "unit_reversed" (SiT) has data at 1
    u = torch.tensor([0.0, 0.5, 1.0])
    assert torch.equal(timesteps_to_tasks(u, T, "unit"), torch.tensor([0, 500, 999]))  # round(499.5) = 500 (even)
    assert torch.equal(timesteps_to_tasks(u, T, "unit_reversed"), torch.tensor([999, 500, 0]))
    # (1 - sigma) * 1000, T = data (Mochi): T - t as a DDPM timestep
    assert torch.equal(
        timesteps_to_tasks(torch.tensor([0.0, 250.4, 1000.0]), T, "index_reversed"), torch.tensor([999, 750, 0])
    )
    # one timestep per token, and integer types narrower than int64
    assert torch.equal(timesteps_to_tasks(torch.tensor([[1, 2], [3, 999]]), T), torch.tensor([[1, 2], [3, 999]]))
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert torch.equal(timesteps_to_tasks(torch.tensor([0, 5, 200], dtype=dtype), T), torch.tensor([0, 5, 200]))


def test_floats_a_schedulers_rounding_puts_just_outside_the_range_count_as_its_end():
    """Sana-Sprint's first sigma is 1.0000037: a slack of 1e-4 of the range, no more."""
    assert timesteps_to_tasks(torch.tensor([1.0000037]), 1000, "unit").item() == 999
    assert timesteps_to_tasks(torch.tensor([-1e-6]), 1000, "unit").item() == 0
    assert timesteps_to_tasks(torch.tensor([1000.05]), 1000).item() == 999
    for t, kind in ((1.0002, "unit"), (1000.2, "index"), (-0.2, "index")):
        with pytest.raises(ValueError, match="timesteps must be in"):
            timesteps_to_tasks(torch.tensor([t]), 1000, kind)


@given(st.floats(0, 1))
def test_unit_time_maps_into_range_monotonically(u):
    a = timesteps_to_tasks(torch.tensor([u]), 1000, "unit").item()
    assert 0 <= a <= 999 and a == round(u * 999)  # both round half to even in float64


@pytest.mark.parametrize(
    "t, kind",
    [
        (torch.tensor([1000]), "index"),
        (torch.tensor([-1]), "index"),
        (torch.tensor([1000.5]), "index"),
        (torch.tensor([float("nan")]), "index"),
        (torch.tensor([1.01]), "unit"),
        (torch.tensor([-0.01]), "unit_reversed"),
        (torch.tensor([1001.0]), "index_reversed"),
        (torch.tensor([256], dtype=torch.int16) * 4, "index"),
    ],
)
def test_timesteps_out_of_range(t, kind):
    with pytest.raises(ValueError, match="timesteps must be in"):
        timesteps_to_tasks(t, 1000, kind)


def test_timesteps_bad_shape_and_type():
    with pytest.raises(ValueError, match="shape"):
        timesteps_to_tasks(torch.zeros(2, 3, 1, dtype=torch.long), 1000)
    with pytest.raises(TypeError, match="timestep"):
        timesteps_to_tasks("5", 1000)
    with pytest.raises(TypeError, match="timestep"):
        timesteps_to_tasks(True, 1000)


def test_mask_picture_cli(tmp_path):
    from PIL import Image

    from dtr.__main__ import main

    out = tmp_path / "m.png"
    main(["masks", "--channels", "64", "--sharing-ratio", "0.5", "--out", str(out)])
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] > 100
    # the drawn area is about half dark: the picture shows the masks, not an empty axis
    gray = np.asarray(img.convert("L"), dtype=float)
    assert 0.25 < (gray < 128).mean() < 0.75
