"""examples/train_unconditional_dtr.py (diffusers' train_unconditional.py with DTR) runs on the digits in seconds:
a run resumed from a mid-run checkpoint ends bit for bit where the uninterrupted run ends, every saved folder
carries the routing, and the saved pipeline loads back routed and computes what the trained EMA model computes."""

import copy
import importlib.util
import json
import os

import pytest
import torch
from diffusers import DDPMPipeline

import dtr

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


spec = importlib.util.spec_from_file_location(
    "train_unconditional_dtr", os.path.join(ROOT, "examples", "train_unconditional_dtr.py")
)
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)

# 6 optimizer steps of batch 8 over 40 digits (5 batches an epoch), so the run crosses an epoch; a checkpoint
# every 3 steps (mid-epoch); 4 sampling steps.
ARGS = [
    "--max_train_samples",
    "40",
    "--train_batch_size",
    "8",
    "--max_train_steps",
    "6",
    "--checkpointing_steps",
    "3",
    "--block_out_channels",
    "16,32",
    "--use_ema",
    "--ema_max_decay",
    "0.9",
    "--lr_warmup_steps",
    "2",
    "--sharing_ratio",
    "0.5",
    "--eval_batch_size",
    "2",
    "--ddpm_num_inference_steps",
    "4",
    "--resolution",
    "16",
]


def call(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model.eval()(torch.randn(4, 1, 16, 16, generator=g), torch.tensor([0, 999, 500, 37])).sample


def test_trains_resumes_exactly_and_reloads_the_pipeline_routed(tmp_path, caplog):
    full = example.main(ARGS + ["--output_dir", str(tmp_path / "full")])
    assert full["global_step"] == 6
    for folder in ("checkpoint-3/unet", "checkpoint-3/unet_ema", "checkpoint-6/unet_ema", "unet"):
        saved = json.loads((tmp_path / "full" / folder / "config.json").read_text())
        assert saved["dtr_routing"]["config"] == full["routing"].config.to_dict(), folder
        assert saved["dtr_routing"]["spec"] == full["routing"].spec.to_dict(), folder
        assert saved["dtr_routing_seal"], folder  # written by a routed model's save (the EMA's included)
    assert (tmp_path / "full" / "samples.png").is_file()

    # the saved pipeline is routed and is the trained EMA model
    averaged = copy.deepcopy(full["unet"])
    full["ema"].copy_to(averaged.parameters())
    pipeline_unet = full["pipeline"].unet
    assert dtr.routing_of(pipeline_unet).config == full["routing"].config
    torch.testing.assert_close(call(pipeline_unet), call(averaged), rtol=0, atol=0)
    assert not torch.equal(call(averaged), call(full["unet"]))  # the EMA is not the training weights
    unrouted = copy.deepcopy(pipeline_unet)
    dtr.unwrap(unrouted)
    assert not torch.allclose(call(unrouted), call(averaged), atol=1e-3)

    # resumed from checkpoint-3 in another folder: the same weights, EMA and saved pipeline, bit for bit
    resumed_dir = tmp_path / "resumed"
    caplog.clear()
    resumed = example.main(
        ARGS + ["--output_dir", str(resumed_dir), "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-3")]
    )
    assert resumed["global_step"] == 6
    # every load of the resume is routed: diffusers' plain-load warning about the record is never printed
    assert not [r for r in caplog.records if "dtr_routing" in r.getMessage()]
    for (name, a), b in zip(full["unet"].state_dict().items(), resumed["unet"].state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(full["ema"].shadow_params, resumed["ema"].shadow_params):
        assert torch.equal(a, b)
    assert full["ema"].optimization_step == resumed["ema"].optimization_step
    loaded = dtr.from_pretrained(DDPMPipeline, resumed_dir)
    torch.testing.assert_close(call(loaded.unet), call(averaged), rtol=0, atol=0)
    images = lambda p: p(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(0), output_type="np").images
    assert (images(loaded) == images(full["pipeline"])).all()

    # a checkpoint trained with another routing is refused on resume
    with pytest.raises(ValueError, match="another routing"):
        example.main(
            ARGS
            + [
                "--output_dir",
                str(tmp_path / "other"),
                "--sharing_ratio",
                "0.7",
                "--resume_from_checkpoint",
                str(tmp_path / "full" / "checkpoint-3"),
            ]
        )
