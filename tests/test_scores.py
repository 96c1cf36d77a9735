"""CDP TF-IDF and GFI-AP importance against hand-computed tiny cases."""
import math

import pytest
import torch

from cdp_gfi.scores.importance import cdp_layer_scores, cdp_scores, gfi_scores, statistics_kinds
from cdp_gfi.statistics.store import Statistics


def test_cdp_tfidf_hand_computed():
    # 3 filters x 4 documents.
    a = torch.tensor([[4.0, 0.0, 2.0, 2.0],
                      [1.0, 1.0, 1.0, 1.0],
                      [0.0, 3.0, 1.0, 1.0]])
    score, tf = cdp_layer_scores(a)
    col = a.sum(0)  # 5, 4, 4, 4
    # filter 0: mu = 2, fires (>= mu) in docs 0, 2, 3 -> n = 3
    tf0 = (4 / 5 + 2 / 4 + 2 / 4) / 3
    # filter 1: mu = 1, fires everywhere -> n = 4
    tf1 = (1 / 5 + 1 / 4 + 1 / 4 + 1 / 4) / 4
    # filter 2: mu = 1.25, fires in doc 1 only -> n = 1
    tf2 = (3 / 4) / 1
    expected_tf = torch.tensor([tf0, tf1, tf2])
    expected = expected_tf * torch.tensor([math.log(4 / 4), math.log(4 / 5), math.log(4 / 2)])
    assert torch.allclose(tf, expected_tf, atol=1e-6)
    assert torch.allclose(score, expected, atol=1e-6)
    assert col.tolist() == [5, 4, 4, 4]


def test_cdp_coe_scales_by_b():
    a = torch.rand(8, 5) + 0.1
    base, _ = cdp_layer_scores(a)
    scaled, _ = cdp_layer_scores(a, coe=2.0)
    assert torch.allclose(scaled, base * (1 + math.log(8 / 2)), atol=1e-6)
    same, _ = cdp_layer_scores(a, coe=0)  # coe <= 0 means b = 1
    assert torch.allclose(same, base)


def test_cdp_dead_filter_and_empty_document():
    a = torch.tensor([[1.0, 0.0, 2.0],
                      [0.0, 0.0, 0.0],
                      [3.0, 0.0, 1.0]])
    score, tf = cdp_layer_scores(a)
    assert torch.isfinite(score).all()  # the authors' code made NaN for the empty column
    assert score[1] == 0 and tf[1] == 0
    # the empty document is left out: same result as the 2-document matrix
    ref, _ = cdp_layer_scores(a[:, [0, 2]])
    assert torch.allclose(score, ref)


def _stats(**kw):
    base = dict(layers={"c": [2, 1, 3, 3]}, num_classes=3, num_images=4,
                class_counts=torch.tensor([2, 2, 0]))
    base.update(kw)
    return Statistics(**base)


def test_cdp_classwise_uses_class_means_of_present_classes():
    sums = torch.tensor([[2.0, 4.0], [6.0, 0.0], [9.0, 9.0]])  # class 2 absent: ignored
    stats = _stats(cdp_class={"c": sums})
    scores, _ = cdp_scores(stats, "classwise")
    ref, _ = cdp_layer_scores(torch.tensor([[1.0, 3.0], [2.0, 0.0]]))
    assert torch.allclose(scores["c"], ref)


def test_cdp_sample_mode_documents_are_images():
    per_image = torch.rand(4, 2)
    stats = _stats(cdp_sample={"c": per_image})
    scores, _ = cdp_scores(stats, "sample")
    ref, _ = cdp_layer_scores(per_image.t())
    assert torch.allclose(scores["c"], ref)


def test_gfi_max_over_present_classes():
    s = torch.tensor([[0.2, 0.9], [0.5, 0.1], [7.0, 7.0]])  # class 2 absent
    stats = _stats(gfi={"c": s})
    assert torch.allclose(gfi_scores(stats)["c"], torch.tensor([0.5, 0.9]))


def test_missing_kind_and_unknown_method():
    stats = _stats(cdp_class={"c": torch.ones(3, 2)})
    with pytest.raises(ValueError, match="gfi"):
        gfi_scores(stats)
    with pytest.raises(ValueError, match="unknown method"):
        statistics_kinds("l1")
    with pytest.raises(ValueError, match="cdp_mode"):
        statistics_kinds("cdp", "perclass")
