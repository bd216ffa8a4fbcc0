"""examples/flux_dtr.py: a few flow-matching steps of a routed tiny Flux transformer, then FluxPipeline samples."""

import pytest

pytest.importorskip("transformers", reason="FluxPipeline imports transformers (the dev extra)")

import flux_dtr  # noqa: E402


def test_flux_example_fine_tunes_and_samples(tmp_path, capsys):
    flux_dtr.main(["--steps", "3", "--batch-size", "4", "--sample-steps", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "3 residual routed blocks: transformer_blocks.0, single_transformer_blocks.0" in out
    assert "timestep read as FluxPipeline passes it: sigma in [0, 1]" in out
    losses = [float(line.split("loss ")[1].split()[0]) for line in out.splitlines() if line.startswith("step ")]
    assert len(losses) == 3 and all(0 < loss < 100 for loss in losses)
    assert (tmp_path / "samples.png").is_file()
