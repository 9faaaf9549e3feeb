"""``DistillationTrainer``: a ``transformers.Trainer`` that trains a student with distillation terms.

    trainer = DistillationTrainer(
        model=student, teacher=teacher, kd_args=KDArguments(task_type="classification", alpha_hidden=1.0),
        args=TrainingArguments(...), train_dataset=..., eval_dataset=..., processing_class=tokenizer,
        data_collator=KDCollator(tokenizer),
    )
    trainer.train(); trainer.save_model("out/")   # writes the student alone, loadable with AutoModel...

The loss of one optimiser step is ``alpha_task · task + alpha_kd · logit KD + alpha_hidden · hidden +
alpha_attention · attention + alpha_value_relation · value relation + alpha_qkv_relation · Q/K/V
relations``; every term is logged as ``loss_<term>`` (unweighted). Terms with weight 0 cost nothing;
with every distillation weight at 0 the teacher is not run and training is plain fine-tuning.

Guarantees, and how they are kept:

* Gradient accumulation: each term is a mean over its own unit (examples, tokens, or labelled
  tokens) of the *whole* accumulated batch: the micro-batch mean is weighted by the micro-batch's
  share of units, counted in :meth:`get_batch_samples`. The update equals the one of the large batch.
* The teacher stays on ``args.device`` in eval mode with ``requires_grad=False``; it runs under
  ``torch.no_grad()`` inside ``accelerator.autocast()`` (the Trainer's fp16/bf16), and is never
  handed to ``accelerator.prepare``, so DDP/FSDP never wrap it (each process holds a full copy).
* Columns the teacher needs (``teacher_input_ids`` ..., ``kd_index``) survive
  ``remove_unused_columns`` and are taken out of the batch before the student's forward.
* Learnable projections (``linear`` connectors, one shared ``W_h`` for hidden layers and one
  ``W_e`` for embeddings, as in TinyBERT) are trained with the student, saved in checkpoints as
  ``kd_connectors.safetensors`` and restored by ``resume_from_checkpoint``; ``save_model`` outside
  checkpoints writes the student alone (config, weights, tokenizer). Under multi-process training their
  gradients are averaged across processes by hand, since they live outside the DDP-wrapped student.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from ..shared.connectors import build_connector
from ..shared.errors import KDConfigError, NonFiniteLossError
from ..shared.losses.attention import AttentionKLLoss, AttentionMSELoss, RelationKLLoss, attention_scores
from ..shared.losses.feature import FeatureLoss
from ..shared.losses.logit import KDLoss, LogitMSELoss, SigmoidKDLoss
from ..shared.taps import FeatureTaps
from .data import INDEX_COLUMN, TASK_TYPES, TEACHER_PREFIX
from .extract import qkv_modules
from .layer_map import LayerMapSpec, build_layer_map, transformer_pairs

CONNECTORS_FILE = "kd_connectors.safetensors"
TEACHER_COLUMNS = [TEACHER_PREFIX + k for k in ("input_ids", "attention_mask", "token_type_ids")] + [INDEX_COLUMN]
SEQUENCE_TASKS = ("classification", "regression", "multilabel")


@dataclass
class KDArguments:
    """What to distil and with which weights (a weight of 0 switches a term off)."""

    task_type: str = "classification"
    temperature: float = 2.0
    alpha_task: float = 0.5
    alpha_kd: float = 0.5
    hidden_loss: str = "mse"  # "mse" (TinyBERT) or "cosine" (DistilBERT)
    alpha_hidden: float = 0.0
    attention_loss: str = "mse"  # "mse" on scores (TinyBERT) or "kl" on distributions (MiniLM)
    alpha_attention: float = 0.0
    alpha_value_relation: float = 0.0  # MiniLM value relation (needs equal head counts)
    alpha_qkv_relation: float = 0.0  # MiniLMv2 Q-Q, K-K, V-V relations
    relation_heads: int | None = None  # MiniLMv2 relation heads (default: the teacher's head count)
    layer_map: LayerMapSpec = "uniform"
    teacher_inputs: str = "shared"  # "separate": the teacher reads its own teacher_* columns
    kd_divergence: str = "kl"  # kl (forward), reverse_kl, jsd, tv: see kd_tasks.shared.losses.logit.soft_divergence
    jsd_beta: float = 0.5
    logit_standardization: bool = False  # Sun et al. (CVPR 2024): Z-score the logits before the temperature

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise KDConfigError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        if self.hidden_loss not in ("mse", "cosine"):
            raise KDConfigError(f"hidden_loss must be 'mse' or 'cosine', got {self.hidden_loss!r}")
        if self.attention_loss not in ("mse", "kl"):
            raise KDConfigError(f"attention_loss must be 'mse' or 'kl', got {self.attention_loss!r}")
        if self.teacher_inputs not in ("shared", "separate"):
            raise KDConfigError(f"teacher_inputs must be 'shared' or 'separate', got {self.teacher_inputs!r}")
        for name in ("alpha_task", "alpha_kd", "alpha_hidden", "alpha_attention", "alpha_value_relation",
                     "alpha_qkv_relation"):
            if getattr(self, name) < 0:
                raise KDConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def intermediate(self) -> bool:
        return any((self.alpha_hidden, self.alpha_attention, self.alpha_value_relation, self.alpha_qkv_relation))

    @property
    def uses_teacher(self) -> bool:
        return self.alpha_kd > 0 or self.intermediate


class ZeroGradCallback(TrainerCallback):
    """Zero the projections' gradients after every optimiser step.

    The Trainer zeroes only the model's gradients (``model.zero_grad()``); the projections live
    beside the model and would otherwise accumulate gradients across steps.
    """

    def __init__(self, modules: nn.Module):
        self.modules = modules

    def on_step_end(self, args, state, control, **kwargs):
        self.modules.zero_grad(set_to_none=True)


class DistillationTrainer(Trainer):
    """A ``Trainer`` for a student, with a frozen ``teacher`` and :class:`KDArguments` terms.

    Not ``trl.DistillationTrainer`` (on-policy generative distillation of causal LMs on sampled
    sequences): this one distils encoder models offline on a fixed dataset; ``KDTrainer`` is an alias
    whose name cannot be confused with trl's.

    ``teacher_logits_fn``: optional ``fn(indices: LongTensor) -> Tensor`` giving the teacher's logits
    for the examples ``indices`` (the ``kd_index`` column), e.g. :func:`teacher_logits_from_cache`.
    It replaces the teacher's forward when logit KD is the only distillation term (intermediate
    terms need a live teacher).
    """

    # Our loss is normalised over the whole accumulated batch (see get_batch_samples).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | None = None,
        kd_args: KDArguments | None = None,
        teacher_logits_fn: Callable[[Tensor], Tensor] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.kd_args = kd_args or KDArguments()
        self.model_accepts_loss_kwargs = True  # older Trainers read this instead of loss_is_scaled_for_ga
        if self.args.n_gpu > 1:
            raise KDConfigError(
                "DistillationTrainer does not support torch.nn.DataParallel (several GPUs in one process); launch one "
                "process per GPU with torchrun or accelerate launch instead"
            )
        if self.kd_args.uses_teacher and teacher is None:
            raise KDConfigError("a teacher is needed for the distillation terms; pass teacher=...")
        self.teacher = teacher
        if teacher is not None:
            teacher.to(self.args.device).eval().requires_grad_(False)
        self.teacher_logits_fn = teacher_logits_fn
        self._accum_counts: dict[str, Tensor] | None = None
        self._term_sums: dict[str, Tensor] = {}
        self._terms_last_step = 0
        self._setup_terms()

    # ------------------------------------------------------------------ set-up
    def _setup_terms(self) -> None:
        kd, student, teacher = self.kd_args, self.model, self.teacher
        logit_loss = {"regression": LogitMSELoss, "multilabel": SigmoidKDLoss}.get(kd.task_type, KDLoss)
        if logit_loss is KDLoss:
            self.logit_loss = KDLoss(temperature=kd.temperature, divergence=kd.kd_divergence, beta=kd.jsd_beta,
                                     standardize=kd.logit_standardization)
        elif kd.kd_divergence != "kl" or kd.logit_standardization:
            raise KDConfigError(f"--kd-divergence / --logit-standardization apply to softmax heads; the {kd.task_type} "
                                "head distils with " + ("MSE" if logit_loss is LogitMSELoss else "sigmoid KD"))
        else:
            self.logit_loss = LogitMSELoss() if logit_loss is LogitMSELoss else logit_loss(temperature=kd.temperature)
        self.connectors = nn.ModuleDict()
        self.pairs = ()
        if kd.teacher_inputs == "separate" and (kd.intermediate or kd.task_type not in SEQUENCE_TASKS):
            raise KDConfigError(
                "separate teacher inputs (different tokenizers) allow sequence-level logit distillation only: set the "
                "hidden/attention/relation weights to 0 and use a sequence classification or regression task"
            )
        if not kd.intermediate:
            return
        s_cfg, t_cfg = student.config, teacher.config
        self.pairs = build_layer_map(kd.layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
        self.hidden_loss = FeatureLoss(metric=kd.hidden_loss)  # mean over kept tokens (and width for mse)
        self.attention_loss = AttentionMSELoss() if kd.attention_loss == "mse" else AttentionKLLoss("scores")
        heads_s, heads_t = s_cfg.num_attention_heads, t_cfg.num_attention_heads
        if (kd.alpha_attention or kd.alpha_value_relation) and heads_s != heads_t:
            raise KDConfigError(
                f"attention-map and value-relation terms compare heads one to one, but the student has {heads_s} heads "
                f"and the teacher {heads_t}; use --alpha-qkv-relation (MiniLMv2) with --relation-heads instead"
            )
        self.value_relation = RelationKLLoss(relation_heads=heads_t)
        self.qkv_relation = RelationKLLoss(relation_heads=kd.relation_heads or heads_t)
        if kd.alpha_qkv_relation:
            rh = self.qkv_relation.relation_heads
            for who, width in (("student", s_cfg.hidden_size), ("teacher", t_cfg.hidden_size)):
                if width % rh:
                    raise KDConfigError(f"--relation-heads {rh} does not divide the {who}'s width {width}")
        if kd.alpha_hidden and s_cfg.hidden_size != t_cfg.hidden_size:
            shape_s, shape_t = (1, 1, s_cfg.hidden_size), (1, 1, t_cfg.hidden_size)
            self.connectors["hidden"] = build_connector("linear", shape_s, shape_t)
            if any(s == 0 for s, _ in self.pairs):
                self.connectors["embeddings"] = build_connector("linear", shape_s, shape_t)
        self.connectors.to(self.args.device)
        if len(self.connectors):
            self.add_callback(ZeroGradCallback(self.connectors))
        self._qkv_taps = None
        if kd.alpha_attention or kd.alpha_value_relation or kd.alpha_qkv_relation:
            deep = transformer_pairs(self.pairs)
            self._qkv_taps = (self._make_qkv_taps(student, [s for s, _ in deep]),
                              self._make_qkv_taps(teacher, [t for _, t in deep]))

    @staticmethod
    def _make_qkv_taps(model: nn.Module, layers: list[int]) -> FeatureTaps:
        names = qkv_modules(model)
        specs = {f"{part}{layer}": names[layer - 1][j] for layer in layers for j, part in enumerate("qkv")}
        return FeatureTaps(model, specs)

    # ------------------------------------------------------------------ Trainer hooks
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for column in TEACHER_COLUMNS:
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def create_optimizer(self, *args: Any, **kwargs: Any):
        optimizer = super().create_optimizer(*args, **kwargs)
        params = [p for p in self.connectors.parameters() if p.requires_grad]
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if params and id(params[0]) not in known:
            optimizer.add_param_group({"params": params, "weight_decay": self.args.weight_decay})
        return optimizer

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also count examples, tokens and labelled tokens of the whole accumulated batch."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        totals = [self._unit_counts(b) for b in batches]
        if not totals:
            self._accum_counts = None
            return batches, None
        counts = {k: sum(t[k] for t in totals) for k in totals[0]}
        if self.accelerator.num_processes > 1:
            counts = {k: self.accelerator.gather(v.to(device)[None]).sum() for k, v in counts.items()}
        self._accum_counts = counts
        return batches, counts["samples"]

    def training_step(self, model, inputs, *args: Any, **kwargs: Any) -> Tensor:
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.accelerator.num_processes > 1 and len(self.connectors):
            world = self.accelerator.num_processes
            for p in self.connectors.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v for k, v in inputs.items() if k not in TEACHER_COLUMNS}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The student alone; checkpoints (``_internal_call``) also get the projections."""
        super().save_model(output_dir, _internal_call)
        if _internal_call and len(self.connectors) and self.args.should_save:
            from safetensors.torch import save_file

            state = {k: v.detach().contiguous().cpu() for k, v in self.connectors.state_dict().items()}
            save_file(state, os.path.join(output_dir or self.args.output_dir, CONNECTORS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if len(self.connectors):
            from safetensors.torch import load_file

            path = os.path.join(resume_from_checkpoint, CONNECTORS_FILE)
            if not os.path.isfile(path):
                raise KDConfigError(f"checkpoint {resume_from_checkpoint!r} has no {CONNECTORS_FILE}; cannot resume the projections")
            self.connectors.load_state_dict(load_file(path, device=str(self.args.device)))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._term_sums:
            steps = max(self.state.global_step - self._terms_last_step, 1)
            logs.update({f"loss_{k}": float(v) / steps for k, v in self._term_sums.items()})
            self._term_sums, self._terms_last_step = {}, self.state.global_step
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """Task loss plus distillation terms in training; the plain task loss in evaluation."""
        teacher_extra = {k: inputs[k] for k in TEACHER_COLUMNS if k in inputs}
        inputs = {k: v for k, v in inputs.items() if k not in TEACHER_COLUMNS}
        if not model.training:
            outputs = model(**inputs)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
            return (loss, outputs) if return_outputs else loss

        kd = self.kd_args
        counts = self._unit_counts(inputs)
        labels = inputs.get("labels")
        manual_task = None
        if kd.task_type in ("classification", "regression") and labels is not None and bool(self._unlabelled(labels).any()):
            # transfer rows (label -100, or nan for regression) learn from the teacher alone: the task loss is
            # the mean over the labelled rows only (the model's own loss would be nan on an all-transfer batch)
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
            manual_task = labels
        totals = self._accum_counts if (num_items_in_batch is not None and self._accum_counts) else counts
        live_teacher = kd.intermediate or (kd.alpha_kd > 0 and self.teacher_logits_fn is None)
        student_out, s_taps = self._forward(model, inputs, student=True)
        teacher_out = t_taps = None
        if live_teacher:
            with torch.no_grad(), self.accelerator.autocast():
                teacher_out, t_taps = self._forward(self.teacher, self._teacher_inputs(inputs, teacher_extra), student=False)

        terms: dict[str, tuple[Tensor, str, float]] = {}
        if kd.alpha_task > 0 and manual_task is not None:
            terms["task"] = (self._task_loss_on_labelled(student_out["logits"], manual_task), "labels", kd.alpha_task)
        elif kd.alpha_task > 0 and student_out.get("loss") is not None:
            unit = "labels" if kd.task_type in ("token", "classification", "regression") else "samples"
            terms["task"] = (student_out["loss"], unit, kd.alpha_task)
        if kd.alpha_kd > 0:
            t_logits = self._teacher_logits(teacher_out, inputs, teacher_extra)
            terms["kd"] = (self._logit_term(student_out, t_logits, inputs),
                           "tokens" if kd.task_type == "token" else "samples", kd.alpha_kd)
        if kd.intermediate:
            self._intermediate_terms(terms, student_out, teacher_out, s_taps, t_taps, inputs)

        total = self._logits_of(student_out).new_zeros(())
        scale_all = self.accelerator.num_processes
        for name, (value, unit, weight) in terms.items():
            if not torch.isfinite(value.detach()):
                raise NonFiniteLossError(f"distillation term {name!r} is {value.item()} at step {self.state.global_step}")
            if counts[unit] == 0:
                continue
            share = counts[unit] / totals[unit].clamp(min=1) * scale_all
            total = total + weight * value * share
            self._term_sums[name] = self._term_sums.get(name, 0.0) + value.detach() * share / scale_all
        return (total, student_out) if return_outputs else total

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _unlabelled(labels: Tensor) -> Tensor:
        """Rows (or tokens) without a label: -100 for class ids, nan for regression targets."""
        return torch.isnan(labels) if labels.is_floating_point() else labels == -100

    def _task_loss_on_labelled(self, logits: Tensor, labels: Tensor) -> Tensor:
        keep = ~self._unlabelled(labels)
        if self.kd_args.task_type == "regression":
            pred = logits.squeeze(-1) if logits.dim() > labels.dim() else logits
            diff = torch.where(keep, pred - torch.nan_to_num(labels.to(pred.dtype)), pred.new_zeros(()))
            per_row = diff.pow(2).reshape(labels.shape[0], -1).mean(-1)
            keep_rows = keep.reshape(labels.shape[0], -1).all(-1)
            return (per_row * keep_rows).sum() / keep_rows.sum().clamp(min=1)
        losses = nn.functional.cross_entropy(logits.float(), labels.long(), ignore_index=-100, reduction="sum")
        return losses / keep.sum().clamp(min=1)

    @classmethod
    def _unit_counts(cls, batch: dict) -> dict[str, Tensor]:
        ids = batch.get("input_ids")
        mask = batch.get("attention_mask")
        samples = torch.tensor(ids.shape[0] if ids is not None else 0)
        tokens = mask.sum() if mask is not None else torch.tensor(ids.numel() if ids is not None else 0)
        labels = batch.get("labels")
        if labels is None:
            labelled = samples
        elif labels.is_floating_point():
            labelled = (~torch.isnan(labels)).reshape(labels.shape[0], -1).all(-1).sum()
        else:
            labelled = (labels != -100).sum()
        return {"samples": samples.to(tokens.device), "tokens": tokens, "labels": labelled.to(tokens.device)}

    def _forward(self, model: nn.Module, inputs: dict, student: bool):
        need_hidden = bool(self.kd_args.alpha_hidden)
        kwargs = {"output_hidden_states": True} if need_hidden else {}
        taps = self._qkv_taps[0 if student else 1] if getattr(self, "_qkv_taps", None) else None
        if taps is None:
            return model(**inputs, **kwargs), None
        out = taps.run(lambda: model(**inputs, **kwargs))
        return out, dict(taps.outputs)

    def _teacher_inputs(self, inputs: dict, extra: dict) -> dict:
        if self.kd_args.teacher_inputs == "separate":
            found = {k[len(TEACHER_PREFIX):]: v for k, v in extra.items() if k.startswith(TEACHER_PREFIX)}
            if "input_ids" not in found:
                raise KDConfigError("teacher_inputs='separate' but the batch has no teacher_input_ids column")
            return found
        return {k: v for k, v in inputs.items() if k not in ("labels", "start_positions", "end_positions")}

    def _teacher_logits(self, teacher_out, inputs: dict, extra: dict) -> Tensor:
        if teacher_out is not None:
            return self._logits_of(teacher_out)
        if INDEX_COLUMN not in extra:
            raise KDConfigError(f"cached teacher logits need the {INDEX_COLUMN!r} column in the training data")
        return self.teacher_logits_fn(extra[INDEX_COLUMN])

    def _logits_of(self, out) -> Tensor:
        if self.kd_args.task_type == "qa":
            return torch.stack([out["start_logits"], out["end_logits"]], dim=-1)
        return out["logits"]

    def _logit_term(self, student_out, teacher_logits: Tensor, inputs: dict) -> Tensor:
        s_logits = self._logits_of(student_out)
        teacher_logits = teacher_logits.to(s_logits.device)
        mask = inputs.get("attention_mask")
        if self.kd_args.task_type == "token":
            return self.logit_loss(s_logits, teacher_logits, mask=None if mask is None else mask.bool())
        if self.kd_args.task_type == "qa":  # a distribution over positions for start and for end
            s, t = s_logits.transpose(1, 2), teacher_logits.transpose(1, 2)  # (B, 2, L)
            if mask is not None:
                pad = ~mask.bool()[:, None, :]
                s = s.masked_fill(pad, torch.finfo(s.dtype).min)
                t = t.masked_fill(pad, torch.finfo(t.dtype).min)
            return self.logit_loss(s, t)  # mean over the B x 2 (start, end) distributions
        return self.logit_loss(s_logits, teacher_logits)

    def _intermediate_terms(self, terms, s_out, t_out, s_taps, t_taps, inputs) -> None:
        kd = self.kd_args
        mask = inputs.get("attention_mask")
        mask = mask.bool() if mask is not None else None
        if kd.alpha_hidden:
            values = []
            for s, t in self.pairs:
                h_s = s_out["hidden_states"][s]
                key = "embeddings" if s == 0 else "hidden"
                if key in self.connectors:
                    h_s = self.connectors[key](h_s)
                values.append(self.hidden_loss(h_s, t_out["hidden_states"][t].to(h_s.dtype), mask=mask))
            terms["hidden"] = (torch.stack(values).mean(), "tokens", kd.alpha_hidden)
        deep = transformer_pairs(self.pairs)
        if not deep or s_taps is None:
            return
        heads_s, heads_t = self.model.config.num_attention_heads, self.teacher.config.num_attention_heads
        if kd.alpha_attention:
            values = [
                self.attention_loss(
                    attention_scores(s_taps[f"q{s}"], s_taps[f"k{s}"], heads_s),
                    attention_scores(t_taps[f"q{t}"], t_taps[f"k{t}"], heads_t).float(),
                    mask=mask,
                )
                for s, t in deep
            ]
            terms["attention"] = (torch.stack(values).mean(), "tokens", kd.alpha_attention)
        if kd.alpha_value_relation:
            values = [self.value_relation(s_taps[f"v{s}"], t_taps[f"v{t}"], mask=mask) for s, t in deep]
            terms["value_relation"] = (torch.stack(values).mean(), "tokens", kd.alpha_value_relation)
        if kd.alpha_qkv_relation:
            values = [
                sum(self.qkv_relation(s_taps[f"{p}{s}"], t_taps[f"{p}{t}"], mask=mask) for p in "qkv")
                for s, t in deep
            ]
            terms["qkv_relation"] = (torch.stack(values).mean(), "tokens", kd.alpha_qkv_relation)


def teacher_logits_from_cache(
    directory: str,
    teacher: nn.Module,
    dataset,
    collator: Callable,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    rebuild: bool = False,
    top_k: int | None = None,
) -> Callable[[Tensor], Tensor]:
    """Build (or reuse) a disk cache of the teacher's logits on ``dataset`` and return a lookup
    (``top_k``: store each row's top-k logits with the tail mass, see :mod:`kd_tasks.shared.topk`).

    Uses :class:`kd_tasks.shared.cache.TeacherCache`: keyed by the teacher's weights and the
    tokenised dataset, so a changed teacher or dataset is refused as stale instead of reused. The
    lookup maps the ``kd_index`` column of a batch to the cached logits on the batch's device.
    """
    from ..shared.cache import TeacherCache

    drop = ("labels", INDEX_COLUMN)

    def split(batch: dict) -> dict:
        found = {k[len(TEACHER_PREFIX):]: v for k, v in batch.items() if k.startswith(TEACHER_PREFIX)}
        found = found or {k: v for k, v in batch.items() if not k.startswith(TEACHER_PREFIX)}
        return {k: v for k, v in found.items() if k not in drop}

    cache = TeacherCache.load_or_build(
        teacher, dataset, directory, dataset_id=getattr(dataset, "_fingerprint", None),
        preprocessing="transformers tokenizer (the token ids are part of the dataset fingerprint)",
        rebuild=rebuild, batch_size=batch_size, collate_fn=collator, split_batch=lambda b: split(dict(b)),
        device=device, logits_fn=lambda out: out["logits"], top_k=top_k,
    )

    def lookup(indices: Tensor) -> Tensor:
        return cache.lookup(indices, device=indices.device, names=["output"])["output"]

    lookup.cache = cache
    return lookup


KDTrainer = DistillationTrainer
