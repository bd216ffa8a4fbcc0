"""examples/flux_dtr.py: a tiny routed Flux transformer learns to draw the digit it is asked for.

The run is small (300 steps of batch 32, 10 Euler steps: about 25 s for both models on one core) and seeded.
"Recognisable" is measured by the recipe's digits classifier, as the example itself reports it: of 100 samples
(10 per digit), the share the classifier reads as the digit asked for. Chance is 10 %; the test asks for 60 %.
Why 60 % is a safe line both ways: a model that ignores its prompt scores 10 % on average, and with 100 samples
its chance of reaching 60 % is below 1e-20 (binomial), so passing means the prompt is drawn; at these settings the
run scores 9x % for either model (routed and unrouted), so float differences between machines (another BLAS, another
CPU) that change individual samples leave a wide margin.
"""

import pytest

pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits")

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


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--sharing-ratio", "1.5", "--sharing-ratio must be in (0, 1]"),
        ("--steps", "0", "--steps must be at least 1"),
        ("--width", "48", "--width must be a multiple of 32"),
    ],
)
def test_bad_flags_stop_before_training(flag, value, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace("]", r"\]")):
        flux_dtr.main([flag, value])
