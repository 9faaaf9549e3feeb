"""Online (mutual) distillation: peers trained together, each learning from the others.

Survey form: ``L = Σ_i L(z_i, y) + Σ_{i≠j} L_KD(z_i, z_j)``. Three ways to form the peers' targets
(``aggregate``), ``p = softmax(z / T)`` throughout, ``KL_T(a ‖ b) = T²·KL(softmax(a/T) ‖ softmax(b/T))``
averaged over the batch:

``"dml"`` -- Zhang, Xiang, Hospedales & Lu (CVPR 2018), "Deep Mutual Learning"::

    L = Σ_i [ w_task·CE(z_i, y) + w_kd · 1/(N-1) · Σ_{j≠i} KL_T(z_j ‖ z_i) ]

    each peer's target z_j is detached. DML updates the peers in turn, recomputing predictions after
    each update; here all peers are updated together from one forward (one backward for the sum),
    as most implementations do -- for N = 2 and small steps the two agree to first order.

``"one"`` -- Lan, Zhu & Gong (NeurIPS 2018), "Knowledge Distillation by On-the-Fly Native Ensemble"::

    g = softmax(W·[z_1, ..., z_N])            (a learned gate over the peers)
    z_e = Σ_i g_i · z_i                        (the on-the-fly ensemble teacher)
    L = w_task·(Σ_i CE(z_i, y) + CE(z_e, y)) + w_kd · Σ_i KL_T(z_e ‖ z_i)

    z_e is detached in the KL terms. In ONE the peers are branches over a shared trunk and the
    gate reads the trunk's feature; peers here share nothing, so the gate reads the peers' (detached)
    logits.

``"okddip"`` -- Chen, Mei, Wang, Feng & Chen (AAAI 2020), "Online Knowledge Distillation with
Diverse Peers". Peer 0 is the group leader, peers 1..N-1 are auxiliary peers (N ≥ 3)::

    a_ij = softmax_j( (W_q z_i) · (W_k z_j) )   over the auxiliary peers j (i included)
    t_i  = Σ_j a_ij · z_j                        (peer i's own aggregate target)
    L = w_task·Σ_i CE(z_i, y) + w_kd·[ Σ_{i≥1} KL_T(t_i ‖ z_i) + KL_T(mean_{j≥1} z_j ‖ z_0) ]

    As in the authors' code the first-level targets t_i keep their gradient, so that W_q and W_k
    learn; the second-level target of the leader is detached. The paper projects each branch's
    feature; peers here share nothing, so the projections read the logits. The authors ramp
    w_kd up over training: give ``kd_weight`` as a schedule for that.

Trainable: every peer (and the gate / projections). Exported: peer ``export_peer`` (0 by default,
the leader for OKDDip).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..losses.logit import KDLoss, soft_kl
from ..registry import SCHEMES
from ..errors import KDConfigError
from .base import Scheme, plus, Weight, as_module_list, export_of, weight_schedule

AGGREGATES = ("dml", "one", "okddip")


@SCHEMES.register("mutual", "dml", "online")
class MutualLearning(Scheme):
    """N peers, each with its task loss plus distillation from the others (see module docstring).

    Args:
        peers: the models trained together (N ≥ 2; N ≥ 3 for ``okddip``); any architectures with
            the same output classes.
        aggregate: ``"dml"`` (default), ``"one"`` or ``"okddip"``.
        temperature: T of every KL term (DML uses 1, ONE and OKDDip 3).
        task_weight, kd_weight: numbers or weight schedules.
        export_peer: which peer ``export_model()`` returns.
        attention_dim: width of OKDDip's query/key projections.
    """

    def __init__(
        self,
        peers: Sequence[nn.Module],
        aggregate: str = "dml",
        temperature: float = 1.0,
        task_weight: Weight = 1.0,
        kd_weight: Weight = 1.0,
        export_peer: int = 0,
        attention_dim: int = 8,
        task_loss: Any = "cross_entropy",
        check_finite: bool = True,
    ):
        super().__init__(task_loss=task_loss, check_finite=check_finite)
        if aggregate not in AGGREGATES:
            raise KDConfigError(f"mutual: aggregate must be one of {', '.join(AGGREGATES)}; got {aggregate!r}")
        peers = as_module_list(peers, "mutual: peer", minimum=3 if aggregate == "okddip" else 2)
        if not 0 <= export_peer < len(peers):
            raise KDConfigError(f"mutual: export_peer must lie in [0, {len(peers) - 1}], got {export_peer}")
        self.peers = nn.ModuleList(peers)
        self.aggregate = aggregate
        self.temperature = float(temperature)
        self.kd = KDLoss(temperature=temperature)
        self.task_weight = weight_schedule(task_weight)
        self.kd_weight = weight_schedule(kd_weight)
        self.export_peer = int(export_peer)
        if aggregate == "one":
            self.gate = nn.LazyLinear(len(peers))
        if aggregate == "okddip":
            self.query = nn.LazyLinear(attention_dim, bias=False)
            self.key = nn.LazyLinear(attention_dim, bias=False)

    def export_model(self) -> nn.Module:
        return export_of(self.peers[self.export_peer])

    def forward(self, inputs: Any, target: torch.Tensor | None = None, index: torch.Tensor | None = None) -> dict:
        raws, logits = zip(*(self.model_logits(peer, inputs) for peer in self.peers))
        w_task, w_kd = self.task_weight(self.step), self.kd_weight(self.step)
        result: dict[str, Any] = {"student_output": raws[self.export_peer]}

        task = None
        for z in logits:
            task = plus(task, self.task_term(z, target))
        if self.aggregate == "dml":
            kd = self._dml(logits)
        elif self.aggregate == "one":
            z_e, kd = self._one(logits)
            task = plus(task, self.task_term(z_e, target))
        else:
            kd = self._okddip(logits)

        total = self.add_term(result, None, "task", task, w_task)
        total = self.add_term(result, total, "kd", kd, w_kd)
        result["loss"] = total
        return result

    def _dml(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        n = len(logits)
        return sum(self.kd(z_i, z_j) for i, z_i in enumerate(logits) for j, z_j in enumerate(logits) if i != j) / (n - 1)

    def _one(self, logits: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        stacked = torch.stack(logits, dim=-1)  # (B, C, N)
        gate = torch.softmax(self.gate(torch.cat([z.detach() for z in logits], dim=-1)), dim=-1)  # (B, N)
        z_e = (stacked * gate.unsqueeze(-2)).sum(-1)
        return z_e, sum(self.kd(z, z_e) for z in logits)

    def _okddip(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        leader, aux = logits[0], torch.stack(logits[1:], dim=1)  # aux: (B, M, C)
        energy = self.query(aux) @ self.key(aux).transpose(1, 2)  # (B, M, M)
        targets = torch.softmax(energy, dim=-1) @ aux  # t_i = Σ_j a_ij z_j
        t2 = self.temperature**2
        first = sum(
            (soft_kl(aux[:, i], targets[:, i], self.temperature) * t2).mean() for i in range(aux.shape[1])
        )
        return first + self.kd(leader, aux.mean(dim=1))


__all__ = ["MutualLearning", "AGGREGATES"]
