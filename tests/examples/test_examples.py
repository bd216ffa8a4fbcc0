"""examples/adm_unet.py, the paper's U-Net baseline: dtr.wrap(model) gates every ResBlock's out_layers[0] and every
AttentionBlock's norm, each width with its own mask, against a hand-built reference (tests/helpers.py)."""

import adm_unet
import pytest
import torch
from adm_unet import ADMUNet
from helpers import INDEX_T, grads, perturbed, reference

import dtr


def adm(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(
        image_size=8,
        in_channels=1,
        model_channels=8,
        channel_mult=(1, 2),
        attention_ds=(2,),
        num_res_blocks=1,
        groups=4,
        num_heads=2,
        num_classes=10,
    )
    return perturbed(ADMUNet(**{**cfg, **kw}), seed, 0.1)


def adm_call(model, t, seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return model(x, t, y)


def gate_names(model):
    """Written out independently of the adapter: ResBlock.out_layers.0, AttentionBlock.norm."""
    names = []
    for n, m in model.named_modules():
        if isinstance(m, adm_unet.ResBlock):
            names.append(f"{n}.out_layers.0")
        elif isinstance(m, adm_unet.AttentionBlock):
            names.append(f"{n}.norm")
    return names


def test_wrap_gates_every_resblock_and_attention_norm_at_both_widths():
    model = adm()
    routing = dtr.wrap(model, sharing_ratio=0.8)
    assert routing.spec.adapter == "ADM U-Net" and routing.spec.placement == "gate"
    assert sorted(r.name for r in routing.routed) == sorted(gate_names(model))
    assert routing.widths() == [8, 16]


def test_routed_adm_equals_the_hand_built_reference_and_ratio_one_is_the_identity():
    model = adm()
    ref = reference(model, gate_names(model), "gate", INDEX_T, ratio=0.5, alpha=2.0)
    with torch.no_grad():
        plain = adm_call(model, INDEX_T)
        routing = dtr.wrap(model, sharing_ratio=0.5, alpha=2.0)
        out = adm_call(model, INDEX_T)
        torch.testing.assert_close(out, adm_call(ref, INDEX_T), rtol=0, atol=1e-6)
        assert not torch.allclose(out, plain, atol=1e-4)
        routing.remove()
        dtr.wrap(model, sharing_ratio=1.0)
        assert torch.equal(adm_call(model, INDEX_T), plain)


def test_nan_timesteps_fail_loudly():
    model = adm()
    dtr.wrap(model)
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, 1000\]"), torch.no_grad():
        adm_call(model, torch.tensor([0.0, 1.0, float("nan"), 3.0]))


def test_checkpointed_adm_gradients_equal_plain_ones():
    model = adm().train()
    dtr.wrap(model)
    batches = [(1, torch.tensor([0, 999, 500, 37])), (2, torch.tensor([998, 1, 2, 640]))]
    loss = lambda: sum(adm_call(model, t, seed=s).square().mean() for s, t in batches)  # noqa: E731
    plain = grads(model, loss)
    model.use_checkpoint = True  # two forwards before one backward: each recomputation uses its own timesteps
    checkpointed = grads(model, loss)
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)


def test_diffusers_example_trains_samples_and_writes_a_grid(tmp_path):
    import diffusers_unet
    from PIL import Image

    out = tmp_path / "grid.png"
    diffusers_unet.main(
        ["--steps", "2", "--batch-size", "8", "--sample-steps", "2", "--num-samples", "4", "--out", str(out)]
    )
    assert Image.open(out).size == (4 * (2 * 17 + 1), 4 * (2 * 17 + 1))
