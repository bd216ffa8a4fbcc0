"""Flux before diffusers 0.35, whose single-stream blocks took the joined [text; image] sequence and returned it.

The Flux adapter recognises that layout by the block's ``forward`` (no ``encoder_hidden_states``) and routes the
joined stream's image tokens only: the same routing as the two-stream single blocks of later diffusers. Run by
the lowest-versions CI (diffusers 0.33); tests/test_families.py checks the current layouts.
"""

import copy

import diffusers
import pytest
import torch

if tuple(int(v) for v in diffusers.__version__.split(".")[:2]) >= (0, 35):
    pytest.skip(
        f"diffusers {diffusers.__version__}: Flux single blocks take two streams (tests/test_families.py)",
        allow_module_level=True,
    )

import diffusers_families as F  # noqa: E402
import family_checks as C  # noqa: E402

import dtr  # noqa: E402

JOINED_SINGLE = F.BlockSpec(
    r"single_transformer_blocks\.\d+",
    "FluxSingleTransformerBlock",
    ("hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs"),
    "hidden_states",
    "keyword",
    None,
    True,
    stream_tokens="text+image",
)


def flux_call(model, t):
    """FluxTransformer2DModel as FluxPipeline calls it: 16 packed image tokens (4x4), 6 text tokens."""
    ids = torch.zeros(4, 4, 3)
    ids[..., 1], ids[..., 2] = torch.arange(4)[:, None], torch.arange(4)[None, :]
    return model(
        hidden_states=F._randn(2, 16, 16),
        timestep=t,
        guidance=torch.full((2,), 3.5),
        pooled_projections=F._randn(2, 16, seed=2),
        encoder_hidden_states=F.text(32, 2),
        txt_ids=torch.zeros(F.TEXT_LEN, 3),
        img_ids=ids.reshape(16, 3),
        return_dict=False,
    )[0]


def test_flux_single_blocks_on_the_joined_sequence_route_its_image_tokens():
    model = F.FLUX.make()
    plain = copy.deepcopy(model)
    routing = dtr.wrap(model)
    io = routing.spec.io_for(model.single_transformer_blocks[0])
    assert (io.input, io.output, io.joined) == ("hidden_states", None, True)
    assert routing.spec.image_tokens == dtr.ImageTokens("hidden_states")
    t = torch.tensor([0.7, 0.1])
    state = C.State(tasks=F.task_index(t, "sigma"))
    reference = copy.deepcopy(plain)
    for i in range(len(reference.transformer_blocks)):
        reference.transformer_blocks[i] = C.RefResidual(plain.transformer_blocks[i], F.FLUX.blocks[0], state)
    for i in range(len(reference.single_transformer_blocks)):  # text first, then the 16 image tokens
        reference.single_transformer_blocks[i] = C.RefResidual(
            plain.single_transformer_blocks[i],
            JOINED_SINGLE,
            state,
            lambda x, s: C._rows(x, torch.full((x.shape[0],), x.shape[1] - 16), 16),
        )
    with torch.no_grad():
        torch.testing.assert_close(flux_call(model, t), flux_call(reference, t), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(flux_call(model, t), flux_call(plain, t), atol=1e-3)
        dtr.unwrap(model)
        dtr.wrap(model, sharing_ratio=1.0)
        assert torch.equal(flux_call(model, t), flux_call(plain, t))
