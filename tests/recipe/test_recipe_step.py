"""The recipe's training step against the reference written from the formulas (recipe_reference.py).

train.py runs a few steps on the digits; its checkpoint must hold the reference's weights, EMA, ANT-UW
log-variances and AdamW state, and its log the reference's loss and gradient norm: for constant, Min-SNR and
ANT-UW weighting, routed and not, DDPM and flow (general.path), fresh and resumed with every optim key changed.
Keys are off their defaults (routing alpha and task count, label dropout, EMA decay, weight decay, UW intervals
and lr), so that a value the recipe drops or replaces by its default shows as a difference.

This is the test that catches, among others: the loss weighted twice, label dropout off (the model left in
eval mode), the EMA step with decay instead of 1 - decay, ANT-UW timesteps drawn uniformly, models.routing.alpha
not passed to dtr.wrap, and optim.uw_lr not applied on resume.
"""

import os

import pytest

import config
import train
from recipe_helpers import load
from recipe_reference import CHANGED, REFERENCE_KEYS, assert_matches_reference, last_log_line, reference


@pytest.mark.parametrize("sharing_ratio", [0.75, 1.0], ids=["routed", "baseline"])
@pytest.mark.parametrize("weighting", ["constant", "min_snr_3", "uw"])
@pytest.mark.parametrize("path", ["ddpm", "flow"])
def test_training_step_matches_the_reference(tmp_path, monkeypatch, path, weighting, sharing_ratio):
    monkeypatch.chdir(tmp_path)
    keys = [
        *REFERENCE_KEYS,
        f"general.path={path}",
        f"general.loss_weight_type={weighting}",
        f"models.routing.sharing_ratio={sharing_ratio}",
    ]
    fresh = train.main(config.load(keys))
    ref = reference(weighting, sharing_ratio, path=path)
    assert_matches_reference(load(fresh["checkpoint"]), ref, last_log_line(fresh["experiment_dir"]))

    # Resumed after step 2 with every optim key changed: they apply from step 3 on, as in the reference.
    os.remove(fresh["checkpoint"])
    checkpoints = os.path.join(fresh["experiment_dir"], "checkpoints")
    changed = [f"optim.{key}={value}" for key, value in CHANGED.items()]
    resumed = train.main(config.load([*keys, *changed, f"general.resume={checkpoints}/0000002.pt"]))
    assert resumed["checkpoint"] == fresh["checkpoint"]
    assert_matches_reference(
        load(resumed["checkpoint"]),
        reference(weighting, sharing_ratio, changed_after=2, path=path),
        last_log_line(resumed["experiment_dir"]),
        first_logged_step=2,
    )
