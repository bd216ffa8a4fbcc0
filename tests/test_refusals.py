"""No silent misrouting: channels-first input to a residual block, score-SDE timesteps, bad channel_axis; and the
command line's help, exit codes and output folders."""

import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DModel
from torch import nn

import dtr

T = 1000


class ConvResidual(nn.Module):
    """A channels-first residual block, y = x + conv(x), on (B, C, H, W)."""

    def __init__(self, channels=16):
        super().__init__()
        self.out_channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([ConvResidual(), ConvResidual()])

    def forward(self, x, t):
        for b in self.blocks:
            x = b(x)
        return x


class GroupNormResidual(nn.Module):
    """A user's channels-first block that declares no width: y = x + conv(GroupNorm(x))."""

    def __init__(self, channels=16):
        super().__init__()
        self.norm = nn.Sequential(nn.GroupNorm(4, channels))
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv(self.norm(x))


def reference_on_channels(model, x, t):
    """The formula with each sample's mask on axis 1, all positions (written out on the blocks' own forwards)."""
    m = dtr.task_masks(T, 16, 0.5)[t].float().view(x.shape[0], 16, *[1] * (x.ndim - 2))
    h = x
    for b in model.blocks:
        h = type(b).forward(b, m * h) + (1 - m) * h
    return h


@pytest.mark.parametrize("block", [ConvResidual, GroupNormResidual])
@pytest.mark.parametrize("shape", [(2, 16, 12, 12), (2, 16, 16, 16), (2, 16, 4, 4, 4)])
@pytest.mark.parametrize("declared", [False, True])
def test_channels_first_residual_blocks_are_routed_on_the_channels_their_layers_say(block, shape, declared):
    """Convolutions and group norms say channels first: routed on axis 1 at every position, also when H == W == C
    (0.3 refused these without channel_axis=1); channel_axis=1 says the same."""
    torch.manual_seed(0)
    model = ConvNet()
    model.blocks = nn.ModuleList([block(), block()])
    if len(shape) == 5:
        for b in model.blocks:
            b.conv = nn.Conv3d(16, 16, 3, padding=1)
    x, t = torch.randn(*shape), torch.tensor([0, 999])
    dtr.wrap(model, blocks=r"blocks\.\d", sharing_ratio=0.5, **({"channel_axis": 1} if declared else {}))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), reference_on_channels(model, x, t), rtol=0, atol=1e-5)


class TokensFirst(nn.Module):
    """A 1-d conv residual block on (B, C, L), as diffusers' UNet1DModel's ResConvBlock."""

    def __init__(self):
        super().__init__()
        self.out_channels = 16
        self.conv = nn.Conv1d(16, 16, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class Layerless(nn.Module):
    """A residual block whose only layer is a bare weight: nothing says where its channels are."""

    def __init__(self):
        super().__init__()
        self.out_channels = 16
        self.weight = nn.Parameter(torch.randn(16) * 0.3)

    def forward(self, x):
        return x + torch.tanh(x * self.weight.view(1, 16, *[1] * (x.ndim - 2)))


def test_a_channels_first_3d_block_is_routed_on_its_channels_and_a_layerless_one_refused():
    """Case 4 of issue 24: (B, C, L) blocks were masked along L (3.49 off at scale 3.6)."""
    torch.manual_seed(0)
    model = ConvNet()
    model.blocks = nn.ModuleList([TokensFirst(), TokensFirst()])
    dtr.wrap(model, blocks=r"blocks\.\d", sharing_ratio=0.5)
    x, t = torch.randn(2, 16, 10), torch.tensor([0, 999])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), reference_on_channels(model, x, t), rtol=0, atol=1e-5)
    plain = ConvNet()
    plain.blocks = nn.ModuleList([Layerless()])
    dtr.wrap(plain, blocks=["blocks.0"])
    with pytest.raises(
        ValueError, match="the module's width 16 is axis 1: for a channels-first block pass channel_axis=1"
    ):
        plain(torch.randn(2, 16, 10), torch.tensor([0, 999]))
    with pytest.raises(ValueError, match=r"takes a 4-d input .* none of its layers says .*channel_axis=1"):
        plain(torch.randn(2, 16, 3, 3), torch.tensor([0, 999]))


def test_gate_placement_checks_the_axis_it_masks_against_the_module():
    """A gate on a channels-last LayerNorm would mask tokens on axis 1: refused, naming the axis to use."""
    torch.manual_seed(0)
    net = LayerNormNet()
    dtr.wrap(net, blocks=["norm"], placement="gate")
    x, t = torch.randn(2, 16, 16), torch.tensor([0, 999])  # 16 tokens of width 16: axis 1 has the width's size too
    with pytest.raises(
        ValueError,
        match="gate placement masks axis 1 of 'norm'.*of size 5, but the module's width is 16: pass channel_axis=-1",
    ):
        net(torch.randn(2, 5, 16), t)
    dtr.unwrap(net)
    dtr.wrap(net, blocks=["norm"], placement="gate", channel_axis=-1)
    m = dtr.task_masks(T, 16, 0.8)[t].float()[:, None, :]
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), m * nn.LayerNorm.forward(net.norm, x), rtol=0, atol=0)


class LayerNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)

    def forward(self, x, t):
        return self.norm(x)


@pytest.mark.parametrize("axis", [0, 4, -5])
def test_channel_axis_outside_the_tensor_or_the_batch_axis_is_refused(axis):
    model = ConvNet()
    x, t = torch.randn(2, 16, 12, 12), torch.tensor([0, 999])
    if axis == 0:
        with pytest.raises(ValueError, match="channel_axis must not be 0"):
            dtr.wrap(model, blocks=r"blocks\.\d", channel_axis=0)
        return
    dtr.wrap(model, blocks=r"blocks\.\d", channel_axis=axis)
    with pytest.raises(
        ValueError, match=rf"channel_axis={axis} is not a channel axis .* \(allowed: 1 to 3, or -1 to -3\)"
    ):
        model(x, t)


def test_a_score_sde_unet_is_not_routed_until_its_timestep_kind_is_given():
    model = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        time_embedding_type="fourier",
    )
    with pytest.raises(
        ValueError, match="Fourier time embedding takes a noise level sigma.*timestep_kind=.*num_tasks="
    ):
        dtr.wrap(model)
    dtr.wrap(model, timestep_kind="unit")
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, 1\]"):
        model(x, torch.tensor([0.5, 50.0]))  # a sigma of 50 is not silently task 50


def test_timesteps_beyond_num_tasks_say_which_argument_to_change():
    model = ConvNet()
    dtr.wrap(model, blocks=r"blocks\.\d", channel_axis=1)
    with pytest.raises(ValueError, match="num_tasks="):
        model(torch.randn(2, 16, 4, 4), torch.tensor([0, 1500]))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "dtr", *args], capture_output=True, text=True, timeout=120)


def test_cli_help_explains_every_option_without_markup():
    r = cli("masks", "--help")
    assert r.returncode == 0 and "``" not in r.stdout
    for option in ("--channels", "--sharing-ratio", "--alpha", "--num-tasks", "--method", "--seed", "--out"):
        line = next(i for i, s in enumerate(r.stdout.splitlines()) if s.strip().startswith(option))
        assert len(" ".join(r.stdout.splitlines()[line : line + 2]).split()) > 3, (
            option
        )  # an option with words after it


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sharing-ratio", "1.5"], "sharing_ratio must be in (0, 1], got 1.5"),
        (["--channels", "0"], "channels"),
        (["--alpha", "-1"], "alpha"),
    ],
)
def test_cli_bad_values_exit_2_with_one_line(tmp_path, args, message):
    r = cli("masks", *args, "--out", str(tmp_path / "m.png"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_cli_creates_missing_folders(tmp_path):
    out = tmp_path / "a" / "b" / "m.png"
    r = cli("masks", "--channels", "64", "--sharing-ratio", "0.5", "--out", str(out))
    assert r.returncode == 0 and out.stat().st_size > 0 and "32 active per task" in r.stdout
