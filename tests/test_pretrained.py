"""Saving and loading routed diffusers models: diffusers' own files plus dtr_config.json; plain from_pretrained
gives the unrouted model, dtr.from_pretrained the routed one, equal to the trained model it was saved from."""

import json
import os

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

import dtr
from helpers import INDEX_T, dit_call, diffusers_dit, unet2d, unet2d_call

MODELS = {"UNet2DModel": (UNet2DModel, unet2d, unet2d_call), "DiTTransformer2DModel": (DiTTransformer2DModel, diffusers_dit, dit_call)}


def trained(make, call, steps=3):
    """A routed model after a few optimizer steps, so saved weights differ from any fresh model's."""
    model = make().train()
    routing = dtr.wrap(model, sharing_ratio=0.5, alpha=2.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(steps):
        call(model, INDEX_T, seed=i).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), routing


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("how", ["dtr.save_pretrained", "model.save_pretrained"])
def test_save_then_load_keeps_the_routing(tmp_path, family, how):
    cls, make, call = MODELS[family]
    model, routing = trained(make, call)
    if how == "dtr.save_pretrained":
        dtr.save_pretrained(model, tmp_path)
    else:
        model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "dtr_config.json").read_text())
    assert saved["format_version"] == 1 and saved["dtr_version"] == dtr.__version__
    assert {k: saved[k] for k in routing.config} == json.loads(json.dumps(routing.config))
    with torch.no_grad():
        want = call(model, INDEX_T)
        # plain diffusers loads the same weights, as an unrouted model
        plain = cls.from_pretrained(tmp_path).eval()
        assert dtr.routing_of(plain) is None and type(plain) is cls
        trained_state = model.state_dict()
        assert all(torch.equal(v, trained_state[k]) for k, v in plain.state_dict().items())
        assert not torch.allclose(call(plain, INDEX_T), want, atol=1e-4)
        # dtr.from_pretrained routes it as it was trained
        loaded = dtr.from_pretrained(cls, tmp_path).eval()
        torch.testing.assert_close(call(loaded, INDEX_T), want, rtol=0, atol=0)
    assert dtr.routing_of(loaded).config == routing.config


def test_a_folder_saved_without_routing_or_by_another_format_is_refused(tmp_path):
    unet2d().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no dtr_config.json in .*saved without routing"):
        dtr.from_pretrained(UNet2DModel, tmp_path)
    with pytest.raises(ValueError, match="UNet2DModel is not routed by dtr"):
        dtr.save_pretrained(unet2d(), tmp_path / "x")
    assert not (tmp_path / "x").exists()  # refused before anything is written
    model = unet2d()
    dtr.wrap(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "dtr_config.json").read_text())
    (tmp_path / "dtr_config.json").write_text(json.dumps({**config, "format_version": 2, "dtr_version": "9.0"}))
    with pytest.raises(ValueError, match="format_version 2; this dtr reads format_version 1 \\(written by dtr 9.0\\)"):
        dtr.from_pretrained(UNet2DModel, tmp_path)


def test_wrap_from_config_routes_an_unrouted_copy_the_same_way():
    model, routing = trained(diffusers_dit, dit_call, steps=1)
    copy = diffusers_dit()
    copy.load_state_dict(model.state_dict())
    dtr.wrap_from_config(copy, routing.config)
    with torch.no_grad():
        torch.testing.assert_close(dit_call(copy.eval(), INDEX_T), dit_call(model, INDEX_T), rtol=0, atol=0)


def test_only_the_main_process_writes_the_routing(tmp_path):
    model = unet2d()
    dtr.wrap(model)
    model.save_pretrained(tmp_path, is_main_process=False)
    assert not os.path.exists(tmp_path / "dtr_config.json")


@pytest.mark.parametrize("family, kwargs", [
    ("UNet2DModel", dict(blocks=r"down_blocks\.1\.resnets\.0\.norm2", placement="gate", sharing_ratio=0.5)),
    ("UNet2DModel", dict(blocks=["down_blocks.1.resnets.0"], channel_axis=1, sharing_ratio=0.5)),
    ("DiTTransformer2DModel", dict(method="random", seed=3, sharing_ratio=0.7)),
])
def test_non_default_routing_settings_survive_save_and_load(tmp_path, family, kwargs):
    """Chosen blocks, gate placement, channel_axis, random method and its seed all come back from the folder."""
    cls, make, call = MODELS[family]
    model = make().eval()
    routing = dtr.wrap(model, **kwargs)
    dtr.save_pretrained(model, tmp_path)
    loaded = dtr.from_pretrained(cls, tmp_path).eval()
    assert dtr.routing_of(loaded).config == routing.config
    assert [r.name for r in dtr.routing_of(loaded).routed] == [r.name for r in routing.routed]
    with torch.no_grad():
        torch.testing.assert_close(call(loaded, INDEX_T), call(model, INDEX_T), rtol=0, atol=0)


def test_an_unwrapped_model_saves_without_routing(tmp_path):
    """After dtr.unwrap the model's save_pretrained is diffusers' own again: no dtr_config.json is written."""
    model = unet2d()
    dtr.wrap(model)
    dtr.unwrap(model)
    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "config.json") and not os.path.exists(tmp_path / "dtr_config.json")
