"""Self-distillation: the network teaches itself, with no separate teacher.

Survey form: ``L = L(z, y) + SD(z_s, z_t)``. Two sources of the teacher signal, usable together;
``KL_T(a ‖ b) = T²·KL(softmax(a/T) ‖ softmax(b/T))`` averaged over the batch, teachers detached.

Deep -> shallow (``shallow_taps``): Zhang, Song, Gao, Chen, Bao & Ma (ICCV 2019), "Be Your Own
Teacher: Improve the Performance of Convolutional Neural Networks via Self Distillation". Each tapped
stage ``i`` gets an auxiliary classifier (a head: pooling, a projection ``F_i`` and a linear layer
``z_i``); the network's own final classifier ``z_C`` (with feature ``F_C``) teaches them::

    L = Σ_{i ∈ heads ∪ {C}} [ (1-α)·CE(z_i, y) + α·KL_T(z_C ‖ z_i) + λ·‖F_i - F_C‖² ]

(for ``i = C`` the last two terms vanish; ``‖·‖²`` is the squared L2 norm per sample, batch mean;
``F_C`` is detached). The paper's heads are bottleneck convolutions; the default head here is global
pooling + ``Linear -> ReLU`` + ``Linear`` (pass ``heads=`` for others). The feature term needs
``feature_tap``, the input of the final classifier (e.g. ``"fc@input"``).

Previous epoch -> current epoch (``previous_weight > 0``): the predictions each sample received in
the previous epoch teach the current one (the idea of Kim, Ji, Yoon & Hwang (ICCV 2021),
"Self-Knowledge Distillation with Progressive Refinement of Targets", PS-KD)::

    L += w_prev · KL_T(z^{(e-1)}(x) ‖ z^{(e)}(x))

over the samples of the batch seen in the previous epoch (0 in the first epoch). PS-KD instead
mixes ``p^{(e-1)}`` into the one-hot label with a weight growing over epochs; here the survey's additive
form is used, and a growing weight is a ``previous_weight`` schedule. The stored logits are buffers
of shape ``(num_samples, num_classes)`` (twice: last epoch's and this epoch's), saved in checkpoints
and, on several processes, averaged across them at each epoch end. The batch's sample indices are
needed (``index=``); the training loop passes them.

Trainable: the model and the heads. Exported: the model alone (the heads are training aids).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..distiller import call_model
from ..errors import KDConfigError
from ..losses.logit import KDLoss
from ..registry import SCHEMES
from ..taps import FeatureTaps
from .base import Scheme, plus, Weight, export_of, weight_schedule


def pool_features(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (B, C)`` by global average; ``(B, L, D) -> (B, D)`` by mean; ``(B, D)`` as is."""
    if x.dim() == 2:
        return x
    if x.dim() == 3:
        return x.mean(dim=1)
    return x.flatten(2).mean(dim=2)


class ShallowHead(nn.Module):
    """Auxiliary classifier: pooling, ``F = ReLU(Linear(·))``, ``z = Linear(F)``; returns ``(F, z)``.

    Built on its first call (the input width is read from the batch; ``feature_dim`` defaults to the
    deepest feature's width when given, else to the input width).
    """

    def __init__(self, num_classes: int, feature_dim: int | None = None):
        super().__init__()
        self.num_classes = int(num_classes)
        self.feature_dim = feature_dim
        self.proj: nn.Linear | None = None
        self.fc: nn.Linear | None = None

    def forward(self, x: torch.Tensor, feature_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = pool_features(x)
        if self.proj is None:
            width = self.feature_dim or feature_dim or pooled.shape[-1]
            self.proj = nn.Linear(pooled.shape[-1], width).to(pooled.device, pooled.dtype)
            self.fc = nn.Linear(width, self.num_classes).to(pooled.device, pooled.dtype)
        feature = torch.relu(self.proj(pooled))
        return feature, self.fc(feature)


@SCHEMES.register("self", "self_distillation", "byot")
class SelfDistillation(Scheme):
    """A model distilling its deepest classifier into shallow heads and/or its last epoch into this one.

    Args:
        model: the network (trained and exported).
        num_classes: classes of the task (for the default heads and the stored predictions).
        shallow_taps: module names (tap specs) whose outputs feed auxiliary heads; empty: no heads.
        heads: custom heads, one per tap, each ``head(x) -> logits`` or ``-> (feature, logits)``.
        feature_tap: tap of the final classifier's input ``F_C`` (needed when ``feature_weight > 0``).
        temperature: T of the KL terms.
        alpha: BYOT's balance between the label and the deepest classifier (0.3 in the paper's code).
        feature_weight: λ of the feature hint (the paper uses 0.03 with its conv heads); 0 disables.
        previous_weight: weight (or schedule) of the previous-epoch term; 0 disables it.
        num_samples: dataset size, required when ``previous_weight`` is not 0.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        shallow_taps: Sequence[str] = (),
        heads: Sequence[nn.Module] | None = None,
        feature_tap: str | None = None,
        temperature: float = 3.0,
        alpha: float = 0.3,
        feature_weight: float = 0.0,
        previous_weight: Weight = 0.0,
        num_samples: int | None = None,
        task_loss: Any = "cross_entropy",
        check_finite: bool = True,
    ):
        super().__init__(task_loss=task_loss, check_finite=check_finite)
        self.model = model
        self.num_classes = int(num_classes)
        self.alpha = float(alpha)
        self.feature_weight = float(feature_weight)
        self.kd = KDLoss(temperature=temperature)
        self.previous_weight = weight_schedule(previous_weight)
        shallow_taps = list(shallow_taps)
        if heads is not None and len(heads) != len(shallow_taps):
            raise KDConfigError(f"self: {len(heads)} heads for {len(shallow_taps)} shallow_taps; give one head per tap")
        if self.feature_weight and not feature_tap:
            raise KDConfigError("self: feature_weight > 0 needs feature_tap, the final classifier's input (e.g. 'fc@input')")
        self.heads = nn.ModuleList(heads if heads is not None else [ShallowHead(num_classes) for _ in shallow_taps])
        specs = {f"head{i}": t for i, t in enumerate(shallow_taps)}
        if feature_tap:
            specs["deep"] = feature_tap
        self._taps = FeatureTaps(model, specs) if specs else None
        self.uses_previous = not (isinstance(previous_weight, (int, float)) and previous_weight == 0)
        if self.uses_previous:
            if not num_samples:
                raise KDConfigError("self: previous_weight needs num_samples (the training set's size)")
            n, c = int(num_samples), self.num_classes
            self.register_buffer("prev_logits", torch.zeros(n, c))
            self.register_buffer("prev_seen", torch.zeros(n, dtype=torch.bool))
            self.register_buffer("next_sum", torch.zeros(n, c))
            self.register_buffer("next_count", torch.zeros(n))

    def export_model(self) -> nn.Module:
        return export_of(self.model)

    def forward(self, inputs: Any, target: torch.Tensor | None = None, index: torch.Tensor | None = None) -> dict:
        if self._taps is not None:
            raw = self._taps.run(lambda: call_model(self.model, inputs))
            feats = dict(self._taps.outputs)
        else:
            raw, feats = call_model(self.model, inputs), {}
        logits = self.logits_fn(raw)
        result: dict[str, Any] = {"student_output": raw}
        has_heads = len(self.heads) > 0
        label_w = 1.0 - self.alpha if has_heads else 1.0

        total = self.add_term(result, None, "task", self.task_term(logits, target), label_w)
        if has_heads:
            total = self._heads(result, total, feats, logits, target, label_w)
        if self.uses_previous:
            total = self.add_term(result, total, "previous", self._previous(logits, index),
                                  self.previous_weight(self.step))
        result["loss"] = total if total is not None else logits.sum() * 0.0
        return result

    def _heads(self, result, total, feats, logits, target, label_w):
        deep = pool_features(feats["deep"]).detach() if "deep" in feats else None
        task = kd = feature = None
        for i, head in enumerate(self.heads):
            out = head(feats[f"head{i}"], deep.shape[-1] if deep is not None else None)
            f_i, z_i = out if isinstance(out, tuple) else (None, out)
            kd = plus(kd, self.kd(z_i, logits))
            task = plus(task, self.task_term(z_i, target))
            if self.feature_weight:
                if f_i is None:
                    raise KDConfigError("self: feature_weight > 0 needs heads that return (feature, logits)")
                feature = plus(feature, (f_i - deep).pow(2).flatten(1).sum(1).mean())
        total = self.add_term(result, total, "heads_task", task, label_w)
        total = self.add_term(result, total, "heads_kd", kd, self.alpha)
        return self.add_term(result, total, "heads_feature", feature, self.feature_weight)

    def _previous(self, logits: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        if index is None:
            raise KDConfigError("self: the previous-epoch term needs the batch's sample indices (index=)")
        index = index.to(self.prev_logits.device).long()
        if self.training and torch.is_grad_enabled():
            detached = logits.detach().float()
            self.next_sum.index_add_(0, index, detached)
            self.next_count.index_add_(0, index, torch.ones_like(index, dtype=self.next_count.dtype))
        seen = self.prev_seen[index]
        if not bool(seen.any()):
            return logits.sum() * 0.0
        teacher = self.prev_logits[index][seen].to(logits.dtype)
        return self.kd(logits[seen.to(logits.device)], teacher)

    @torch.no_grad()
    def on_epoch_end(self, epoch: int) -> None:
        """This epoch's predictions become the teachers of the next (averaged across processes)."""
        if not self.uses_previous:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.next_sum)
            dist.all_reduce(self.next_count)
        seen = self.next_count > 0
        self.prev_logits.copy_(torch.where(seen[:, None], self.next_sum / self.next_count.clamp(min=1)[:, None],
                                           self.prev_logits))
        self.prev_seen.copy_(seen)
        self.next_sum.zero_()
        self.next_count.zero_()


__all__ = ["SelfDistillation", "ShallowHead", "pool_features"]
