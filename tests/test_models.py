"""The model registry and the baselines' own parts: CLAM's instance loss and branches, TransMIL's attention."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoompipe.errors import ZoompipeError
from zoompipe.model import create_model, list_models
from zoompipe.model.transmil import NystromAttention


def test_registry_builds_every_architecture_and_refuses_unknown_ones() -> None:
    assert list_models() == ["abmil", "clam_mb", "clam_sb", "transmil", "zoommil"]
    bag = torch.randn(10, 8)
    for name in ("abmil", "clam_mb", "clam_sb", "transmil"):
        model = create_model(name, in_dim=8, n_classes=3, magnifications=[10], hidden=16).eval()
        assert model.needs == "dense"
        with torch.no_grad():
            out = model([bag], [])
        assert out.logits.shape == (3,) and out.rows[0].tolist() == list(range(10))
        assert out.attention[0].shape == (10,) and float(out.attention[0].sum()) == pytest.approx(1, abs=1e-5)
    assert create_model("zoommil", in_dim=8, n_classes=3).needs == "zoom"
    for name, settings, expected in [("resnet", {}, "unknown architecture 'resnet'"),
                                     ("abmil", {"magnifications": [2.5, 10]}, "one positive magnification"),
                                     ("abmil", {"k": 3}, "invalid settings")]:
        with pytest.raises(ZoompipeError, match=expected):
            create_model(name, in_dim=8, n_classes=3, **settings)


def test_clam_instance_loss_pseudo_labels_the_most_and_least_attended_patches() -> None:
    torch.manual_seed(0)
    model = create_model("clam_sb", in_dim=8, n_classes=3, magnifications=[10], hidden=16, k_sample=2,
                         dropout=0.0).train()
    bag = torch.randn(9, 8)
    out = model([bag], [], label=1)
    h = model.project(bag)
    scores = model.attention(h)
    top, bottom = scores.topk(2).indices, scores.topk(2, largest=False).indices
    in_class = F.cross_entropy(model.instance_classifiers[1](h[torch.cat([top, bottom])]),
                               torch.tensor([1, 1, 0, 0]))
    # With three classes the other classes' heads learn that the most attended patches are not theirs.
    others = [F.cross_entropy(model.instance_classifiers[c](h[top]), torch.tensor([0, 0])) for c in (0, 2)]
    expected = 0.3 * (in_class + others[0] + others[1]) / 3
    torch.testing.assert_close(out.aux_loss, expected)
    out.aux_loss.backward()
    assert model.instance_classifiers[1].weight.grad.abs().sum() > 0 and model.attention.score.weight.grad is None
    assert model.eval()([bag], [], label=1).aux_loss is None  # a training-only term


def test_clam_mb_scores_each_class_by_its_own_branch_and_shows_the_predicted_one() -> None:
    torch.manual_seed(0)
    model = create_model("clam_mb", in_dim=8, n_classes=3, magnifications=[10], hidden=16, k_sample=2,
                         dropout=0.0).eval()
    bag = torch.randn(9, 8)
    with torch.no_grad():
        out = model([bag], [])
        h = model.project(bag)
        a, v = model.attention.tanh_branch(h), model.attention.gate_branch(h)
        expected_logits, branches = [], []
        for c in range(3):  # by hand: branch c's gated scores, its softmax, its pooled vector, row c
            weights = torch.softmax((a * v) @ model.attention.score.weight[c] + model.attention.score.bias[c], 0)
            branches.append(weights)
            expected_logits.append(model.classifier.weight[c] @ (weights @ h) + model.classifier.bias[c])
    torch.testing.assert_close(out.logits, torch.stack(expected_logits))
    torch.testing.assert_close(out.attention[0], branches[int(out.logits.argmax())])
    # The branches differ: each class ranks the patches its own way.
    assert not torch.allclose(branches[0], branches[1])
    # The instance loss ranks the patches by each class's own branch.
    model.train()
    out = model([bag], [], label=2)
    scores = model.attention(h)
    assert scores.shape == (9, 3)
    losses = []
    for c in range(3):
        top, bottom = scores[:, c].topk(2).indices, scores[:, c].topk(2, largest=False).indices
        rows, targets = (torch.cat([top, bottom]), torch.tensor([1, 1, 0, 0])) if c == 2 else (top, torch.tensor([0, 0]))
        losses.append(F.cross_entropy(model.instance_classifiers[c](h[rows]), targets))
    torch.testing.assert_close(out.aux_loss, 0.3 * sum(losses) / 3)
    out.logits[1].backward()
    # Class 1's logit reaches only class 1's attention row and classifier row.
    assert model.attention.score.weight.grad[[0, 2]].abs().sum() == 0 < model.attention.score.weight.grad[1].abs().sum()
    assert model.classifier.weight.grad[[0, 2]].abs().sum() == 0


def test_nystrom_attention_is_exact_with_one_landmark_per_token() -> None:
    torch.manual_seed(0)
    attention = NystromAttention(dim=16, heads=2, landmarks=12, pinv_iterations=30)
    torch.nn.init.zeros_(attention.residual.weight)
    x = torch.randn(12, 16)
    q, k, v = attention._qkv(x)
    exact = (q @ k.transpose(-1, -2)).softmax(-1) @ v
    expected = attention.out(exact.permute(1, 0, 2).reshape(12, 16))
    torch.testing.assert_close(attention(x), expected, atol=1e-4, rtol=1e-3)
    # Fewer landmarks than tokens: padded in front, still one output per token.
    assert NystromAttention(dim=16, heads=2, landmarks=5, pinv_iterations=6)(x).shape == (12, 16)


@pytest.mark.parametrize("n", [1, 7, 16])
def test_transmil_takes_bags_of_any_size(n: int) -> None:
    model = create_model("transmil", in_dim=8, n_classes=2, magnifications=[10], hidden=16, heads=2).eval()
    out = model([torch.randn(n, 8)], [])
    assert out.logits.shape == (2,) and out.attention[0].shape == (n,)
