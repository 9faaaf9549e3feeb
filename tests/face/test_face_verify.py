"""Verification metrics on hand-made scores, pairs, and the identity-folder dataset."""

import numpy as np
import pytest
import torch

from face_helpers import make_identity_folder
from kd_tasks.face.data import IdentityFolder, split_identities, verification_pairs
from kd_tasks.face.verify import best_threshold, embed, evaluate_embeddings, pair_scores, verification_metrics


def test_perfect_separation():
    same = np.array([1] * 20 + [0] * 20)
    scores = np.where(same == 1, np.linspace(0.6, 0.9, 40), np.linspace(-0.5, 0.3, 40))
    m = verification_metrics(scores, same, folds=5)
    assert m["auc"] == 1.0 and m["accuracy"] == 1.0 and m["accuracy_std"] == 0.0
    assert m["tar@far=0.001"] == 1.0 and 0.3 < m["threshold"] <= 0.6


def test_known_roc_points():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    same = np.array([1, 1, 0, 1, 0, 0])
    # pos > neg in 8 of the 9 (pos, neg) pairs
    m = verification_metrics(scores, same, folds=3, far_targets=(0.0, 0.34, 1.0))
    assert m["auc"] == pytest.approx(8 / 9)
    assert m["tar@far=0"] == pytest.approx(2 / 3)  # threshold 0.8: 2 of 3 accepted, no false accept
    assert m["tar@far=0.34"] == 1.0  # threshold 0.6: all accepted, 1 of 3 false accepts
    th, acc = best_threshold(scores, same)
    assert acc == pytest.approx(5 / 6)
    assert th == pytest.approx(0.75) or th == pytest.approx(0.55)  # midway below 0.8 or 0.6
    reversed_m = verification_metrics(-scores, same, folds=3)
    assert reversed_m["auc"] == pytest.approx(1 / 9)


def test_kfold_accuracy_uses_held_out_thresholds():
    rng = np.random.default_rng(0)
    same = np.repeat([1, 0], 200)
    scores = np.where(same == 1, rng.normal(0.5, 0.2, 400), rng.normal(0.1, 0.2, 400))
    m = verification_metrics(scores, same, folds=10)
    _, best = best_threshold(scores, same)
    assert m["accuracy"] <= best + 1e-12 and m["accuracy"] > best - 0.05 and m["accuracy_std"] > 0


def test_pair_scores_and_pairs():
    e = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    np.testing.assert_allclose(pair_scores(e, np.array([[0, 1, 0], [0, 2, 1]])), [0.0, np.sqrt(0.5)])
    labels = [0, 0, 0, 1, 1, 2]
    pairs = verification_pairs(labels, seed=1)
    pos = pairs[pairs[:, 2] == 1]
    assert len(pos) == 4 and len(pairs) == 8  # 3 + 1 positive pairs, as many negatives
    assert all((labels[i] == labels[j]) == bool(s) for i, j, s in pairs)
    assert len({(i, j) for i, j, _ in pairs}) == len(pairs) and (pairs[:, 0] < pairs[:, 1]).all()
    assert len(verification_pairs(labels, max_pairs=4)) == 4


def test_identity_folder(tmp_path):
    root = make_identity_folder(tmp_path / "faces", identities=5, images=3, size=20)
    train, test = split_identities(root, num_test=2, seed=0)
    assert len(test) == 2 and not set(train) & set(test) and len(train) == 3
    ds = IdentityFolder(root, image_size=16, identities=test)
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y == 0 and len(ds) == 6 and ds.num_classes == 2
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grayscale repeated
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(ds[3][0], ds[3][0])  # deterministic
    emb = embed(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(768, 4)), ds, batch_size=4)
    assert emb.shape == (6, 4) and np.allclose(np.linalg.norm(emb, axis=1), 1)
    assert 0 <= evaluate_embeddings(emb, verification_pairs(ds.labels))["auc"] <= 1
    with pytest.raises(FileNotFoundError):
        IdentityFolder(tmp_path / "missing")
    with pytest.raises(Exception, match="identities"):
        split_identities(root, num_test=4)
