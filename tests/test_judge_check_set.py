"""The judge against the eye: on the committed, eye-labelled check set of model outputs, the judge's verdicts agree
with the labels as well as bench/results/judge_agreement.json measured (a judge change that drifts fails here)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from microworld.check_set import agreement, consensus, load_second_pass, load_set, verdicts

REPO = Path(__file__).resolve().parents[1]
CHECK_SET = REPO / "bench" / "results" / "judge_check_set"
MEASURED = REPO / "bench" / "results" / "judge_agreement.json"


@pytest.fixture(scope="module")
def judged():
    torch.set_num_threads(1)
    manifest, labels = load_set(CHECK_SET)
    return labels, verdicts(CHECK_SET, [item for item in manifest if str(item["id"]) in labels])


def test_the_check_set_is_large_and_covers_every_kind_of_object(judged):
    labels, _ = judged
    kinds = {label["shape"] for label in labels.values()}
    assert len(labels) >= 300
    assert {"malformed", "empty"} <= kinds and len(kinds & {"circle", "square", "triangle", "heart", "ring"}) >= 4


def test_the_new_judge_agrees_with_the_eye_as_measured(judged):
    labels, got = judged
    measured = json.loads(MEASURED.read_text(encoding="utf-8"))
    new = agreement(labels, got, "new")
    assert new["agreement"] >= measured["new"]["agreement"] - 0.01, (new["agreement"], measured["new"]["agreement"])
    assert new["malformed_given_a_shape"] <= measured["new"]["malformed_given_a_shape"] + 0.01
    assert new["agreement"] > agreement(labels, got, "old")["agreement"]  # the fidelity check earns its place


def test_on_the_objects_both_labellings_agree_on_the_judge_holds_its_measured_agreement(judged):
    labels, got = judged
    second = load_second_pass(CHECK_SET)
    assert second is not None and set(second) == set(labels), "the second, blind labelling covers the whole set"
    measured = json.loads(MEASURED.read_text(encoding="utf-8"))["second_pass"]
    new = agreement(consensus(labels, second), got, "new")
    assert new["agreement"] >= measured["new_consensus"]["agreement"] - 0.01
    assert new["malformed_given_a_shape"] <= measured["new_consensus"]["malformed_given_a_shape"] + 0.01
