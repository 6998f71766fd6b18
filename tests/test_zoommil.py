"""ZoomMIL: selection, gathering through the children index, eval/infer agreement, learning."""
from __future__ import annotations

import time

import pytest
import torch

from zoompipe.evaluate import predict_logits
from zoompipe.model import DenseRows, ZoomMIL, ZoomMILConfig
from zoompipe.model.abmil import ABMIL, ABMILConfig
from zoompipe.model.attention import masked_softmax
from zoompipe.model.teacher import start_from_teacher, teacher_attention, teacher_evidence, teacher_target
from zoompipe.model.topk import normalise_scores
from zoompipe.train import balanced_sampler, sigma_schedule, train_one_epoch

DIM = 32
MAGS = [1.25, 2.5, 10.0]
RATIOS = (4, 16)  # children per parent: (2.5 / 1.25)^2 and (10 / 2.5)^2


def _shuffled(features: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows in random order, and the new row of each old row."""
    order = torch.randperm(len(features), generator=gen)
    new_row = torch.empty_like(order)
    new_row[order] = torch.arange(len(order))
    return features[order], new_row


def make_slide(
    label: int,
    gen: torch.Generator,
    n_base: int = 16,
    n_marked: int = 2,
    n_decoys: int = 0,
    marked_children: int = RATIOS[0],
    regions: list | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """A 3-magnification slide whose class shows only at 10x, under a few marked parents.

    Every slide, whatever its class, has ``n_marked`` base patches marked at 1.25x (feature 0)
    and ``marked_children`` of their 4 children marked at 2.5x (feature 1): suspicious regions
    visible at low magnification. Only in class 1 do half of the 10x grandchildren of those
    children carry the signal (feature 2). ``n_decoys`` other base patches (and one child of
    each) are marked as strongly with features 3 and 4 but never carry the signal: the zoom must
    learn which low-magnification cue is worth zooming into. Rows are shuffled at every
    magnification, so only the children index links them. ``regions``, when given, receives
    the shuffled rows of the marked base patches and of their marked children.
    """
    c1, c2 = RATIOS
    bags = [torch.randn(n_base * n, DIM, generator=gen) for n in (1, c1, c1 * c2)]
    picked = torch.randperm(n_base, generator=gen)[: n_marked + n_decoys].tolist()
    marked, marked_rows = picked[:n_marked], []
    for parent in picked:
        lesion = parent in marked
        bags[0][parent, 0 if lesion else 3] += 4.0
        chosen = parent * c1 + torch.randperm(c1, generator=gen)[: marked_children if lesion else 1]
        for child in chosen.tolist():
            bags[1][child, 1 if lesion else 4] += 4.0
            if lesion:
                marked_rows.append(child)
            if lesion and label:
                grandchildren = child * c2 + torch.randperm(c2, generator=gen)[: c2 // 2]
                bags[2][grandchildren, 2] += 3.0
    shuffled = [_shuffled(b, gen) for b in bags]
    children = [
        # Parent p's children were rows p*C .. p*C+C-1 before shuffling.
        torch.empty(len(bags[i]), c, dtype=torch.long).index_copy_(
            0, shuffled[i][1], shuffled[i + 1][1][torch.arange(len(bags[i + 1])).view(-1, c)]
        )
        for i, c in enumerate(RATIOS)
    ]
    if regions is not None:
        regions.append([shuffled[0][1][marked], shuffled[1][1][marked_rows]])
    return [b for b, _ in shuffled], children, label


def make_slides(
    n: int, seed: int, regions: list | None = None, **layout
) -> list[tuple[list[torch.Tensor], list[torch.Tensor], int]]:
    gen = torch.Generator().manual_seed(seed)
    return [make_slide(i % 2, gen, regions=regions, **layout) for i in range(n)]


def _model(mags: list[float] = MAGS, seed: int = 0, **kwargs) -> ZoomMIL:
    torch.manual_seed(seed)
    settings = {"k": 4, "hidden": 64, "attn_hidden": 32, "n_samples": 100, **kwargs}
    return ZoomMIL(ZoomMILConfig(in_dim=DIM, n_classes=2, magnifications=mags, **settings))


def _hand_fetch(bags, children, calls):
    """A fetch written the slow, obvious way, as a predictor would: loop over parents."""

    def fetch(step: int, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        calls.append((step, parents.clone()))
        pairs = [(i, int(r)) for i, p in enumerate(parents.tolist()) for r in children[step][p] if r >= 0]
        parent, rows = (torch.tensor(column, dtype=torch.long) for column in zip(*pairs))
        return bags[step + 1][rows], rows, parent

    return fetch


def test_eval_selection_is_topk_of_zoom_scores_and_children_are_gathered_by_index() -> None:
    bags, children, _ = make_slides(1, seed=0)[0]
    model = _model().eval()
    out = model(bags, children)
    for step in range(2):
        scores, rows = out.selection_scores[step], out.rows[step]
        expected = rows[torch.topk(scores, 4).indices].sort().values
        assert torch.equal(out.selected[step], expected)
        by_hand = [int(r) for p in expected.tolist() for r in children[step][p]]
        assert out.rows[step + 1].tolist() == by_hand
    # The attention at 10x is that of the level run on exactly those rows.
    level = model.levels[2]
    attention = masked_softmax(level.attention(level.project(bags[2][out.rows[2]])))
    torch.testing.assert_close(out.attention[2], attention)
    assert [len(r) for r in out.rows] == [16, 16, 64]


def test_eval_forward_equals_infer_with_a_fetch_that_embeds_only_the_selection() -> None:
    bags, children, _ = make_slides(1, seed=1)[0]
    model = _model().eval()
    dense = model(bags, children)
    calls: list = []
    lazy = model.infer(bags[0], _hand_fetch(bags, children, calls))
    torch.testing.assert_close(lazy.logits, dense.logits, rtol=0, atol=0)
    for name in ("rows", "attention", "selected", "selection_scores"):
        for a, b in zip(getattr(lazy, name), getattr(dense, name)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [step for step, _ in calls] == [0, 1]
    for _, parents in calls:
        assert len(parents) == 4 and torch.equal(parents, parents.sort().values)


def test_padding_children_are_masked_in_eval_and_training() -> None:
    bags, children, _ = make_slides(1, seed=2)[0]
    # Drop some 2.5x children: mark them -1 in the index and remove nothing else.
    padded = [children[0].clone(), children[1]]
    padded[0][::3, 1:3] = -1
    model = _model(dropout=0.0, level_dropout=0.0).eval()
    out = model(bags, padded)
    assert bool((out.rows[1] >= 0).all())
    assert len(out.rows[1]) < 16
    # Training with vanishing noise makes the same hard choice, through the soft code path,
    # where the padding rows exist as zero-weight rows and must get no attention.
    model.train()
    model.select.sigma = 1e-7
    torch.testing.assert_close(model(bags, padded).logits, out.logits)


def test_the_topk_never_spends_a_choice_on_a_patch_without_children() -> None:
    bags, children, _ = make_slides(1, seed=3)[0]
    model = _model().eval()
    first = model(bags, children).selected[1]
    # The 2.5x patches the zoom ranks first lose all their 10x children (as glass does under
    # --children tissue): the top-K passes them over for the next ones, still K of them.
    childless = children[1].clone()
    childless[first[:2]] = -1
    out = model(bags, [children[0], childless])
    assert len(out.selected[1]) == 4 and not bool(torch.isin(first[:2], out.selected[1]).any())
    assert torch.equal(out.selected[1][torch.isin(out.selected[1], first)], first[2:])
    # With no child anywhere above, there is nothing to zoom into: the 10x level is never read.
    empty = torch.full_like(children[1], -1)
    out = model(bags, [children[0], empty])
    assert len(out.selected) == 1 and len(out.rows) == 2


def test_soft_path_tends_to_the_hard_path_and_trains_the_zoom_heads() -> None:
    bags, children, label = make_slides(1, seed=3)[0]
    model = _model(dropout=0.0, level_dropout=0.0).eval()
    hard = model(bags, children).logits
    model.train()
    model.select.sigma = 1e-7
    torch.testing.assert_close(model(bags, children).logits, hard)

    model.select.sigma = 0.1
    logits = model(bags, children).logits
    torch.nn.functional.cross_entropy(logits[None], torch.tensor([label])).backward()
    for level in model.levels[:2]:
        assert level.zoom.score.weight.grad.abs().sum() > 0


def test_one_child_per_parent_spreads_the_zoom_over_the_chosen_parents() -> None:
    bags, children, label = make_slides(1, seed=3)[0]
    model = _model(dropout=0.0, level_dropout=0.0, children_per_parent=1).eval()
    out = model(bags, children)
    parents, scores, rows = out.selected[0], out.selection_scores[1].detach(), out.rows[1]
    # By hand: the best-scored child of each chosen 1.25x parent, then the K best of those.
    best = [max((int(c) for c in children[0][p] if c >= 0), key=lambda c: float(scores[rows == c]))
            for p in parents.tolist()]
    expected = sorted(sorted(best, key=lambda c: -float(scores[rows == c]))[:4])
    assert out.selected[1].tolist() == expected and len(expected) == 4
    free = _model(dropout=0.0, level_dropout=0.0).eval()
    free.load_state_dict(model.state_dict())
    assert not torch.equal(free(bags, children).selected[1], out.selected[1])  # the cap changed the choice
    calls: list = []
    lazy = model.infer(bags[0], _hand_fetch(bags, children, calls))
    for a, b in zip(lazy.selected + [lazy.logits], out.selected + [out.logits]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Training: as sigma vanishes the soft path is the capped hard path, and the heads learn.
    model.train()
    model.select.sigma = 1e-7
    torch.testing.assert_close(model(bags, children).logits, out.logits)
    model.select.sigma = 0.1
    torch.nn.functional.cross_entropy(model(bags, children).logits[None], torch.tensor([label])).backward()
    for level in model.levels[:2]:
        assert level.zoom.score.weight.grad.abs().sum() > 0


def test_straight_through_bags_are_the_real_children_of_the_likeliest_k() -> None:
    bags, children, label = make_slides(1, seed=7)[0]
    seen = []

    def capture(module, inputs):
        seen.append(inputs[0])

    def forward(selection: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = _model(dropout=0.0, level_dropout=0.0, zoom_target_weight=0.0, selection=selection).train()
        model.select.sigma = 0.3  # noisy: the samples disagree on the top K
        handles = [level.project.register_forward_pre_hook(capture) for level in model.levels]
        seen.clear()
        torch.manual_seed(1)
        logits = model(bags, children).logits
        for handle in handles:
            handle.remove()
        torch.nn.functional.cross_entropy(logits[None], torch.tensor([label])).backward()
        return model, list(seen)

    def real_rows(rows: torch.Tensor, bag: torch.Tensor) -> torch.Tensor:
        """Whether each row equals some row of ``bag`` exactly (a real patch, or zero padding)."""
        exact = (rows[:, None, :] == bag[None]).all(dim=-1).any(dim=1)
        return exact | (rows == 0).all(dim=-1)

    model, seen = forward("straight_through")
    assert len(seen) == 3
    for level in (1, 2):
        assert real_rows(seen[level], bags[level]).all()
    # The 2.5x bag is the children of the K base patches that the noise samples pick most often.
    torch.manual_seed(1)
    torch.rand(())  # the level dropout's draw comes first
    z = model.levels[0].project(bags[0])
    scores = normalise_scores(model.levels[0].zoom(z)[None], torch.ones(1, len(z), dtype=torch.bool))
    noise = torch.randn(1, model.select.n_samples, len(z))
    picks = (scores.unsqueeze(1) + 0.3 * noise).topk(4, dim=-1).indices.flatten()
    counts = torch.bincount(picks, minlength=len(z))
    likeliest = counts.topk(4).indices
    assert counts[likeliest].min() > counts.sort(descending=True).values[4]  # no tie at the K-th
    expected = bags[1][children[0][likeliest].flatten()]
    assert real_rows(expected, seen[1]).all() and real_rows(seen[1][(seen[1] != 0).any(dim=-1)], expected).all()
    for level in model.levels[:2]:  # the zoom heads still learn from the soft selection
        assert level.zoom.score.weight.grad.abs().sum() > 0
    _, seen = forward("soft")  # the paper's rows mix several parents' children: not real patches
    assert not real_rows(seen[1], bags[1]).all()


def test_the_zoom_targets_teacher_sums_with_the_lower_levels_or_stands_alone() -> None:
    bags, children, label = make_slides(1, seed=8)[0]
    for summed in (True, False):
        model = _model(dropout=0.0, level_dropout=0.0, zoom_target_weight=1.0, zoom_target_sum=summed).train()
        model.select.sigma = 1e-7
        torch.manual_seed(0)
        aux = model(bags, children, label).aux_loss
        torch.manual_seed(0)
        _, below_last = model._forward_soft(bags[0], children, DenseRows(bags, children).rows)
        assert below_last.abs().sum() > 0  # the lower levels carry something to add, or not
        expected = model.zoom_target_loss(bags, children, label, below_last if summed else None)
        torch.testing.assert_close(aux, expected)
        other = model.zoom_target_loss(bags, children, label, None if summed else below_last)
        assert not torch.allclose(aux, other)


def test_level_dropout_drops_lower_magnifications_in_training_only() -> None:
    bags, children, _ = make_slides(1, seed=4)[0]
    model = _model(dropout=0.0, level_dropout=0.0).eval()
    out = model(bags, children)
    last = model.levels[-1]
    only_last = model.classifier(out.attention[-1] @ last.project(bags[-1][out.rows[-1]]))
    assert not torch.allclose(out.logits, only_last)  # the lower levels count at inference
    model.config.level_dropout = 0.999
    torch.testing.assert_close(model(bags, children).logits, out.logits)  # and still do
    model.train()
    model.select.sigma = 1e-7  # the hard choice, through the soft path
    torch.manual_seed(0)
    torch.testing.assert_close(model(bags, children).logits, only_last)


def test_training_survives_selected_parents_without_children() -> None:
    bags, children, label = make_slides(1, seed=5)[0]
    # Every base patch but two has no 2.5x child (all background): at k = 4 the selection
    # must take childless parents; the bag above is then partly or wholly empty.
    empty = [children[0].clone(), children[1]]
    empty[0][2:] = -1
    for keep in (2, 0):
        empty[0][:keep] = children[0][:keep]
        empty[0][keep:] = -1
        model = _model(dropout=0.0, zoom_target_weight=0.0).train()
        out = model(bags, empty, label)
        torch.nn.functional.cross_entropy(out.logits[None], torch.tensor([label])).backward()
        assert torch.isfinite(out.logits).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        evaluated = model.eval()(bags, empty)
        assert torch.isfinite(evaluated.logits).all()


def _zoom_heads_kl(model: ZoomMIL, bags, children, attention: torch.Tensor) -> torch.Tensor:
    """The zoom heads' KL terms written the slow way: a parent's mass is the sum of its children's."""
    mass_25 = torch.stack([sum(attention[c] for c in row if c >= 0) for row in children[1]])
    mass_125 = torch.stack([sum(mass_25[c] for c in row if c >= 0) for row in children[0]])
    torch.testing.assert_close(mass_125.sum(), torch.tensor(1.0))
    total = attention.new_zeros(())
    for step, mass in ((0, mass_125), (1, mass_25)):
        level = model.levels[step]
        log_q = torch.log_softmax(level.zoom(level.project(bags[step])), dim=0)
        total = total + (mass * (mass.log() - log_q)).sum()
    return total


def test_zoom_target_is_the_teachers_attention_summed_over_descendants() -> None:
    bags, children, label = make_slides(1, seed=6)[0]
    model = _model(dropout=0.0, zoom_target_weight=2.0).train()
    below_last = torch.randn(64)
    loss = model.zoom_target_loss(bags, children, label, below_last)

    last = model.levels[2]
    z = last.project(bags[2])
    attention = torch.softmax(last.attention(z), dim=0).detach()
    expected = torch.nn.functional.cross_entropy(
        model.classifier(below_last + attention @ z)[None], torch.tensor([label]))
    torch.testing.assert_close(loss, expected + _zoom_heads_kl(model, bags, children, attention))

    loss.backward()
    for level in model.levels[:2]:  # the target reaches the zoom heads directly
        assert level.zoom.score.weight.grad.abs().sum() > 0
    out = model(bags, children, label)  # weighted into the training output
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    assert _model(zoom_target_weight=0.0).train()(bags, children, label).aux_loss is None


def test_a_trained_teachers_attention_is_the_zoom_target_and_its_weights_start_the_last_level() -> None:
    bags, children, label = make_slides(1, seed=6)[0]
    model = _model(dropout=0.0).train()
    torch.manual_seed(1)
    teacher = ABMIL(ABMILConfig(in_dim=DIM, n_classes=2, magnifications=[10.0], hidden=64, attn_hidden=32)).eval()
    start_from_teacher(model, teacher)
    model.teacher = teacher_attention(teacher)
    taught = teacher([bags[2]], [])
    last = model.levels[2]
    z = last.project(bags[2])
    attention = masked_softmax(last.attention(z))
    torch.testing.assert_close(attention, taught.attention[0])
    torch.testing.assert_close(model.classifier(attention @ z), taught.logits)

    with torch.no_grad():  # the last head moves on in training; the target stays the teacher's
        last.attention.score.weight.add_(torch.randn_like(last.attention.score.weight))
    attention = masked_softmax(last.attention(z))
    assert not torch.allclose(attention, taught.attention[0], atol=1e-3)
    loss = model.zoom_target_loss(bags, children, label)
    expected = torch.nn.functional.cross_entropy(model.classifier(attention @ z)[None], torch.tensor([label]))
    torch.testing.assert_close(loss, expected + _zoom_heads_kl(model, bags, children, taught.attention[0]))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert "teacher" not in str(list(model.state_dict()))  # never saved with the model


def test_the_teachers_evidence_marks_the_lesions_of_every_class_where_its_attention_does_not() -> None:
    # A teacher that decides by what is missing: it attends to "normal lesion" patches (feature 0)
    # and calls a slide without them malignant; malignant lesions (feature 1) get no more attention
    # than the background (feature 2).
    teacher = ABMIL(ABMILConfig(in_dim=3, n_classes=2, magnifications=[10.0], hidden=3, attn_hidden=1)).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.zero_()
        teacher.project[0].weight.copy_(torch.eye(3))
        teacher.attention.tanh_branch[0].weight.copy_(torch.tensor([[4.0, 0.0, -1.0]]))
        teacher.attention.gate_branch[0].bias.fill_(10.0)
        teacher.attention.score.weight.fill_(3.0)
        teacher.classifier.weight.copy_(torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]]))  # normal, malignant
    background = torch.tensor([0.0, 0.0, 1.0])
    for lesion, lesion_class in ((torch.tensor([1.0, 0.0, 1.0]), 0), (torch.tensor([0.0, 1.0, 1.0]), 1)):
        bag = torch.stack([background] * 30 + [lesion] * 2)
        assert int(teacher([bag], []).logits.argmax()) == lesion_class
        attention, evidence = teacher_attention(teacher)(bag), teacher_evidence(teacher)(bag)
        assert float(evidence[30:].min()) > 10 * float(evidence[:30].max())  # the lesions, whichever the class
        assert float(attention[30:].sum()) > 0.5 if lesion_class == 0 else float(attention[30:].sum()) < 0.1
        # The KL divergence of each patch's posterior from the bag's mean patch's, written out.
        weight = teacher.classifier.weight.detach()
        patch = torch.softmax(bag @ weight.T, dim=1)  # the projection is the identity here
        mean = torch.softmax(bag.mean(0) @ weight.T, dim=0)
        divergence = torch.tensor([sum(float(q[c] * torch.log(q[c] / mean[c])) for c in range(2)) for q in patch])
        torch.testing.assert_close(evidence, divergence / divergence.sum())
        assert not evidence.requires_grad
        torch.testing.assert_close(teacher_target(teacher, "evidence")(bag), evidence)
        torch.testing.assert_close(teacher_target(teacher, "attention")(bag), attention)
    torch.testing.assert_close(teacher_target(teacher, "own-evidence")(bag), evidence)  # what the pull follows
    with pytest.raises(ValueError, match="attention, evidence, own-evidence"):
        teacher_target(teacher, "gradients")


def test_the_last_attention_can_be_pulled_towards_the_teachers_target() -> None:
    bags, children, label = make_slides(1, seed=6)[0]
    torch.manual_seed(1)
    teacher = ABMIL(ABMILConfig(in_dim=DIM, n_classes=2, magnifications=[10.0], hidden=64, attn_hidden=32)).eval()
    losses = []
    for weight in (0.0, 0.5):
        model = _model(dropout=0.0, attention_target_weight=weight).train()
        model.teacher = teacher_evidence(teacher)
        losses.append(model.zoom_target_loss(bags, children, label))
    last = model.levels[2]
    attention = masked_softmax(last.attention(last.project(bags[2])))
    target = teacher_evidence(teacher)(bags[2])
    divergence = (torch.special.xlogy(target, target) - target * attention.log()).sum()
    torch.testing.assert_close(losses[1] - losses[0], 0.5 * divergence)
    (losses[1] - losses[0]).backward()
    assert last.attention.score.weight.grad.abs().sum() > 0 and last.zoom is None
    with pytest.raises(ValueError, match="attention_target_weight"):
        _model(attention_target_weight=-1.0)


def test_the_zoom_heads_can_follow_the_models_own_evidence_while_the_pull_follows_the_teachers() -> None:
    bags, children, label = make_slides(1, seed=6)[0]
    torch.manual_seed(1)
    teacher = ABMIL(ABMILConfig(in_dim=DIM, n_classes=2, magnifications=[10.0], hidden=64, attn_hidden=32)).eval()
    model = _model(dropout=0.0, attention_target_weight=0.5).train()
    start_from_teacher(model, teacher)
    model.teacher = teacher_target(teacher, "own-evidence")
    last = model.levels[2]
    with torch.no_grad():  # the last level moves on in training, away from the teacher
        last.project[0].weight.add_(0.5 * torch.randn_like(last.project[0].weight))
        model.classifier.weight.add_(torch.randn_like(model.classifier.weight))
    taught = model.zoom_target_loss(bags, children, label)
    model.follows_own_evidence = True
    own = model.zoom_target_loss(bags, children, label)

    # Written out: each patch's KL divergence of the model's own posterior from its mean patch's.
    z = last.project(bags[2]).detach()
    patch = torch.softmax(model.classifier(z), dim=1).detach()
    mean = torch.softmax(model.classifier(z.mean(0)), dim=0).detach()
    divergence = (patch * (patch.log() - mean.log())).sum(dim=1)
    mine, theirs = divergence / divergence.sum(), teacher_evidence(teacher)(bags[2])
    assert not torch.allclose(mine, theirs, atol=1e-3)
    torch.testing.assert_close(own - taught, _zoom_heads_kl(model, bags, children, mine)
                               - _zoom_heads_kl(model, bags, children, theirs))
    # The pull stays the teacher's: with it off the difference is the zoom heads' alone.
    model.config.attention_target_weight = 0.0
    with_pull_off = model.zoom_target_loss(bags, children, label)
    attention = masked_softmax(last.attention(last.project(bags[2])))
    pull = (torch.special.xlogy(theirs, theirs) - theirs * attention.log()).sum()
    torch.testing.assert_close(own - with_pull_off, 0.5 * pull)
    own.backward()
    assert last.project[0].weight.grad is not None and all(p.grad is None for p in teacher.parameters())
    assert "follows_own_evidence" not in str(list(model.state_dict()))


def test_the_teachers_instance_loss_pseudo_labels_its_dense_last_bag() -> None:
    bags, children, label = make_slides(1, seed=6)[0]
    plain = _model(dropout=0.0).train()
    with_instances = _model(dropout=0.0, teacher_instance_weight=0.5, k_sample=3).train()
    with_instances.load_state_dict(plain.state_dict(), strict=False)  # the same teacher and heads
    base = plain.zoom_target_loss(bags, children, label)
    loss = with_instances.zoom_target_loss(bags, children, label)

    last = with_instances.levels[2]
    z = last.project(bags[2])
    scores = last.attention(z)
    # Written out as CLAM does it: the 3 most and least attended 10x patches of the whole dense bag.
    top, bottom = scores.topk(3).indices, scores.topk(3, largest=False).indices
    heads = with_instances.instance_classifiers
    in_class = torch.nn.functional.cross_entropy(heads[label](z[torch.cat([top, bottom])]),
                                                 torch.tensor([1, 1, 1, 0, 0, 0]))
    torch.testing.assert_close(loss, base + 0.5 * in_class)
    loss.backward()
    assert heads[label].weight.grad.abs().sum() > 0 and last.project[0].weight.grad.abs().sum() > 0
    assert heads[1 - label].weight.grad is None  # two classes: the other class's head is not asked
    # Without a label there is nothing to pseudo-label; at weight 0 no classifiers exist, so a run
    # recorded before the field loads unchanged.
    torch.testing.assert_close(with_instances.zoom_target_loss(bags, children), plain.zoom_target_loss(bags, children))
    assert not any("instance" in name for name in plain.state_dict())


def test_k_as_a_fraction_of_the_base_bag() -> None:
    config = ZoomMILConfig(in_dim=DIM, n_classes=2, k=0.125)
    assert [config.resolve_k(n) for n in (1, 8, 9, 40, 400)] == [1, 1, 2, 5, 50]
    assert ZoomMILConfig(in_dim=DIM, n_classes=2, k=12.0).resolve_k(5) == 5  # capped
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="k must be"):
            ZoomMILConfig(in_dim=DIM, n_classes=2, k=bad)
    bags, children, _ = make_slides(1, seed=7)[0]  # 16 base patches: k = 0.25 selects 4
    out = _model(k=0.25).eval()(bags, children)
    assert [len(s) for s in out.selected] == [4, 4]


def test_one_magnification_is_abmil() -> None:
    bags, _, _ = make_slides(1, seed=4)[0]
    model = _model(mags=[1.25]).eval()
    assert len(model.levels) == 1 and model.levels[0].zoom is None
    assert not any("zoom" in name for name, _ in model.named_parameters())
    out = model([bags[0]], [])
    level = model.levels[0]
    z = level.project(bags[0])
    attention = torch.softmax(level.attention(z), dim=0)
    torch.testing.assert_close(out.logits, model.classifier(attention @ z))
    assert out.selected == [] and len(out.rows) == 1


def _accuracy(model: ZoomMIL, slides) -> float:
    labels = torch.tensor([label for *_, label in slides])
    return float((predict_logits(model, slides, "cpu").argmax(dim=1) == labels).float().mean())


def _train(mags: list[float], train, epochs: int, wrap=None, warmup: int = 0, own_evidence: bool = False,
           sigma: float = 0.1, sigma_end: float | None = None, **settings) -> ZoomMIL:
    """Train on ``train``; ``wrap(bags, children)`` replaces each slide's bags (e.g. a row source);
    the first ``warmup`` epochs train the zoom target alone (``train_model``'s warm-up), with
    ``own_evidence`` the zoom heads follow the last head's class evidence, not its attention, and
    the top-K's noise decays linearly from ``sigma`` to ``sigma_end`` as ``train_model`` decays it
    (None: constant)."""
    n = len(mags)
    model = _model(mags, sigma=sigma, **settings)
    model.follows_own_evidence = own_evidence
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Annealing the learning rate settles the classifier once the zoom heads have found the
    # marked regions (a few epochs), instead of stopping at a random point of its noise.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    sampler = balanced_sampler([label for *_, label in train], seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small only pay threading overhead
    try:
        for epoch in range(epochs):
            if sigma_end is not None:
                model.select.sigma = sigma_schedule(epoch + 1, epochs, sigma, sigma_end)
            train_one_epoch(model, [(wrap(b, c) if wrap else b[:n], c[: n - 1], y) for b, c, y in train],
                            list(sampler), optimizer, "cpu", teacher_only=epoch < warmup)
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    return model


def regions_reached(model: ZoomMIL, test, regions) -> list[float]:
    """Share of the planted regions that the hard selection picks, at 1.25x and at 2.5x."""
    reached = [0, 0]
    with torch.no_grad():
        for (bags, children, _), planted in zip(test, regions):
            out = model.eval()(bags, children)
            for step in range(2):
                reached[step] += int(torch.isin(planted[step], out.selected[step]).sum())
    return [r / (2 * len(test)) for r in reached]


#: Planted regions among decoys: 40 base patches, 2 regions whose children carry the class
#: (in one of their 4 children each) and 12 decoys as visible at 1.25x and 2.5x that never do.
PLANTED = {"n_base": 40, "n_marked": 2, "n_decoys": 12, "marked_children": 1}


@pytest.fixture(scope="module")
def synthetic() -> tuple[list, list, list]:
    regions: list = []
    return make_slides(200, seed=10, **PLANTED), make_slides(100, seed=11, regions=regions, **PLANTED), regions


def test_zoommil_zooms_into_the_planted_regions_and_classifies(synthetic) -> None:
    # The top-K's noise decays from 0.5 to 0.005, as train_model decays it: a fresh zoom head ranks
    # the planted patches low in some initialisations, and only a wide noise lets the top-K try them.
    # Seed 0 measured 0.99 accuracy, 98% / 98% of the regions (torch 2.14.1, AVX2). Over 16 seeds
    # (benchmarks/planted_seeds.py, torch 2.11, AVX512) this training met these bars in 15; with a
    # constant 0.1 (this test's until 2026-11-28) in 7, decaying from 0.05 in 1.
    train, test, regions = synthetic
    start = time.perf_counter()
    model = _train(MAGS, train, epochs=12, k=0.1, sigma=0.5, sigma_end=0.005).eval()  # K = 4 of 40 base patches
    elapsed = time.perf_counter() - start
    accuracy, shares = _accuracy(model, test), regions_reached(model, test, regions)
    print(f"ZoomMIL 1.25x->2.5x->10x: test accuracy {accuracy:.3f}, planted regions selected "
          f"{shares[0]:.3f} at 1.25x and {shares[1]:.3f} at 2.5x, trained in {elapsed:.1f} s")
    assert accuracy >= 0.95
    assert shares[0] >= 0.95 and shares[1] >= 0.95


def test_low_magnification_abmil_stays_at_chance(synthetic) -> None:
    train, test, _ = synthetic
    model = _train([1.25], train, epochs=10)
    accuracy = _accuracy(model, [([b[0]], [], y) for b, _, y in test])
    print(f"ABMIL 1.25x: test accuracy {accuracy:.3f}")
    assert 0.35 <= accuracy <= 0.65
