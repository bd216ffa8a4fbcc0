"""A routed diffusers model in the Hugging Face workflow: PEFT LoRA in either order and merge_and_unload,
accelerate's prepare / unwrap_model / save_model / save_state / load_state."""

import copy

import torch
from accelerate import Accelerator
from helpers import INDEX_T, unet_cond, unet_cond_call
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import dtr

LORA = dict(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)


def lora(model, seed=0):
    torch.manual_seed(seed)  # init_lora_weights=False: random A and B, so LoRA changes the output
    return get_peft_model(model, LoraConfig(**LORA))


def test_lora_then_wrap_and_wrap_then_lora_route_the_same_and_merge():
    base = unet_cond()
    with torch.no_grad():
        unrouted_lora = unet_cond_call(lora(copy.deepcopy(base)), INDEX_T)

        a = lora(copy.deepcopy(base))  # LoRA first: wrap looks through the PeftModel to the UNet
        routing = dtr.wrap(a, sharing_ratio=0.5)
        assert dtr.routing_of(a) is routing and routing.model is a.get_base_model()
        b_model = copy.deepcopy(base)
        dtr.wrap(b_model, sharing_ratio=0.5)  # routing first, LoRA injected into the routed model
        b = lora(b_model)

        out_a, out_b = unet_cond_call(a, INDEX_T), unet_cond_call(b, INDEX_T)
        torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
        assert not torch.allclose(out_a, unrouted_lora, atol=1e-4)  # routed
        merged = a.merge_and_unload()
        assert dtr.routing_of(merged) is routing
        torch.testing.assert_close(unet_cond_call(merged, INDEX_T), out_a, rtol=1e-4, atol=1e-5)
        dtr.unwrap(b)
        torch.testing.assert_close(unet_cond_call(b, INDEX_T), unrouted_lora, rtol=0, atol=0)


def test_lora_trains_only_the_adapters_of_a_routed_model():
    model = lora(unet_cond())
    dtr.wrap(model, sharing_ratio=0.5)
    before = {n: p.clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    unet_cond_call(model.train(), INDEX_T).square().mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def train_steps(accelerator, model, opt, steps, seed):
    for i in range(steps):
        loss = unet_cond_call(model, INDEX_T, seed=seed + i).square().mean()
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()


def test_accelerate_prepare_unwrap_save_model_and_state_round_trip(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = unet_cond().train()
    routing = dtr.wrap(model, sharing_ratio=0.5)  # wrap first, then prepare
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = accelerator.prepare(model, opt)
    assert dtr.routing_of(model) is routing and dtr.routing_of(accelerator.unwrap_model(model)) is routing
    train_steps(accelerator, model, opt, 2, seed=0)
    accelerator.save_state(tmp_path / "state")
    accelerator.save_model(model, tmp_path / "weights")
    train_steps(accelerator, model, opt, 2, seed=10)
    with torch.no_grad():
        want = unet_cond_call(model.eval(), INDEX_T)

    # save_model: the plain weights (routing adds none) load into an unrouted model of the same config
    saved = load_file(tmp_path / "weights" / "model.safetensors")
    assert saved.keys() == accelerator.unwrap_model(model).state_dict().keys()

    # load_state into a fresh routed model and optimizer, then the same two steps: the same weights, bit for bit
    fresh = unet_cond().train()
    dtr.wrap(fresh, sharing_ratio=0.5)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    resumed = Accelerator(cpu=True)  # a new process's accelerator: it holds only the fresh model
    fresh, fresh_opt = resumed.prepare(fresh, fresh_opt)
    resumed.load_state(tmp_path / "state")
    train_steps(resumed, fresh, fresh_opt, 2, seed=10)
    with torch.no_grad():
        torch.testing.assert_close(unet_cond_call(fresh.eval(), INDEX_T), want, rtol=0, atol=0)
