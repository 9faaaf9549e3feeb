"""CrossKD (``crosskd`` loss): the cross-head prediction, its gradients, the frozen teacher, the errors.

Real but tiny MMDetection heads (16 channels, 2 stacked convs, 3 classes) on random FPN-like features of
5 levels. The reference for every cross-head prediction is the teacher head's own forward (mmdet code),
fed with the teacher's own intermediate features, and for GFL also a functional re-implementation of
``GFLHead.forward_single`` written here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_tasks.detection.crosskd import CrossKDLoss
from kd_tasks.shared.distiller import Distiller
from kd_tasks.shared.errors import KDConfigError, ShapeMismatchError
from kd_tasks.shared.registry import LOSSES

ROOT = Path(__file__).resolve().parents[2]
GN = dict(type="GN", num_groups=4, requires_grad=True)
ONE_ANCHOR = dict(type="AnchorGenerator", ratios=[1.0], octave_base_scale=8, scales_per_octave=1,
                  strides=[8, 16, 32, 64, 128])
SIZES = (8, 4, 2, 2, 1)  # the 5 levels of a 64x64 image, P3..P7
HEADS = {
    "GFLHead": dict(type="GFLHead", anchor_generator=ONE_ANCHOR, norm_cfg=GN, reg_max=4,
                    loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
                    loss_bbox=dict(type="GIoULoss", loss_weight=2.0)),
    "RetinaHead": dict(type="RetinaHead"),  # 9 anchors per position
    "ATSSHead": dict(type="ATSSHead", anchor_generator=ONE_ANCHOR, norm_cfg=GN),
    "FCOSHead": dict(type="FCOSHead", norm_cfg=GN, norm_on_bbox=True, centerness_on_reg=True),
}
OUTPUT = {"cls": 0, "reg": 1}  # index of the branch's prediction list in the head's output tuple


class TinyDetector(nn.Module):
    """Stands in for a detector: the FPN levels go straight to ``bbox_head``."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.bbox_head = head

    def forward(self, feats):
        return self.bbox_head(feats)


def make_head(kind: str, seed: int, channels: int = 16, stacked_convs: int = 2) -> nn.Module:
    """A tiny head with random weights (not mmdet's near-constant init) and distinct per-level scales."""
    from mmdet.registry import MODELS

    torch.manual_seed(seed)
    head = MODELS.build(dict(HEADS[kind], num_classes=3, in_channels=channels, feat_channels=channels,
                             stacked_convs=stacked_convs))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.2)
        for level, scale in enumerate(getattr(head, "scales", [])):
            scale.scale.fill_(0.6 + 0.3 * level)
    return head


def make_teacher(kind: str, seed: int = 0, **kw) -> TinyDetector:
    """A frozen teacher, as the distiller leaves it: eval mode, no parameter requires a gradient."""
    return TinyDetector(make_head(kind, seed, **kw)).requires_grad_(False).eval()


def fpn(seed: int, channels: int = 16, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, s, s, generator=g) for s in SIZES]


def run_head(head: nn.Module, feats, branch: str, k: int):
    """The head's own forward on ``feats``, recording the tower output after its convs 0..k-1 per level."""
    tower = getattr(head, f"{branch}_convs")
    inner: list[torch.Tensor] = []
    if k == 0:
        inner = list(feats)
        handle = None
    else:
        handle = tower[k - 1].register_forward_hook(lambda m, a, out: inner.append(out))
    try:
        outs = head(feats)
    finally:
        if handle is not None:
            handle.remove()
    return outs, inner


def bound_loss(teacher: nn.Module, **kw) -> CrossKDLoss:
    loss = LOSSES.build(dict(type="crosskd", **kw))
    loss.bind_teacher(teacher)
    return loss


def gfl_forward_single(head, x: torch.Tensor, branch: str, k: int, level: int) -> torch.Tensor:
    """GFLHead.forward_single from tower conv k on, with functional ops (conv -> GroupNorm -> ReLU)."""
    for m in getattr(head, f"{branch}_convs")[k:]:
        x = F.conv2d(x, m.conv.weight, m.conv.bias, padding=1)
        x = F.relu(F.group_norm(x, m.gn.num_groups, m.gn.weight, m.gn.bias, m.gn.eps))
    if branch == "cls":
        return F.conv2d(x, head.gfl_cls.weight, head.gfl_cls.bias, padding=1)
    return (F.conv2d(x, head.gfl_reg.weight, head.gfl_reg.bias, padding=1) * head.scales[level].scale).float()


# ------------------------------------------------------------------------------ the cross prediction


@pytest.mark.parametrize("kind", list(HEADS))
@pytest.mark.parametrize("branch", ["cls", "reg"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_teacher_features_give_the_teachers_own_prediction(kind, branch, k):
    """Fed the teacher's own tower output, the cross head reproduces the teacher head's output exactly."""
    teacher = make_teacher(kind)
    feats = fpn(1)
    with torch.no_grad():
        outs, inner = run_head(teacher.bbox_head, feats, branch, k)
    assert len(inner) == len(SIZES)
    for level in (0, 2, 4):
        loss = bound_loss(teacher, branch=branch, reused_index=k, level=level,
                          loss="logit_mse" if branch == "reg" and kind == "GFLHead" else None)
        cross = loss.cross_prediction(inner[level])
        torch.testing.assert_close(cross, outs[OUTPUT[branch]][level], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("branch", ["cls", "reg"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_gfl_cross_prediction_matches_functional_forward_single(branch, k):
    teacher = make_teacher("GFLHead")
    student_feat = torch.randn(2, 16, 4, 4)
    loss = bound_loss(teacher, branch=branch, reused_index=k, level=1, loss="logit_mse")
    expected = gfl_forward_single(teacher.bbox_head, student_feat, branch, k, level=1)
    torch.testing.assert_close(loss.cross_prediction(student_feat), expected, rtol=1e-5, atol=1e-5)
    # the per-level Scale matters: another level's scale gives another prediction
    if branch == "reg":
        other = bound_loss(teacher, branch="reg", reused_index=k, level=3, loss="logit_mse")
        assert not torch.allclose(other.cross_prediction(student_feat), expected)


def test_cls_loss_is_sigmoid_kd_of_the_cross_prediction_rows():
    """Default cls loss: the registered sigmoid_kd on (B, H·W·A, classes) rows in mmdet's order."""
    teacher = make_teacher("RetinaHead")  # 9 anchors x 3 classes = 27 channels
    feats = fpn(2)
    with torch.no_grad():
        outs, inner = run_head(teacher.bbox_head, feats, "cls", 2)
    student = torch.randn_like(inner[0])
    loss = bound_loss(teacher, branch="cls", reused_index=2, temperature=2.0)
    cross = loss.cross_prediction(student)
    rows = lambda m: m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, 3)  # noqa: E731
    kd = LOSSES.build(dict(type="sigmoid_kd", temperature=2.0))
    torch.testing.assert_close(loss(student, outs[0][0]), kd(rows(cross), rows(outs[0][0])))
    # mmdet's flattening (permute, then rows of cls_out_channels) gives the same rows
    assert torch.equal(loss.rows(cross).reshape(-1, 3), cross.permute(0, 2, 3, 1).reshape(-1, 3))
    # with a softmax loss the row layout matters: rows of 27 would give another value
    soft = bound_loss(teacher, branch="cls", reused_index=2, loss=dict(type="kd", temperature=1.0))
    by_class = LOSSES.build(dict(type="kd", temperature=1.0))(rows(cross), rows(outs[0][0]))
    torch.testing.assert_close(soft(student, outs[0][0]), by_class)
    wrong = LOSSES.build(dict(type="kd", temperature=1.0))(cross.permute(0, 2, 3, 1), outs[0][0].permute(0, 2, 3, 1))
    assert not torch.allclose(by_class, wrong)


@pytest.mark.parametrize("kind", ["GFLHead", "RetinaHead"])
def test_identical_features_give_the_kd_of_identical_logits_and_no_gradient(kind):
    teacher = make_teacher(kind)
    with torch.no_grad():
        outs, inner = run_head(teacher.bbox_head, fpn(3), "cls", 1)
    loss = bound_loss(teacher, branch="cls", reused_index=1)
    student = inner[1].clone().requires_grad_(True)
    value = loss(student, outs[0][1])
    target = outs[0][1].permute(0, 2, 3, 1).reshape(2, -1, 3)
    torch.testing.assert_close(value, LOSSES.build("sigmoid_kd")(target, target))
    value.backward()  # sigmoid KD is minimal (not 0) at equal logits: its gradient vanishes there
    assert student.grad.abs().max() < 1e-6
    # a KL-type inner loss is exactly 0
    mse = bound_loss(teacher, branch="cls", reused_index=1, loss="logit_mse")
    assert mse(inner[1], outs[0][1]).item() == pytest.approx(0.0, abs=1e-10)


# ------------------------------------------------------------------------------ gradients and the teacher


@pytest.mark.parametrize("kind,branch", [("GFLHead", "cls"), ("GFLHead", "reg"), ("FCOSHead", "reg"),
                                         ("ATSSHead", "reg"), ("RetinaHead", "reg")])
def test_gradient_reaches_the_student_and_never_the_teacher(kind, branch):
    teacher = make_teacher(kind)
    with torch.no_grad():
        outs, _ = run_head(teacher.bbox_head, fpn(4), branch, 1)
    loss = bound_loss(teacher, branch=branch, reused_index=1, level=0,
                      loss="logit_mse" if branch == "reg" and kind == "GFLHead" else None)
    student = torch.randn(2, 16, 8, 8, requires_grad=True)
    value = loss(student, outs[OUTPUT[branch]][0])
    assert value.requires_grad and value.item() > 0
    value.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_bind_teacher_freezes_the_layers_it_uses_even_on_an_unfrozen_teacher():
    teacher = TinyDetector(make_head("GFLHead", 0))  # requires_grad left on
    loss = bound_loss(teacher, branch="reg", reused_index=1, level=2, loss="logit_mse")
    head = teacher.bbox_head
    used = [*head.reg_convs[1:].parameters(), *head.gfl_reg.parameters(), *head.scales[2].parameters()]
    assert not any(p.requires_grad for p in used)
    student = torch.randn(2, 16, 2, 2, requires_grad=True)
    loss(student, torch.randn(2, 20, 2, 2)).backward()
    assert student.grad is not None
    assert all(p.grad is None for p in head.parameters())


def test_optimiser_step_changes_the_student_only_and_no_teacher_weight_is_in_the_loss():
    teacher = make_teacher("GFLHead", seed=0)
    before = copy.deepcopy(teacher.state_dict())
    student = make_head("GFLHead", seed=1, channels=8)  # narrower student: conv1x1 connector in the loss
    feats = fpn(5, channels=8)
    with torch.no_grad():
        t_outs, _ = run_head(teacher.bbox_head, fpn(6), "cls", 0)
    losses = nn.ModuleList([
        bound_loss(teacher, branch=branch, reused_index=2, level=level, connector="conv1x1",
                   loss="logit_mse" if branch == "reg" else None)
        for branch in ("cls", "reg") for level in range(len(SIZES))
    ])
    student.train()
    _, cls_inner = run_head(student, feats, "cls", 2)
    _, reg_inner = run_head(student, feats, "reg", 2)
    total = sum(losses[level](cls_inner[level], t_outs[0][level]) for level in range(len(SIZES)))
    total = total + sum(losses[5 + level](reg_inner[level], t_outs[1][level]) for level in range(len(SIZES)))
    params = [*student.parameters(), *losses.parameters()]
    assert {id(p) for p in losses.parameters()}.isdisjoint(id(p) for p in teacher.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    s_before = student.cls_convs[0].conv.weight.detach().clone()
    opt.zero_grad()
    total.backward()
    opt.step()
    assert not torch.equal(student.cls_convs[0].conv.weight, s_before)
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in teacher.parameters())
    # the losses' state holds only their connectors (1x1 convs 8 -> 16), never teacher weights
    keys = losses[0].state_dict().keys()
    assert keys and all(k.startswith("connector.") for k in keys)
    assert losses[0].state_dict()["connector.inner.body.0.weight"].shape == (16, 8, 1, 1)
    plain = bound_loss(teacher, branch="cls", reused_index=2)
    assert list(plain.state_dict()) == [] and list(plain.parameters()) == []
    assert all(not isinstance(m, type(teacher.bbox_head.cls_convs[0])) for m in plain.modules())


# ------------------------------------------------------------------------------ errors


def test_errors_name_the_problem_and_the_fix():
    teacher = make_teacher("GFLHead")
    with pytest.raises(KDConfigError, match=r"call bind_teacher\(teacher\) before the first forward"):
        CrossKDLoss()(torch.randn(1, 16, 4, 4), torch.randn(1, 3, 4, 4))
    with pytest.raises(KDConfigError, match=r"has no module 'roi_head'; set head= to one of \['bbox_head'\]"):
        CrossKDLoss(head="roi_head").bind_teacher(teacher)
    with pytest.raises(KDConfigError, match=r"reused_index=3 but GFLHead.cls_convs has 2 convs; use 0..2"):
        CrossKDLoss(reused_index=3).bind_teacher(teacher)
    with pytest.raises(KDConfigError, match=r"GFLHead scales its box output per FPN level; set level="):
        CrossKDLoss(branch="reg", reused_index=1).bind_teacher(teacher)
    with pytest.raises(KDConfigError, match=r"level=5 but GFLHead has 5 levels"):
        CrossKDLoss(branch="reg", reused_index=1, level=5).bind_teacher(teacher)
    with pytest.raises(KDConfigError, match="branch must be 'cls' or 'reg'"):
        CrossKDLoss(branch="centerness")
    with pytest.raises(KDConfigError, match="reused_index must be an integer >= 0"):
        CrossKDLoss(reused_index=-1)
    with pytest.raises(KDConfigError, match="inner loss 'nope' is not registered"):
        CrossKDLoss(loss="nope")
    with pytest.raises(KDConfigError, match="inner loss 'logit_mse' takes no temperature"):
        CrossKDLoss(reused_index=1, loss="logit_mse", temperature=2.0).bind_teacher(teacher)


def test_heads_without_the_parts_are_refused():
    class PlainHead(nn.Module):  # towers, but no known final conv
        def __init__(self):
            super().__init__()
            self.cls_convs = nn.ModuleList([nn.Conv2d(16, 16, 3, padding=1)])

    with pytest.raises(KDConfigError, match=r"teacher head PlainHead \('bbox_head'\) is not supported; .*RetinaHead"):
        CrossKDLoss().bind_teacher(TinyDetector(PlainHead()))
    no_tower = make_teacher("GFLHead")
    del no_tower.bbox_head.reg_convs
    with pytest.raises(KDConfigError, match=r"teacher head GFLHead \('bbox_head'\) has no reg_convs"):
        CrossKDLoss(branch="reg", level=0, reused_index=1).bind_teacher(no_tower)
    no_final = make_teacher("RetinaHead")
    del no_final.bbox_head.retina_cls
    with pytest.raises(KDConfigError,
                       match=r"teacher head RetinaHead \('bbox_head'\) has no final cls conv 'retina_cls'"):
        CrossKDLoss(reused_index=1).bind_teacher(no_final)


def test_channel_and_shape_mismatches_suggest_the_fix():
    teacher = make_teacher("GFLHead")
    loss = bound_loss(teacher, branch="cls", reused_index=1)
    with pytest.raises(ShapeMismatchError, match=r"has 8 channels but the teacher's GFLHead.cls_convs\[1\] takes 16; "
                                                 r"add connector='conv1x1' to this crosskd loss"):
        loss(torch.randn(2, 8, 4, 4), torch.randn(2, 3, 4, 4))
    with pytest.raises(ShapeMismatchError,
                       match=r"cross-head cls prediction \(2, 3, 4, 4\) != teacher tap \(2, 20, 4, 4\)"):
        loss(torch.randn(2, 16, 4, 4), torch.randn(2, 20, 4, 4))  # the box output given as the cls teacher
    with pytest.raises(ShapeMismatchError, match="the student tap must be one"):
        loss(torch.randn(2, 16), torch.randn(2, 3, 4, 4))


def test_connector_in_the_loss_maps_a_narrower_student_and_learns():
    teacher = make_teacher("ATSSHead")
    loss = bound_loss(teacher, branch="reg", reused_index=2, level=1, connector="conv1x1")
    student = torch.randn(2, 8, 4, 4, requires_grad=True)
    value = loss(student, torch.randn(2, 4, 4, 4))
    value.backward()
    conv = loss.connector.inner.body[0]
    assert conv.weight.shape == (16, 8, 1, 1) and conv.weight.grad is not None
    assert student.grad is not None and all(p.grad is None for p in teacher.parameters())


# ------------------------------------------------------------------------------ GFL boxes with LD


def _ld_available() -> bool:
    import kd_tasks.shared.losses  # noqa: F401  registers the families (dense holds 'ld')

    return "ld" in LOSSES


def test_gfl_reg_with_ld():
    if not _ld_available():
        pytest.skip("the shared LOSSES registry has no 'ld' (kd_tasks/shared/losses/dense.py not present)")
    teacher = make_teacher("GFLHead")  # reg_max=4: 20 channels
    with torch.no_grad():
        outs, inner = run_head(teacher.bbox_head, fpn(7), "reg", 2)
    loss = bound_loss(teacher, branch="reg", reused_index=2, level=1)  # default for GFL boxes: ld, T = 1
    assert loss.loss_fn.reg_max == 4 and loss.loss_fn.temperature == 1.0
    # the teacher's own features: KL 0
    assert loss(inner[1], outs[1][1]).item() == pytest.approx(0.0, abs=1e-7)
    student = torch.randn_like(inner[1], requires_grad=True)
    value = loss(student, outs[1][1])
    expected = LOSSES.build(dict(type="ld", reg_max=4, temperature=1.0))(loss.cross_prediction(student), outs[1][1])
    torch.testing.assert_close(value, expected)
    value.backward()
    assert student.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.parameters())
    # region="boxes" gets the boxes the distiller passes
    boxed = bound_loss(teacher, branch="reg", reused_index=2, level=0, loss=dict(type="ld", region="boxes"),
                       temperature=10.0)
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.zeros(0, 4)]
    v = boxed(torch.randn_like(inner[0]), outs[1][0], gt_boxes=boxes, input_shape=(64, 64))
    assert v.item() > 0 and boxed.loss_fn.temperature == 10.0


# ------------------------------------------------------------------------------ the recipe, through the Distiller


def test_recipe_terms_run_in_the_distiller_with_their_taps():
    """configs/detection/crosskd_gfl.py on tiny GFL detectors (4 stacked convs, as the recipe's taps
    assume): the shared Distiller taps ``bbox_head.cls_convs.2#k`` / ``bbox_head:0.k``, and each term
    equals the loss computed by hand."""
    from kd_tasks.shared.config import load_config

    if not _ld_available():
        pytest.skip("the shared LOSSES registry has no 'ld' (kd_tasks/shared/losses/dense.py not present)")
    recipe = load_config(ROOT / "configs" / "detection" / "crosskd_gfl.py")
    terms = recipe["distill"]["terms"]
    assert len(terms) == 10
    teacher = make_teacher("GFLHead", seed=0, stacked_convs=4)
    for t in terms:  # the tiny head has reg_max 4, the recipe's heads 16
        if t["loss"].get("loss", {}).get("type") == "ld":
            t["loss"]["loss"]["reg_max"] = 4
    student = TinyDetector(make_head("GFLHead", seed=1, stacked_convs=4)).train()
    distiller = Distiller(student, teacher, terms=terms, logits_fn=lambda out: out[0][0])
    for term in distiller.terms:  # what the detection distiller does once after building its terms
        if hasattr(term.loss, "bind_teacher"):
            term.loss.bind_teacher(distiller.teacher)
    feats = fpn(8)
    out = distiller((feats,), teacher_inputs=(feats,), gt_boxes=[torch.tensor([[4.0, 4.0, 40.0, 40.0]])] * 2,
                    input_shape=(64, 64))
    # by hand: the student's tower outputs after cls/reg conv 2 of level 3, the teacher's predictions
    with torch.no_grad():
        t_outs, _ = run_head(teacher.bbox_head, feats, "cls", 0)
    _, s_cls = run_head(student.bbox_head, feats, "cls", 3)
    _, s_reg = run_head(student.bbox_head, feats, "reg", 3)
    by_name = {t.name: t for t in distiller.terms}
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 40.0]])] * 2
    for level in (0, 4):
        cls, reg = by_name[f"crosskd_cls_p{level + 3}"], by_name[f"crosskd_reg_p{level + 3}"]
        torch.testing.assert_close(out[cls.name], cls.loss(s_cls[level], t_outs[0][level]).detach())
        torch.testing.assert_close(out[reg.name], reg.loss(s_reg[level], t_outs[1][level], gt_boxes=boxes,
                                                           input_shape=(64, 64)).detach())
        assert out[cls.name] > 0
    out["loss"].backward()
    assert student.bbox_head.cls_convs[0].conv.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
