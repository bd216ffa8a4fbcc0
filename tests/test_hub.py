"""Routed models through the Hugging Face workflow (issues 18 and 24): the routing travels in the model's
config.json, sealed, so every save of a routed model writes it (model, pipeline, an EMAModel through
dtr.save_pretrained) and dtr.from_pretrained routes what was saved routed, from a folder, a subfolder, a Hub repo id
(an offline cache laid out as huggingface_hub lays it), a revision or a pipeline; a record that rode into a model
that was not routed (from_config, a plain load, EMAModel.save_pretrained) is never taken for one.  Outputs are
compared exactly with the model that was saved, and each routed model is checked to differ from the same weights
unrouted, so that an equality means the routing came back."""

import copy
import hashlib
import json
import logging
import os

import huggingface_hub
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from diffusers.training_utils import EMAModel
from helpers import diffusers_dit, unet2d, unet2d_call
from hub_helpers import MODELS, outputs, publish, trained

import dtr

KEY = "dtr_routing"
SEAL = "dtr_routing_seal"


def seal(record):
    """The seal a routed save writes beside its record, written out: SHA-256 of the record's canonical JSON."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@pytest.fixture
def diffusers_log():
    """The messages diffusers logs (its loggers do not propagate to pytest's caplog)."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty Hub cache and huggingface_hub in offline mode (HF_HUB_OFFLINE=1): only the cache answers."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub-cache"


def saved_record(folder):
    return json.loads((folder / "config.json").read_text())[KEY]


def assert_routed_as(loaded, model, routing, call):
    """``loaded`` is routed as ``model`` was and computes exactly what it computes (and the same weights unrouted
    compute something else)."""
    assert dtr.routing_of(loaded).config == routing.config
    assert dtr.routing_of(loaded).spec.to_dict() == routing.spec.to_dict()
    want = outputs(model, call)
    torch.testing.assert_close(outputs(loaded, call), want, rtol=0, atol=0)
    unrouted = copy.deepcopy(loaded)
    dtr.unwrap(unrouted)
    assert not torch.allclose(outputs(unrouted, call), want, atol=1e-3)


def trained_pipeline(**wrap_kwargs):
    model, routing = trained(unet2d, unet2d_call, **wrap_kwargs)
    return DDPMPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=1000)), routing


def samples(pipeline):
    return pipeline(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(0), output_type="np").images


#################################################################################
#                        A model's own folder and its config                    #
#################################################################################


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("how", ["model.save_pretrained", "dtr.save_pretrained"])
def test_a_routed_save_carries_its_routing_in_config_json_and_loads_back_routed(tmp_path, family, how, diffusers_log):
    cls, make, call = MODELS[family]
    model, routing = trained(make, call)
    model.save_pretrained(tmp_path) if how == "model.save_pretrained" else dtr.save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    record = saved[KEY]
    assert record["format_version"] == 4 and record["dtr_version"] == dtr.__version__
    assert record["config"] == routing.config.to_dict() and record["spec"] == routing.spec.to_dict()
    assert saved[SEAL] == seal(record) and saved["_use_default_values"] == [SEAL]  # diffusers drops it on load
    assert "dtr.from_pretrained" in record["load_with"]
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]  # diffusers' files

    loaded = dtr.from_pretrained(cls, tmp_path)
    assert_routed_as(loaded, model, routing, call)
    assert not any(KEY in m for m in diffusers_log)  # dtr.from_pretrained does not tell itself to use itself

    plain = cls.from_pretrained(tmp_path)  # the same weights, unrouted, and a warning that says so
    assert dtr.routing_of(plain) is None and type(plain) is cls
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in plain.state_dict().items())
    assert not torch.allclose(outputs(plain, call), outputs(model, call), atol=1e-3)
    assert any(KEY in m and "dtr.from_pretrained" in m for m in diffusers_log)


def test_wrap_writes_the_record_into_the_config_and_unwrap_takes_it_out(tmp_path):
    model = unet2d()
    before = dict(model.config)
    routing = dtr.wrap(model, sharing_ratio=0.5)
    assert model.config[KEY]["config"] == routing.config.to_dict()
    ema = copy.deepcopy(model)  # an EMA copy made by deepcopy is routed, and saves sealed too
    assert ema.config[KEY] == model.config[KEY]
    ema.save_pretrained(tmp_path / "ema")
    assert json.loads((tmp_path / "ema" / "config.json").read_text())[SEAL] == seal(model.config[KEY])
    dtr.unwrap(model)
    assert dict(model.config) == before and "to_json_string" not in model.__dict__
    again = dtr.wrap(model, sharing_ratio=0.7)
    routing.remove()  # an old handle removed twice leaves the new routing and its record alone
    assert dtr.routing_of(model) is again and model.config[KEY]["config"]["sharing_ratio"] == 0.7
    dtr.unwrap(model)
    model.save_pretrained(tmp_path)  # an unwrapped model saves unrouted
    assert KEY not in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize(
    "family, kwargs",
    [
        ("UNet2DModel", dict(blocks=r"down_blocks\.1\.resnets\.0\.norm2", placement="gate", sharing_ratio=0.5)),
        ("UNet2DModel", dict(blocks=["down_blocks.1.resnets.0"], channel_axis=1, sharing_ratio=0.5)),
        ("DiTTransformer2DModel", dict(method="random", seed=3, sharing_ratio=0.7)),
    ],
)
def test_non_default_routing_settings_survive_save_and_load(tmp_path, family, kwargs):
    """Chosen blocks, gate placement, channel_axis, the random method and its seed all come back from the folder."""
    cls, make, call = MODELS[family]
    model = make().eval()
    routing = dtr.wrap(model, **kwargs)
    model.save_pretrained(tmp_path)
    loaded = dtr.from_pretrained(cls, tmp_path)
    assert [r.name for r in dtr.routing_of(loaded).routed] == [r.name for r in routing.routed]
    assert_routed_as(loaded, model, routing, call)


@pytest.mark.parametrize("source", ["Routing.to_dict()", "record", "record after a plain load"])
def test_wrap_from_config_routes_an_unrouted_copy_the_same_way(tmp_path, source):
    model, routing = trained(unet2d, unet2d_call, steps=1)
    model.save_pretrained(tmp_path)
    copy_ = UNet2DModel.from_pretrained(tmp_path)
    config = {
        "Routing.to_dict()": routing.to_dict(),
        "record": model.config[KEY],
        "record after a plain load": copy_.config[KEY],
    }[source]
    dtr.wrap_from_config(copy_, config)
    assert_routed_as(copy_, model, routing, unet2d_call)


class Tiny(torch.nn.Module):
    """A routable model that is not a diffusers model (no config)."""

    def __init__(self):
        super().__init__()
        self.block = torch.nn.Linear(4, 4)

    def forward(self, x, t):
        return self.block(x)


def test_save_pretrained_refuses_what_it_cannot_save_routed(tmp_path):
    with pytest.raises(ValueError, match="UNet2DModel is not routed by dtr"):
        dtr.save_pretrained(unet2d(), tmp_path / "x")
    plain = Tiny()
    dtr.wrap(plain, blocks=["block"])
    with pytest.raises(TypeError, match="no diffusers config to carry its routing"):
        dtr.save_pretrained(plain, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # refused before anything is written


#################################################################################
#                     Subfolders, Hub repo ids and revisions                    #
#################################################################################


def test_subfolder_of_a_saved_pipeline(tmp_path):
    pipeline, routing = trained_pipeline()
    pipeline.save_pretrained(tmp_path)
    assert saved_record(tmp_path / "unet")["config"] == routing.config.to_dict()
    loaded = dtr.from_pretrained(UNet2DModel, tmp_path, subfolder="unet")
    assert_routed_as(loaded, pipeline.unet, routing, unet2d_call)


def test_repo_id_from_an_offline_cache_with_revisions(tmp_path, offline):
    """main and a branch v2 hold two routed saves with different routings; a commit hash names v2's too."""
    first, routing = trained_pipeline()
    first.save_pretrained(tmp_path / "first")
    publish(tmp_path / "first", offline, "org/digits")
    second, routing2 = trained_pipeline(sharing_ratio=0.7, alpha=1.5)
    second.save_pretrained(tmp_path / "second")
    commit = publish(tmp_path / "second", offline, "org/digits", revision="v2")

    loaded = dtr.from_pretrained(UNet2DModel, "org/digits", subfolder="unet", cache_dir=offline)
    assert_routed_as(loaded, first.unet, routing, unet2d_call)
    for revision in ("v2", commit):
        loaded = dtr.from_pretrained(UNet2DModel, "org/digits", subfolder="unet", cache_dir=offline, revision=revision)
        assert_routed_as(loaded, second.unet, routing2, unet2d_call)
    with pytest.raises(OSError, match="org/digits"):  # diffusers: a revision the cache does not hold
        dtr.from_pretrained(UNet2DModel, "org/digits", subfolder="unet", cache_dir=offline, revision="v3")


def test_repo_id_from_the_default_cache(tmp_path, offline, monkeypatch):
    """No cache_dir: huggingface_hub's HF_HUB_CACHE, as a user sets it."""
    model, routing = trained(unet2d, unet2d_call)
    model.save_pretrained(tmp_path / "model")
    publish(tmp_path / "model", offline, "org/unet")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(offline))
    assert_routed_as(dtr.from_pretrained(UNet2DModel, "org/unet"), model, routing, unet2d_call)


#################################################################################
#                                  Pipelines                                     #
#################################################################################


@pytest.mark.parametrize("where", ["folder", "repo id"])
def test_a_pipeline_class_loads_its_routed_components_routed(tmp_path, offline, where, diffusers_log):
    pipeline, routing = trained_pipeline()
    pipeline.save_pretrained(tmp_path / "pipe")
    source, kwargs = tmp_path / "pipe", {}
    if where == "repo id":
        publish(tmp_path / "pipe", offline, "org/pipe")
        source, kwargs = "org/pipe", {"cache_dir": offline}

    loaded = dtr.from_pretrained(DDPMPipeline, source, **kwargs)
    assert type(loaded) is DDPMPipeline and isinstance(loaded.scheduler, DDPMScheduler)
    assert_routed_as(loaded.unet, pipeline.unet, routing, unet2d_call)
    assert (samples(loaded) == samples(pipeline)).all()
    assert not any(KEY in m for m in diffusers_log)

    plain = DDPMPipeline.from_pretrained(source, **kwargs)  # diffusers' own: unrouted, with the warning
    assert dtr.routing_of(plain.unet) is None
    assert not (samples(plain) == samples(pipeline)).all()
    assert any(KEY in m and "dtr.from_pretrained" in m for m in diffusers_log)


def test_a_component_passed_in_is_kept_and_a_pipeline_with_nothing_routed_is_refused(tmp_path):
    pipeline, _ = trained_pipeline()
    pipeline.save_pretrained(tmp_path / "pipe")
    mine, routing = trained(unet2d, unet2d_call, sharing_ratio=0.6)
    loaded = dtr.from_pretrained(DDPMPipeline, tmp_path / "pipe", unet=mine)
    assert loaded.unet is mine and dtr.routing_of(mine) is routing
    with pytest.raises(ValueError, match="no component of the pipeline .*pipe is routed"):
        dtr.from_pretrained(DDPMPipeline, tmp_path / "pipe", unet=unet2d())
    DDPMPipeline(unet=unet2d(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "plain")
    with pytest.raises(
        ValueError, match="no component of the pipeline .*plain is routed.*DDPMPipeline.from_pretrained"
    ):
        dtr.from_pretrained(DDPMPipeline, tmp_path / "plain")


#################################################################################
#                                    EMAModel                                    #
#################################################################################


def ema_of_training(steps=3):
    model, routing = trained(unet2d, unet2d_call, steps=1)
    model.train()
    ema = EMAModel(model.parameters(), decay=0.5, model_cls=UNet2DModel, model_config=model.config)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(steps):
        unet2d_call(model, seed=20 + i).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.step(model.parameters())
    averaged = copy.deepcopy(model)
    ema.copy_to(averaged.parameters())
    assert not torch.equal(outputs(averaged, unet2d_call), outputs(model, unet2d_call))
    return model, routing, ema, averaged


def test_an_ema_of_a_routed_model_saves_and_loads_routed_through_dtr(tmp_path, diffusers_log):
    model, routing, ema, averaged = ema_of_training()
    dtr.save_pretrained(ema, tmp_path / "unet_ema")
    saved = json.loads((tmp_path / "unet_ema" / "config.json").read_text())
    assert saved[KEY]["config"] == routing.config.to_dict() and saved[SEAL] == seal(saved[KEY])
    assert saved["decay"] == 0.5 and saved["optimization_step"] == 3  # EMAModel's own state, as it saves it

    diffusers_log.clear()
    loaded = dtr.from_pretrained(UNet2DModel, tmp_path / "unet_ema")
    assert_routed_as(loaded, averaged, routing, unet2d_call)
    # diffusers still warns about EMAModel's own keys, and only about those
    assert any("'decay': 0.5" in m for m in diffusers_log) and not any(KEY in m for m in diffusers_log)
    back = dtr.from_pretrained(EMAModel, tmp_path / "unet_ema", model_cls=UNet2DModel)
    assert back.decay == 0.5 and back.optimization_step == 3
    assert all(torch.equal(a, b) for a, b in zip(back.shadow_params, ema.shadow_params))
    assert back.model_config[KEY]["config"] == routing.config.to_dict()  # so that it saves routed again
    dtr.save_pretrained(back, tmp_path / "again")
    assert_routed_as(dtr.from_pretrained(UNet2DModel, tmp_path / "again"), averaged, routing, unet2d_call)


def test_ema_model_save_pretrained_writes_an_unsealed_record_that_is_refused_with_what_to_do(tmp_path):
    """EMAModel.save_pretrained builds an unrouted model from the config: its record rode along, and is not a
    routing (0.3 loaded it routed).  dtr.save_pretrained(ema) is the routed save."""
    _, _, ema, _ = ema_of_training(steps=1)
    ema.save_pretrained(tmp_path)
    assert KEY in json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"not written by a routed model.*dtr.save_pretrained\(ema_model, path\)"):
        dtr.from_pretrained(UNet2DModel, tmp_path)


def test_an_ema_made_before_wrap_is_refused_with_the_reason(tmp_path):
    model = unet2d()
    ema = EMAModel(model.parameters(), model_cls=UNet2DModel, model_config=model.config)  # before wrap
    dtr.wrap(model)
    with pytest.raises(ValueError, match="carries no routing: it was made before dtr.wrap"):
        dtr.save_pretrained(ema, tmp_path)
    ema.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="carries no routing"):
        dtr.from_pretrained(UNet2DModel, tmp_path)


#################################################################################
#                        Stale routing and earlier formats                      #
#################################################################################


@pytest.mark.parametrize("how", ["unrouted model", "unwrapped model"])
def test_an_unrouted_save_over_a_routed_one_leaves_no_routing(tmp_path, how):
    model, _ = trained(unet2d, unet2d_call)
    model.save_pretrained(tmp_path)
    if how == "unrouted model":
        unet2d(seed=1).save_pretrained(tmp_path)
    else:
        dtr.unwrap(model)
        model.save_pretrained(tmp_path)
    os.remove(tmp_path / "diffusion_pytorch_model.safetensors")  # refused from config.json, before any weight
    with pytest.raises(ValueError, match=r"config.json carries no routing .*saved unrouted"):
        dtr.from_pretrained(UNet2DModel, tmp_path)


@pytest.mark.parametrize("how", ["from_config of a routed config", "plain from_pretrained, trained, saved"])
def test_a_record_that_rode_into_an_unrouted_model_is_never_loaded_as_a_routing(tmp_path, how, diffusers_log):
    """Case 3 of issue 24: diffusers copies unknown config keys into every model built from a config, so the record
    rides into models that are not routed; their saves are not routed saves (0.3 loaded them routed: 2.16 and 1.16
    off).  A plain load still warns, and its record still routes a copy by hand (wrap_from_config)."""
    model, routing = trained(unet2d, unet2d_call)
    model.save_pretrained(tmp_path / "a")
    if how == "from_config of a routed config":
        other = UNet2DModel.from_config(model.config)
    else:
        other = UNet2DModel.from_pretrained(tmp_path / "a")
        assert any(KEY in m and "dtr.from_pretrained" in m for m in diffusers_log)
    assert dtr.routing_of(other) is None and KEY in other.config  # diffusers kept the key
    opt = torch.optim.SGD(other.parameters(), lr=0.05)
    unet2d_call(other.train(), seed=5).square().mean().backward()  # trained unrouted
    opt.step()
    other.save_pretrained(tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert SEAL not in saved
    with pytest.raises(ValueError, match=r"b.config.json: the 'dtr_routing' record was not written by a routed model"):
        dtr.from_pretrained(UNet2DModel, tmp_path / "b")
    plain = UNet2DModel.from_pretrained(tmp_path / "b")  # what it is: the unrouted model that was saved
    torch.testing.assert_close(outputs(plain, unet2d_call), outputs(other, unet2d_call), rtol=0, atol=0)
    copy_ = UNet2DModel.from_pretrained(tmp_path / "a")
    dtr.wrap_from_config(copy_, copy_.config[KEY])  # by hand, the record of a routed save routes a copy
    assert_routed_as(copy_, model, routing, unet2d_call)


def test_an_edited_record_is_refused_until_sealed_again(tmp_path):
    model, routing = trained(unet2d, unet2d_call)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[KEY]["config"]["sharing_ratio"] = 0.9
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="seal does not match"):
        dtr.from_pretrained(UNet2DModel, tmp_path)
    config[SEAL] = seal(config[KEY])
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert dtr.routing_of(dtr.from_pretrained(UNet2DModel, tmp_path)).config.sharing_ratio == 0.9


def test_a_dtr_0_3_record_still_loads_routed(tmp_path):
    """dtr 0.3 wrote format 3 (flat, unsealed): read into this version's values."""
    model, routing = trained(unet2d, unet2d_call)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    c, sp = routing.config.to_dict(), routing.spec.to_dict()
    flat = {k: c[k] for k in ("sharing_ratio", "alpha", "method", "num_tasks", "seed")}
    flat.update({k: sp[k] for k in ("blocks", "placement", "io", "timestep_module", "timestep_arg", "timestep_kind")})
    flat["adapter"] = sp["adapter"]
    config[KEY] = {"load_with": "...", "format_version": 3, "dtr_version": "0.3.0", "routing": flat}
    del config[SEAL], config["_use_default_values"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_routed_as(dtr.from_pretrained(UNet2DModel, tmp_path), model, routing, unet2d_call)


def format1_file(routing):
    """The dtr_config.json dtr 0.2 wrote beside the weights for ``routing``."""
    c, s = routing.config, routing.spec
    return dict(
        format_version=1,
        dtr_version="0.2.0",
        method=c.method,
        sharing_ratio=c.sharing_ratio,
        alpha=c.alpha,
        num_tasks=c.num_tasks,
        seed=c.seed,
        blocks=list(s.blocks),
        placement=s.placement,
        timestep_module="",
        timestep_arg=[1, "t", "timestep", "timesteps"],
        timestep_kind=s.timestep_kind,
        adapter=s.adapter,
        channel_axis=None,
    )


def test_a_dtr_0_2_folder_loads_routed_with_a_warning_and_a_new_save_replaces_its_file(tmp_path):
    model, routing = trained(unet2d, unet2d_call)
    unrouted = copy.deepcopy(model)
    dtr.unwrap(unrouted)
    unrouted.save_pretrained(tmp_path)  # what dtr 0.2 wrote: diffusers' files, and the routing beside them
    (tmp_path / "dtr_config.json").write_text(json.dumps(format1_file(routing)))
    with pytest.warns(UserWarning, match="dtr_config.json.*earlier dtr.*Save the routed model again"):
        loaded = dtr.from_pretrained(UNet2DModel, tmp_path)
    assert_routed_as(loaded, model, routing, unet2d_call)
    dtr.save_pretrained(loaded, tmp_path)  # upgraded: the routing moves into config.json
    assert not (tmp_path / "dtr_config.json").exists()
    assert saved_record(tmp_path)["config"] == routing.config.to_dict()


def test_a_dtr_0_2_pipeline_loads_routed_from_its_component_file(tmp_path):
    pipeline, routing = trained_pipeline()
    unrouted = copy.deepcopy(pipeline.unet)
    dtr.unwrap(unrouted)
    DDPMPipeline(unet=unrouted, scheduler=pipeline.scheduler).save_pretrained(tmp_path)
    (tmp_path / "unet" / "dtr_config.json").write_text(json.dumps(format1_file(routing)))
    with pytest.warns(UserWarning, match="unet.dtr_config.json.*earlier dtr"):
        loaded = dtr.from_pretrained(DDPMPipeline, tmp_path)
    assert_routed_as(loaded.unet, pipeline.unet, routing, unet2d_call)


def test_only_the_main_process_touches_the_folder(tmp_path):
    model, _ = trained(unet2d, unet2d_call, steps=1)
    (tmp_path / "dtr_config.json").write_text("{}")
    dtr.save_pretrained(model, tmp_path, is_main_process=False)
    assert (tmp_path / "dtr_config.json").exists() and not (tmp_path / "config.json").exists()


#################################################################################
#                              Malformed records                                #
#################################################################################


def _set(path, value):
    def edit(data):
        *parents, last = path
        for p in parents:
            data = data[p]
        data[last] = value

    return edit


def _drop(path):
    def edit(data):
        *parents, last = path
        for p in parents:
            data = data[p]
        del data[last]

    return edit


RECORD_CASES = [  # (edit of config.json, the key the error must name); the record is sealed again after the edit
    (_set([KEY], [1, 2]), KEY),
    (_drop([KEY, "format_version"]), f"{KEY}.format_version"),
    (_set([KEY, "format_version"], 99), f"{KEY}.format_version"),
    (_drop([KEY, "config"]), f"{KEY}.config"),
    (_set([KEY, "spec"], "dtr"), f"{KEY}.spec"),
    (_set([KEY, "surprise"], 1), f"{KEY}.surprise"),
    (_drop([KEY, "spec", "blocks"]), "'blocks'"),
    (_set([KEY, "spec", "blocks"], []), "'blocks'"),
    (_set([KEY, "spec", "blocks"], ["no.such.block"]), "spec.blocks"),
    (_set([KEY, "config", "sharing_ratio"], 2.0), "'sharing_ratio'"),
    (_set([KEY, "config", "sharing_ratio"], "0.8"), "'sharing_ratio'"),
    (_set([KEY, "config", "alpha"], -1), "'alpha'"),
    (_set([KEY, "config", "method"], "dtrr"), "'method'"),
    (_set([KEY, "config", "num_tasks"], 0), "'num_tasks'"),
    (_set([KEY, "config", "seed"], 1.5), "'seed'"),
    (_set([KEY, "config", "task_axis"], "loglog"), "'task_axis'"),
    (_set([KEY, "spec", "placement"], "middle"), "'placement'"),
    (_set([KEY, "spec", "timestep_kind"], "sigma"), "'timestep_kind'"),
    (_set([KEY, "spec", "timestep_arg"], [1]), "'timestep_arg'"),
    (_set([KEY, "spec", "timestep_module"], 3), "'timestep_module'"),
    (_set([KEY, "spec", "io"], {"ResnetBlock2D": {"inputs": 0}}), "'io.ResnetBlock2D'"),
    (_set([KEY, "spec", "io"], [1]), "'io'"),
    (_set([KEY, "spec", "io"], {"ResnetBlock2D": {"channel_axis": 0}}), "'channel_axis'"),
    (_set([KEY, "spec", "extra"], 0), "'extra'"),
    (_set([KEY, "config", "extra"], 0), "'extra'"),
]


@pytest.mark.parametrize("edit, key", RECORD_CASES, ids=[k + f"-{i}" for i, (_, k) in enumerate(RECORD_CASES)])
def test_a_malformed_record_fails_in_one_line_naming_the_file_and_the_key(tmp_path, edit, key):
    model = unet2d()
    dtr.wrap(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    config[SEAL] = seal(config[KEY])  # sealed again: the record itself is what is checked
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises((ValueError, TypeError)) as info:
        dtr.from_pretrained(UNet2DModel, tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "config.json") in message and key in message, message


FILE_CASES = [
    ("{not json", "not valid JSON"),
    ("[]", "the file must be a JSON object"),
    (json.dumps({"format_version": 7}), "'format_version' is 7"),
    (json.dumps({"format_version": 1, "blocks": ["x"]}), "'sharing_ratio' is missing"),
]


@pytest.mark.parametrize("text, problem", FILE_CASES)
def test_a_malformed_dtr_config_json_fails_in_one_line_naming_the_file_and_the_key(tmp_path, text, problem):
    unet2d().save_pretrained(tmp_path)
    (tmp_path / "dtr_config.json").write_text(text)
    with pytest.raises(ValueError, match="dtr_config.json") as info:
        dtr.from_pretrained(UNet2DModel, tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "dtr_config.json") in message and problem in message, message


def test_a_class_that_is_not_diffusers_is_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match="diffusers model or pipeline class, got .*Linear"):
        dtr.from_pretrained(torch.nn.Linear, tmp_path)


def test_the_dit_family_saves_in_a_pipeline_subfolder_too(tmp_path):
    """A transformer saved as a pipeline's component (here alone) loads routed from its subfolder."""
    model, routing = trained(diffusers_dit, MODELS["DiTTransformer2DModel"][2])
    model.save_pretrained(tmp_path / "transformer")
    loaded = dtr.from_pretrained(DiTTransformer2DModel, tmp_path, subfolder="transformer")
    assert_routed_as(loaded, model, routing, MODELS["DiTTransformer2DModel"][2])
