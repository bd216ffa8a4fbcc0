"""Every diffusers transformer family (and the U-Nets) routed by `dtr.wrap(model)` alone, against references
written here or in tests/family_checks.py, never computed with dtr: the families tables of docs/adapters.md,
dual-stream blocks with as many text as image tokens, joined [text; image] streams, HunyuanDiT's long skips,
per-token (B, N) timesteps, each pipeline's timesteps read as its noise level, and errors naming the argument.
"""

import copy

import diffusers
import pytest
import torch

if tuple(int(v) for v in diffusers.__version__.split(".")[:2]) < (0, 42):
    pytest.skip(
        f"the families are declared and checked against diffusers 0.42 (installed: {diffusers.__version__}); "
        "older layouts are checked by tests/test_families_older.py",
        allow_module_level=True,
    )

import diffusers_families as F  # noqa: E402
import family_checks as C  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import dtr  # noqa: E402

SETTINGS = settings(max_examples=8, deadline=None, derandomize=True)
with open(C.DOC) as _doc:
    TEXT = _doc.read()
DOC_ROWS = [{row.split(" | ")[0].strip("| "): row for row in table.splitlines()[2:]} for table in C.doc_tables(TEXT)]
SLOW = {"DiT", "PixArt-alpha/sigma", "Flux", "Wan", "UNet2D"}  # their row includes compiling the model


def _param(name):
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name


# ---- the families tables: every check of every family, and the rows docs/adapters.md shows


@pytest.mark.parametrize("name", [_param(n) for n in C.CASES])
def test_family_routes_by_default_and_passes_every_check(name):
    """Default wrap, declared blocks and streams, timestep kind, ratio 1.0, reference, batch, grads, checkpointing,
    save/load, compile, and the real pipeline's tasks; then its two rows of docs/adapters.md are the computed ones."""
    failed = {check: C.result(name, check) for check in C.CHECKS if C.result(name, check).startswith("✗")}
    assert not failed, failed
    assert C.routing_row(name) == DOC_ROWS[0].get(name), "regenerate: PYTHONPATH=src python tests/family_checks.py"
    assert C.checks_row(name) == DOC_ROWS[1].get(name), "regenerate: PYTHONPATH=src python tests/family_checks.py"


def test_doc_tables_list_every_family_in_order():
    routing, checks = C.doc_tables(TEXT)
    assert routing.splitlines()[:2] == C.ROUTING_HEADER.splitlines()
    assert checks.splitlines()[:2] == C.CHECKS_HEADER.splitlines()
    assert list(DOC_ROWS[0]) == list(DOC_ROWS[1]) == list(C.CASES)
    assert "route the same way" not in TEXT


# ---- dual-stream blocks: the image stream routed, the text stream untouched, also when they have equal length


def _equal_tokens(name, batch, t):
    """Inputs with as many text tokens as image tokens (16): a wrong stream would not fail on shapes."""
    args, kwargs = C.CASES[name].inputs(batch, t)
    kwargs["encoder_hidden_states"] = F.text(32, batch, length=8 if name == "AuraFlow" else 16)  # + 8 registers
    if "txt_ids" in kwargs:
        kwargs["txt_ids"] = torch.zeros(16, 3)
    if "attention_mask" in kwargs:  # Chroma: prompt mask over text and image tokens
        kwargs["attention_mask"] = torch.ones(batch, 32, dtype=torch.bool)
    return args, kwargs


class Record(torch.nn.Module):
    """Put around a routed block: records what it was called with and what it returned (routing runs inside)."""

    def __init__(self, block):
        super().__init__()
        self.block, self.calls = block, []

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out


DUAL = [
    ("Flux", ["transformer_blocks.0", "single_transformer_blocks.1"]),
    ("SD3/SD3.5", ["transformer_blocks.0", "transformer_blocks.1"]),
    ("Chroma", ["transformer_blocks.0"]),
    ("AuraFlow", ["joint_transformer_blocks.0"]),
]


@pytest.mark.parametrize("name,blocks", DUAL)
def test_dual_stream_blocks_route_the_image_stream_and_return_the_text_stream_as_computed(name, blocks):
    """Text tokens == image tokens: each recorded block output equals, on both streams, the unrouted block's on
    (text, m * image), with (1 - m) * image added to the image stream only (SD3's last block returns no text)."""
    case, t = C.CASES[name], C.CASES[name].mid()
    routed = case.make()
    dtr.wrap(routed)
    plain = case.make()
    recorders = {}
    for block in blocks:
        recorders[block] = Record(routed.get_submodule(block))
        C._set(routed, block, recorders[block])
    with torch.no_grad():
        routed(*_equal_tokens(name, 2, t)[0], **_equal_tokens(name, 2, t)[1])
        for block in blocks:
            ((args, kwargs, (text_out, image_out)),) = recorders[block].calls
            x, txt = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
            assert x.shape == txt.shape == (2, 16, 16)
            m = C.State(tasks=case.tasks(t)).mask(x)
            ref_text, ref_image = plain.get_submodule(block)(*args, **{**kwargs, "hidden_states": m * x})
            torch.testing.assert_close(image_out, ref_image + (1 - m) * x, rtol=1e-5, atol=1e-6)
            if ref_text is None:
                assert text_out is None and block == "transformer_blocks.1"  # SD3's context_pre_only block
            else:
                torch.testing.assert_close(text_out, ref_text, rtol=1e-5, atol=1e-6)
                assert not torch.allclose(text_out, ref_text + (1 - m) * x, atol=1e-3)


# ---- joined [text; image] streams: only the image tokens routed, wherever each sample's caption ends


@pytest.fixture(scope="module")
def lumina2():
    case, state = C.CASES["Lumina 2"], C.State()
    routed = case.make()
    dtr.wrap(routed)
    return case, routed, C.reference_model(case, state), state


@SETTINGS
@given(
    lengths=st.lists(st.integers(1, F.TEXT_LEN), min_size=2, max_size=2),
    sigmas=st.lists(st.floats(0, 1), min_size=2, max_size=2),
)
def test_lumina2_routes_each_samples_image_tokens_behind_its_own_caption(lumina2, lengths, sigmas):
    """Captions of different lengths are padded per sample: the routed model equals the reference that masks
    tokens [caption_i, caption_i + N) of sample i, for any caption lengths and noise levels."""
    case, routed, reference, state = lumina2
    t = 1 - torch.tensor(sigmas)  # Lumina2Pipeline passes 1 - sigma
    args, kwargs = case.inputs(2, t)
    mask = torch.arange(F.TEXT_LEN)[None, :] < torch.tensor(lengths)[:, None]
    kwargs["encoder_attention_mask"] = mask
    state.tasks, state.text = case.tasks(t), mask.sum(1)
    with torch.no_grad():
        got, want = routed(*args, **kwargs)[0], reference(*args, **kwargs)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_joined_block_returns_its_text_rows_as_computed():
    """AuraFlow's single block: rows before the image tokens are the block's own output on (text, m * image)."""
    case, t = C.CASES["AuraFlow"], C.CASES["AuraFlow"].mid()
    routed = case.make()
    dtr.wrap(routed)
    recorder = Record(routed.single_transformer_blocks[0])
    routed.single_transformer_blocks[0] = recorder
    plain = case.make().single_transformer_blocks[0]
    with torch.no_grad():
        case.run(routed, t)
        ((args, kwargs, out),) = recorder.calls
        x = kwargs["hidden_states"]
        n_text = x.shape[1] - C.IMAGE_TOKENS
        assert n_text == 8 + F.TEXT_LEN  # 8 register tokens, then the prompt
        m = C.State(tasks=case.tasks(t)).mask(x)
        image = torch.cat([torch.ones_like(x[:, :n_text]), m.expand_as(x)[:, n_text:]], 1)
        want = plain(**{**kwargs, "hidden_states": image * x}) + (1 - image) * x
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(image[:, :n_text], torch.ones_like(image[:, :n_text]))


# ---- HunyuanDiT long skips: h + F(m * h) on h = skip_linear(skip_norm(cat(x, skip)))


def test_hunyuan_long_skip_block_routes_the_residual_it_has():
    """With every weight of the long-skip block zero but its skip merge, F vanishes: the routed block must return
    h itself (m * h + (1 - m) * h), where routing its input x as a plain residual would return m * h + (1 - m) * x."""
    case, t = C.CASES["HunyuanDiT"], C.CASES["HunyuanDiT"].mid()
    model = case.make()
    block = model.blocks[3]
    assert block.skip_linear is not None and [b.skip_linear is None for b in model.blocks[:3]] == [True] * 3
    with torch.no_grad():
        for name, p in block.named_parameters():
            if not name.startswith(("skip_linear", "skip_norm")):
                p.zero_()
    routing = dtr.wrap(model)
    assert "stream from 'skip_linear'" in routing.summary()
    recorder = Record(block)
    model.blocks[3] = recorder
    with torch.no_grad():
        case.run(model, t)
        ((args, kwargs, out),) = recorder.calls
        x, skip = args[0], kwargs["skip"]
        h = block.skip_linear(block.skip_norm(torch.cat([x, skip], -1)))
        torch.testing.assert_close(out, h, rtol=0, atol=1e-6)
        m = C.State(tasks=case.tasks(t)).mask(x)
        assert not torch.allclose(out, m * h + (1 - m) * x, atol=1e-3)


# ---- per-token (B, N) timesteps: Wan 2.2 TI2V, LTX-Video image-to-video


@pytest.fixture(scope="module", params=["Wan", "LTX-Video"])
def per_token(request):
    case, state = C.CASES[request.param], C.State()
    routed = case.make()
    dtr.wrap(routed)
    return case, routed, C.reference_model(case, state), state


@SETTINGS
@given(data=st.data())
def test_per_token_timesteps_route_each_token_by_its_own_task(per_token, data):
    """Any (B, N) timesteps: the routed model equals the reference masking each token by its own task; tokens that
    share their sample's timestep route exactly as the (B,) timestep does."""
    case, routed, reference, state = per_token
    shape = case.family.per_token_shape(2)
    values = data.draw(st.lists(st.integers(0, 1000), min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))
    t = torch.tensor(values, dtype=torch.float32).view(shape)
    t[:, : shape[1] // 4] = 0.0  # a clean conditioning frame, as the image-to-video pipelines pass
    args, kwargs = case.inputs(2, t)
    state.tasks = case.tasks(t)
    with torch.no_grad():
        torch.testing.assert_close(case.run(routed, t), case.run(reference, t), rtol=1e-5, atol=1e-6)
        per_sample = t[:, -1]
        shared = per_sample[:, None].expand(shape).contiguous()
        torch.testing.assert_close(case.run(routed, shared), case.run(routed, per_sample), rtol=1e-5, atol=1e-5)


def test_per_token_masks_equal_per_sample_masks_when_tokens_share_a_timestep():
    """The masks the routed blocks apply (B, N, C) are the per-sample masks repeated over tokens, bit for bit."""
    case = C.CASES["Wan"]
    model = case.make()
    routing = dtr.wrap(model)
    seen = {}

    def hook(module, args, kwargs, out):
        x = kwargs.get("hidden_states", args[0] if args else None)
        seen.setdefault("tasks", []).append(routing.current_tasks().clone())
        seen.setdefault("x", []).append(x)

    handle = model.blocks[0].register_forward_hook(hook, with_kwargs=True)
    t = torch.tensor([700.0, 20.0])
    with torch.no_grad():
        case.run(model, t)
        case.run(model, t[:, None].expand(case.family.per_token_shape(2)).contiguous())
    handle.remove()
    per_sample, per_tok = seen["tasks"]
    assert per_sample.shape == (2,) and per_tok.shape == case.family.per_token_shape(2)
    assert torch.equal(per_tok, per_sample[:, None].expand_as(per_tok))
    # the block received the masked stream: equal under both forms
    assert torch.equal(seen["x"][0], seen["x"][1])


# ---- each pipeline's timestep read as the noise level it means


def _pipeline_value(convention, sigma):
    """What a pipeline of `convention` passes at noise level sigma (1 = noise)."""
    return {
        "index": round(sigma * 999),
        "sigma1000": sigma * 1000,
        "sigma": sigma,
        "one_minus_sigma": 1 - sigma,
        "one_minus_sigma1000": (1 - sigma) * 1000,
    }[convention]


@pytest.fixture(scope="module")
def routed_models():
    models = {}
    for name, case in C.CASES.items():
        model = case.make()
        dtr.wrap(model)
        models[name] = model
    return models


@SETTINGS
@given(sigma=st.floats(0, 1), name=st.sampled_from(list(C.CASES)))
def test_every_family_reads_its_pipelines_timestep_as_its_noise_level(routed_models, sigma, name):
    """The task each family's routed blocks see for the value its pipeline passes at noise level sigma is that
    value's task in the pipeline's convention, and within one task of round(sigma * 999)."""
    case, model = C.CASES[name], routed_models[name]
    value = torch.tensor([_pipeline_value(case.convention, sigma)] * 2)
    value = value.round().long() if case.timestep_dtype == torch.int64 else value.float()
    seen = []
    first = dtr.routing_of(model).routed[0].module
    handle = first.register_forward_hook(lambda *a: seen.append(dtr.routing_of(model).current_tasks().clone()))
    with torch.no_grad():
        case.run(model, value)
    handle.remove()
    assert torch.equal(seen[0], case.tasks(value))
    assert (seen[0] - round(sigma * 999)).abs().max() <= 1


@pytest.mark.parametrize(
    "name,value,task",
    [
        ("Flux", 1.0, 999),
        ("Flux", 0.6128, 612),
        ("SD3/SD3.5", 1000.0, 999),
        ("SD3/SD3.5", 8.93, 9),
        ("Sana", 999.0, 999),
        ("Sana-Sprint", 1.0000037, 999),
        ("Lumina-Next", 0.0, 999),
        ("Lumina 2", 0.999, 1),
        ("Mochi", 0.0, 999),
        ("Mochi", 25.0, 975),
        ("HunyuanDiT", 500.0, 500),
        ("Wan", 999, 999),
        ("AuraFlow", 0.003, 3),
    ],
)
def test_the_values_pipelines_pass_map_to_their_tasks(routed_models, name, value, task):
    """Values recorded from the real 2-step pipelines (docs/adapters.md), including Sana-Sprint's 1 + 3.7e-6."""
    case, model = C.CASES[name], routed_models[name]
    t = torch.tensor([value, value], dtype=case.timestep_dtype if isinstance(value, int) else torch.float32)
    seen = []
    first = dtr.routing_of(model).routed[0].module
    handle = first.register_forward_hook(lambda *a: seen.append(dtr.routing_of(model).current_tasks().clone()))
    with torch.no_grad():
        case.run(model, t)
    handle.remove()
    assert seen[0].tolist() == [task, task]


def test_sana_reads_the_convention_of_the_pipeline_its_config_serves():
    sana, sprint = C.CASES["Sana"].make(), C.CASES["Sana-Sprint"].make()
    assert type(sana) is type(sprint) and sprint.config.guidance_embeds and not sana.config.guidance_embeds
    a, b = dtr.wrap(sana), dtr.wrap(sprint)
    assert (a.spec.timestep_kind, b.spec.timestep_kind) == ("index", "unit")
    for routing in (a, b):
        assert "SanaPipeline passes sigma * 1000" in routing.summary()
        assert "SanaSprintPipeline" in routing.summary()
    assert "timestep read as SanaSprintPipeline passes it" in b.summary()
    dtr.unwrap(sana)
    assert dtr.wrap(sana, timestep_kind="unit").spec.timestep_kind == "unit"  # a custom sampler says so


# ---- errors name the argument dtr read, and say what to pass


def test_pixart_and_cogvideox_called_positionally_route_by_their_timestep():
    """The adapters read `timestep` by name: a positional call (its third argument) routes as the keyword call."""
    for name in ("PixArt-alpha/sigma", "CogVideoX"):
        case, t = C.CASES[name], C.CASES[name].mid()
        model = case.make()
        dtr.wrap(model)
        args, kwargs = case.inputs(2, t)
        args = args or (kwargs.pop("hidden_states"),)
        positional = args + (kwargs.pop("encoder_hidden_states"), kwargs.pop("timestep"))
        with torch.no_grad():
            got = model(*positional, **kwargs)[0]
            assert torch.equal(got, case.run(model, t))
            assert not torch.allclose(got, case.run(model, t.flip(0)), atol=1e-3)


def test_a_wrong_timestep_argument_is_named_with_its_shape():
    case = C.CASES["PixArt-alpha/sigma"]
    model = case.make()
    dtr.wrap(model, timestep_arg=1)
    read = r"argument 'encoder_hidden_states' at position 1 of PixArtTransformer2DModel.forward"
    with pytest.raises(ValueError, match=read + r": a tensor of shape \(2, 6, 32\).*timestep_arg="):
        case.run(model, case.mid())
    model = C.CASES["CogVideoX"].make()
    with pytest.raises(ValueError, match="timestep_arg 9 is not a position of CogVideoXTransformer3DModel.forward"):
        dtr.wrap(model, timestep_arg=9)


def test_a_model_without_a_timestep_asks_for_blocks_then_for_timestep_arg():
    uvit = diffusers.UVit2DModel(
        hidden_size=16,
        cond_embed_dim=16,
        micro_cond_encode_dim=4,
        micro_cond_embed_dim=40,
        encoder_hidden_size=16,
        vocab_size=17,
        codebook_size=16,
        in_channels=16,
        block_out_channels=16,
        num_res_blocks=1,
        block_num_heads=2,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    with pytest.raises(ValueError, match="does not know where to route a UVit2DModel: pass blocks="):
        dtr.wrap(uvit)
    with pytest.raises(
        ValueError,
        match=r"cannot tell which argument of UVit2DModel.forward\(input_ids, "
        r"encoder_hidden_states, .*is the timestep.*pass timestep_arg=",
    ):
        dtr.wrap(uvit, blocks=r"transformer_layers\.\d+")
    assert dtr.routing_of(uvit) is None


def test_a_tuple_output_without_a_declared_stream_is_refused_at_the_first_call():
    """Routing Flux's dual-stream blocks by hand without block_io= fails, naming the block, rather than add the
    image residual to the text stream."""
    case = C.CASES["Flux"]
    model = case.make()
    dtr.wrap(model, blocks=r"transformer_blocks\.\d+", block_io=dtr.BlockIO("hidden_states"), timestep_kind="unit")
    with pytest.raises(ValueError, match=r"'transformer_blocks.0' returns a tuple of 2; say which element carries"):
        case.run(model, case.mid())


def test_the_summary_says_what_is_routed_and_which_convention_was_chosen():
    routing = dtr.wrap(C.CASES["AuraFlow"].make())
    text = routing.summary()
    assert "diffusers AuraFlowTransformer2DModel adapter" in text and "(unit)" in text
    assert "AuraFlowSingleTransformerBlock: input 'hidden_states', output None, joined [text; image]" in text
    assert "AuraFlowJointTransformerBlock: input 'hidden_states', output 1" in text
    assert "image tokens of joined streams: counted from argument 'hidden_states' (patch (2, 2))" in text
    assert "timestep read as AuraFlowPipeline passes it: sigma in [0, 1], 1 = noise" in text


def test_copies_of_routed_families_route_by_their_own_inputs():
    """An EMA copy (copy.deepcopy) of a model with joined and long-skip streams routes like the original."""
    for name in ("HunyuanDiT", "Lumina 2"):
        case, t = C.CASES[name], C.CASES[name].mid()
        model = case.make()
        dtr.wrap(model)
        ema = copy.deepcopy(model)
        assert dtr.routing_of(ema) is not dtr.routing_of(model)
        with torch.no_grad():
            assert torch.equal(case.run(ema, t), case.run(model, t))
        dtr.unwrap(model)
        with torch.no_grad():
            assert not torch.allclose(case.run(ema, t), case.run(model, t), atol=1e-3)
