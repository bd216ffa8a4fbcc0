"""examples/flux_dtr.py: a tiny routed Flux transformer learns to draw the digit it is asked for.

The runs are small and seeded: 300 steps of batch 32 for the routed model and its unrouted baseline, 200 for
ANT-UW, sampled with 10 Euler steps (about 35 s in all on one core). "Recognisable" is measured as the example
itself reports it, with the recipe's digits classifier: of 100 samples (10 per digit), the share it reads as the
digit asked for. Chance is 10 %; the test asks for 60 %. The line is safe both ways: a model that ignores its
prompt scores 10 % on average whatever it draws (each digit is asked for equally often), and its chance of 60 of
100 is below 1e-25 (binomial), so passing means the model draws what it is asked; and these runs score 89 %
(routed), 95 % (baseline) and 91 % (ANT-UW) here, so changes of float rounding between machines (another BLAS or
CPU, which move individual samples) leave a margin of about 30 points.
"""

import pytest

pytest.importorskip("transformers", reason="FluxPipeline (whose token packing the example uses) imports transformers")

import flux_dtr  # noqa: E402
import torch  # noqa: E402
from flux_dtr import digits_classifier  # noqa: E402  (examples/dit/digits_classifier.py, as the example uses it)

import dtr  # noqa: E402

ACCURACY_FLOOR = 0.60


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory):
    """The recipe's digits CNN, trained here (10 epochs, ~6 s, same split and seed) instead of read from ~/.cache."""
    path = tmp_path_factory.mktemp("classifier") / "digits_classifier.pt"
    _, held_out = digits_classifier.train_classifier(str(path), epochs=10, log=lambda *_: None)
    assert held_out > 0.95  # a classifier that reads real digits well, or the accuracies below mean nothing
    return str(path)


def test_routed_and_baseline_flux_draw_recognisable_digits(tmp_path, capsys, classifier_path):
    settings = ["--steps", "300", "--batch-size", "32", "--sample-steps", "10", "--per-digit", "10"]
    results = flux_dtr.main([*settings, "--classifier", classifier_path, "--out", str(tmp_path)])
    out = capsys.readouterr().out

    # DTR routes the image stream of every Flux block and reads the timestep as FluxPipeline passes it.
    routed, baseline = results["DTR"]["model"], results["baseline"]["model"]
    names = [r.name for r in dtr.routing_of(routed).routed]
    assert names == ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert "sigma in [0, 1], 1 = noise" in out
    assert dtr.routing_of(baseline) is None

    classifier, _ = digits_classifier.load_classifier(classifier_path)
    for label, r in results.items():
        assert r["images"].shape == (100, 1, 8, 8) and r["digit"].tolist() == [d for d in range(10) for _ in range(10)]
        with torch.no_grad():
            accuracy = (classifier(r["images"])[1].argmax(1) == r["digit"]).float().mean().item()
        assert accuracy == pytest.approx(r["accuracy"])
        assert f"{label}: 100 samples" in out and f"reads {accuracy:.0%} of them" in out
        assert accuracy >= ACCURACY_FLOOR, f"{label}: {accuracy:.0%} of the samples recognised"
    assert (tmp_path / "samples.png").is_file()


def test_uncertainty_weighting_on_noise_level_intervals_also_draws_digits(tmp_path, capsys, classifier_path):
    settings = ["--steps", "200", "--batch-size", "32", "--sample-steps", "10", "--no-baseline", "--weighting", "uw"]
    results = flux_dtr.main([*settings, "--classifier", classifier_path, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert list(results) == ["DTR"] and "batch 32, uw, s ~ logit_normal" in out
    learned = next(line for line in out.splitlines() if "learned weight by noise level s" in line)
    assert len(learned.split(": ", 1)[1].split(", ")) == 8  # ANT-UW's 8 intervals, one learned weight each
    assert results["DTR"]["accuracy"] >= ACCURACY_FLOOR


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sharing-ratio", "1.5"], "--sharing-ratio must be in (0, 1], got 1.5"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--width", "48"], "--width must be a multiple of 32"),
        (["--weighting", "logit_normal"], '--weighting must be one of "constant", "min_snr_<gamma>"'),
        (["--weighting", "min_snr"], "got 'min_snr'"),
        (["--density", "normal"], "argument --density: invalid choice: 'normal'"),
    ],
)
def test_bad_flags_stop_before_training(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flux_dtr.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
