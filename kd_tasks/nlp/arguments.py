"""The Trainer-native interface: :class:`DistillationArguments`, a ``transformers.TrainingArguments`` subclass
holding every kd-tasks option as a dataclass field, is the single source of the ``kd-tasks nlp`` command line.

* The options are four plain dataclasses, one per ``--help`` group -- :class:`ModelOptions`,
  :class:`DataOptions`, :class:`DistillationOptions`, :class:`TrainingOptions` -- whose field metadata are
  ``argparse`` keywords (``help``, ``choices``, ``nargs``, ``const``, ``metavar``, ``aliases``), read by
  ``transformers.HfArgumentParser``. :class:`TrainingOptions` redefines the ``TrainingArguments`` fields
  kd-tasks sets with its own defaults, and gives kd-tasks' short names as aliases of the Trainer's:
  ``--epochs`` = ``--num_train_epochs``, ``--batch-size`` = ``--per_device_train_batch_size``,
  ``--eval-batch-size`` = ``--per_device_eval_batch_size``, ``--cpu`` = ``--use_cpu``,
  ``--warmup`` = ``--warmup_steps``.
* ``DistillationArguments`` = those four + ``TrainingArguments``. It is defined on first use (``transformers``
  is imported then, not when ``kd_tasks.nlp`` is), and is an ordinary dataclass:
  ``HfArgumentParser(DistillationArguments)`` reads every option in ``--snake_case`` and ``--kebab-case`` (so
  ``accelerate launch`` / ``torchrun`` scripts and Trainer habits work unchanged),
  ``parse_yaml_file(recipe)`` reads a recipe, ``DistillationArguments(output_dir=..., teacher=...,
  student_layers=3)`` builds one in Python, and :func:`kd_tasks.nlp.distill.run_arguments` runs it.
* ``kd-tasks nlp`` parses with :func:`argument_parser_class`, an ``HfArgumentParser`` over
  ``DistillationArguments`` that adds ``--config`` / ``--recipe``, prints kd-tasks' groups before the
  Trainer's (whose help it shortens), refuses abbreviations and ends usage errors in one line. Its
  namespace, or a ``DistillationArguments``, becomes the namespace the run reads with :func:`run_namespace`
  (kd-tasks' short names for the aliased fields).

Naming: trl also ships a ``DistillationTrainer`` (on-policy generative distillation of causal LMs from
sampled sequences). ``kd_tasks.nlp.DistillationTrainer`` is another class: offline distillation of
encoder models (classification, regression, token classification, extractive QA) on a fixed dataset, with
logit, hidden-state, attention and relation terms. ``kd_tasks.nlp.KDTrainer`` is the same class under a
name that cannot be confused with trl's.
"""

import argparse
import dataclasses
import enum
import functools
from typing import Any, Optional

# kd-tasks option -> the TrainingArguments field it sets (its aliases on the command line)
ALIASES = {
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "cpu": "use_cpu",
    "warmup": "warmup_steps",
}
KD_NAME = {field: ours for ours, field in ALIASES.items()}  # TrainingArguments field -> kd-tasks' name
# TrainingArguments fields kd-tasks sets itself from its own options (not on its command line)
OWNED = {"resume_from_checkpoint", "eval_strategy", "do_train", "do_eval", "do_predict", "overwrite_output_dir"}
TRAINER_GROUP = "transformers.TrainingArguments (every Trainer flag; see its documentation)"
SHORT_HELP = 140  # characters of a TrainingArguments field's help shown by kd-tasks nlp --help


def option(default: Any = None, help: str = "", **argparse_kwargs) -> Any:
    """A dataclass field with its ``argparse`` keywords as metadata (``HfArgumentParser`` passes them on)."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kwargs})


def alias(name: str) -> list[str]:
    """``--name`` in both spellings, as ``HfArgumentParser`` aliases."""
    return list(dict.fromkeys([f"--{name.replace('_', '-')}", f"--{name}"]))


@dataclasses.dataclass
class ModelOptions:
    """Teacher and student."""

    teacher: Optional[str] = option(help="fine-tuned teacher: a local directory or a hub name")
    teacher_tokenizer: Optional[str] = option(help="tokenizer of the teacher if not in its directory")
    student: Optional[str] = option(help="a student model directory or hub name (trained further here)")
    student_layers: Optional[int] = option(help="keep N evenly spaced teacher layers, copying their weights")
    student_layer_ids: Optional[str] = option(help="keep these 0-based teacher layers, e.g. 0,2,4,7,9,11")
    student_shape: Optional[str] = option(help="a narrower student from scratch: tinybert-4l-312, minilm-6l-384, ...")
    student_hidden_size: Optional[int] = option(help="override the width of --student-shape")
    student_heads: Optional[int] = option(help="override the head count of --student-shape")
    student_intermediate_size: Optional[int] = option(help="override the feed-forward width of --student-shape")


@dataclasses.dataclass
class DataOptions:
    """The task, its data and the transfer data."""

    task: Optional[str] = option(help="a GLUE task name (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli)")
    task_type: str = option("classification", "head for local data",
                            choices=["classification", "regression", "multilabel", "token", "qa"])
    train_file: Optional[str] = option(help="local training data (.csv, .tsv, .json, .jsonl, .parquet)")
    validation_file: Optional[str] = option(help="local validation data (default: 10%% of the training file)")
    text_column: Optional[str] = option(help="text column (token task: list of words; qa: the question)")
    text_pair_column: Optional[str] = option(help="second text column (qa: the context)")
    label_column: Optional[str] = option(help="label column (default: label; token: ner_tags; qa: answers)")
    max_length: int = option(128, "tokens per example after truncation")
    doc_stride: Optional[int] = option(help="qa: overlap in tokens of the windows over a long context "
                                            "(default: min(128, max-length / 4))")
    max_train_samples: Optional[int] = option(help="use at most this many training examples")
    max_eval_samples: Optional[int] = option(help="use at most this many validation examples")
    unlabeled_file: Optional[str] = option(help="transfer text the teacher labels (soft labels only, no task "
                                                "loss): .txt (one text per line) or a csv/tsv/json/jsonl/parquet "
                                                "column")
    unlabeled_column: Optional[str] = option(help="text column of --unlabeled-file (default: sentence, else text)")
    unlabeled_ratio: Optional[float] = option(help="use at most this many unlabelled texts per labelled one "
                                                   "(default: all of them)")
    augment_copies: int = option(0, "TinyBERT augmentation: N word-replaced copies of each labelled sentence "
                                    "(teacher labels only)")
    augment_prob: float = option(0.4, "probability of replacing each word")
    augment_k: int = option(15, "candidates per word (masked-LM top-k or neighbours)")
    augment_mlm: Optional[str] = option(help="a masked LM directory predicting the replacements (TinyBERT)")
    augment_neighbours: Optional[str] = option(help="a neighbour list 'word<TAB>n1 n2 ...' (thesaurus / word "
                                                    "vectors); default without --augment-mlm: nearest whole words "
                                                    "in the teacher's word embeddings")


@dataclasses.dataclass
class DistillationOptions:
    """The loss terms and the layer map."""

    temperature: float = option(2.0, "softmax temperature of the logit KD term")
    alpha_task: float = option(0.5, "weight of the task loss on the labels")
    alpha_kd: float = option(0.5, "weight of the logit KD term")
    kd_divergence: str = option("kl", "divergence of the logit KD term: forward KL (Hinton), reverse KL, "
                                      "JSD(beta), total variation", choices=["kl", "reverse_kl", "jsd", "tv"])
    jsd_beta: float = option(0.5, "beta of --kd-divergence jsd (0.5: symmetric JSD)")
    logit_standardization: bool = option(False, "Z-score student and teacher logits before the temperature "
                                                "(Sun et al., CVPR 2024)")
    hidden_loss: str = option("mse", "TinyBERT mse or DistilBERT cosine", choices=["mse", "cosine"])
    alpha_hidden: float = option(0.0, "weight of the hidden-state term")
    attention_loss: str = option("mse", "TinyBERT mse or MiniLM kl", choices=["mse", "kl"])
    alpha_attention: float = option(0.0, "weight of the attention-map term")
    alpha_value_relation: float = option(0.0, "weight of MiniLM's value relation")
    alpha_qkv_relation: float = option(0.0, "weight of MiniLMv2's Q/K/V relations")
    relation_heads: Optional[int] = option(help="MiniLMv2 relation heads (default: the teacher's heads)")
    layer_map: str = option("auto", "auto (a student cut from the teacher learns from the layers it was copied "
                                    "from, else uniform), extraction, uniform, last, last-k, '1:2,2:4' or '2,4,6'")
    teacher_inputs: str = option("shared", "separate: the teacher tokenises the text itself (different "
                                           "tokenizers; logit KD only)", choices=["shared", "separate"])
    cache_teacher_logits: Optional[str] = option(help="directory caching the teacher's logits on disk "
                                                      "(logit KD only)")
    cache_top_k: Optional[int] = option(help="store only each row's top K teacher logits, their classes and the "
                                             "tail mass in the cache (for large label spaces; sequence "
                                             "classification); the teacher's top-K probabilities are kept exactly, "
                                             "the rest of its mass spread evenly", metavar="K")
    rebuild_cache: bool = option(False, "rebuild the teacher-logits cache if stale")
    stages: Optional[str] = option(help="a recipe's list of stages (JSON on the command line), each a mapping of "
                                        "options for that stage, e.g. intermediate layers first, then logits; run "
                                        "in order, each resumable")


@dataclasses.dataclass
class TrainingOptions:
    """Training, checkpoints and the report; the ``TrainingArguments`` fields here carry kd-tasks' defaults."""

    output_dir: Optional[str] = option(help="where the student, checkpoints and report go")
    num_train_epochs: float = option(3.0, "training epochs", aliases=["--epochs"], metavar="EPOCHS")
    max_steps: int = option(-1, "stop after this many optimiser steps (overrides --epochs)")
    per_device_train_batch_size: int = option(32, "training batch per device", aliases=alias("batch_size"),
                                              metavar="BATCH_SIZE")
    per_device_eval_batch_size: int = option(64, "evaluation batch per device", aliases=alias("eval_batch_size"),
                                             metavar="EVAL_BATCH_SIZE")
    gradient_accumulation_steps: int = option(1, "batches summed into one optimiser step")
    learning_rate: float = option(5e-5, "peak learning rate (--lr: the same)", aliases=["--lr"])
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_steps: float = option(0.1, "warm-up steps, or a fraction of all steps if < 1", aliases=["--warmup"],
                                 metavar="WARMUP")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    seed: int = option(42, "random seed (data order, student initialisation, augmentation)")
    fp16: bool = option(False, "mixed precision fp16 (student and teacher)")
    bf16: bool = option(False, "mixed precision bf16 (student and teacher)")
    use_cpu: bool = option(False, "train on the CPU even if a GPU is present", aliases=["--cpu"])
    logging_steps: int = option(50, "log the losses every N steps")
    save_steps: Optional[int] = option(help="checkpoint every N steps (default: every epoch)")
    save_total_limit: Optional[int] = option(2, "checkpoints kept")
    save_strategy: Optional[str] = option(help="when to checkpoint (default: epoch, or steps with --save-steps; "
                                               "no: never, no --resume)", choices=["epoch", "steps", "no"])
    threads: Optional[int] = option(help="torch CPU threads (default: torch's choice)")
    disable_tqdm: bool = option(False, "no progress bar (the Trainer's, on by default)")
    resume: Optional[str] = option(help="continue the run in --output-dir from its latest checkpoint (alone or "
                                        "'latest'), or from the given checkpoint directory", nargs="?", const="latest")
    overwrite: bool = option(False, "replace the run already in --output-dir (its checkpoint-* directories and "
                                    "report are removed)")
    report_to: str = option("none", "none, tensorboard, ...")
    latency_batch_size: int = option(32, "validation rows of the report's CPU measurements: throughput, time per "
                                         "batch, peak memory (latency: batch 1)")
    no_report: bool = option(False, "skip the teacher-vs-student report")
    export: Optional[str] = option(help="onnx: also write the saved student to <output-dir>/onnx/model.onnx "
                                        "(keyword inputs, dynamic batch and sequence axes), checked against PyTorch "
                                        "with onnxruntime", choices=["onnx"])
    quantize: bool = option(False, "add an int8 dynamic quantised copy (torch.ao, Linear layers) of the saved "
                                   "student to the report, evaluated on the validation split on the CPU")


# the kd-tasks option groups, in --help order
GROUPS = (("models", ModelOptions), ("data", DataOptions), ("distillation", DistillationOptions),
          ("training", TrainingOptions))


def kd_fields() -> list[dataclasses.Field]:
    """Every kd-tasks option, as declared (field names: the Trainer's for the aliased ones)."""
    return [f for _, group in GROUPS for f in dataclasses.fields(group)]


def kd_option_names() -> list[str]:
    """The kd-tasks options by the names the run reads (``epochs``, ``batch_size``, ... for the aliased ones)."""
    return [KD_NAME.get(f.name, f.name) for f in kd_fields()]


def kd_options_typed(kind: type) -> list[str]:
    """The kd-tasks options (run names) declared as ``kind`` or ``Optional[kind]``."""
    return [KD_NAME.get(f.name, f.name) for f in kd_fields() if f.type in (kind, Optional[kind])]


def training_fields() -> list[dataclasses.Field]:
    """``TrainingArguments``' own init fields (with its defaults)."""
    from transformers import TrainingArguments

    return [f for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_")]


@functools.lru_cache(maxsize=None)  # built on first use, so transformers is imported only then
def distillation_arguments_class() -> type:
    """``DistillationArguments``: ``TrainingArguments`` plus every kd-tasks option (the four option groups)."""
    from transformers import TrainingArguments

    @dataclasses.dataclass
    class DistillationArguments(ModelOptions, DataOptions, DistillationOptions, TrainingOptions, TrainingArguments):
        """``TrainingArguments`` plus the kd-tasks distillation options (see :mod:`kd_tasks.nlp.arguments`).

        The ``TrainingArguments`` fields kd-tasks sets keep its defaults (batch 32, weight decay 0.01, ...);
        ``save_strategy`` / ``save_steps`` left unset mean "every epoch, or every ``--save-steps``", resolved for
        the Trainer here. :meth:`given_values` returns the values as given, before ``TrainingArguments``
        normalised them (enums, ``report_to`` lists, ...), which is what the run reads."""

        def __post_init__(self):
            given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
            if self.save_strategy is None:
                self.save_strategy = "epoch" if self.save_steps is None else "steps"
            if self.save_steps is None:  # the Trainer's default (not used with checkpoints every epoch)
                self.save_steps = TrainingArguments.save_steps
            super().__post_init__()
            self._kd_given = {name: (value, getattr(self, name)) for name, value in given.items()}

        def given_values(self) -> dict[str, Any]:
            """Every init field: its value as given, unless it was changed after construction."""
            out = {}
            for f in dataclasses.fields(self):
                if f.init:
                    current = getattr(self, f.name)
                    given, normalised = self._kd_given.get(f.name, (current, current))
                    out[f.name] = given if _same(current, normalised) else current
            return out

    DistillationArguments.__qualname__ = "DistillationArguments"  # pickled by name, found by __getattr__
    return DistillationArguments


def _same(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # noqa: BLE001 -- values without a plain equality (arrays, ...) count as changed
        return False


def _short_help(field: dataclasses.Field) -> str:
    text = " ".join(str(field.metadata.get("help", "")).split())
    if len(text) > SHORT_HELP:
        text = text[:SHORT_HELP].rstrip("%") + "…"  # never cut an escaped %% in two
    return text


def _resolved(field: dataclasses.Field, resolved_type: Any, short_help: bool) -> dataclasses.Field:
    """A copy of a dataclass field with its type resolved (and its help shortened): ``HfArgumentParser``
    rewrites the type of the field it is given, and the class's own fields stay untouched."""
    metadata = dict(field.metadata)
    if short_help:
        metadata["help"] = _short_help(field)
    new = dataclasses.field(default=field.default, default_factory=field.default_factory, metadata=metadata)
    new.name = field.name
    new.type = resolved_type
    return new


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The epilog's examples as written; each option's default (unless ``None`` or its help speaks of it);
    true/false options without a metavar."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if action.option_strings and not hidden and "default" not in text:
            text += " (default: %(default)s)"
        return text

    def _format_action_invocation(self, action: argparse.Action) -> str:
        return ", ".join(action.option_strings) if is_flag(action) else super()._format_action_invocation(action)


@functools.lru_cache(maxsize=None)
def argument_parser_class() -> type:
    """The ``kd-tasks nlp`` parser: ``HfArgumentParser`` over ``DistillationArguments`` with kd-tasks' layout."""
    from typing import get_type_hints

    from transformers import HfArgumentParser

    from ..shared.errors import ArgumentParser

    class DistillationArgumentParser(HfArgumentParser, ArgumentParser):
        """``HfArgumentParser(DistillationArguments)`` plus ``--config`` / ``--recipe``: kd-tasks' option groups
        first, then the other ``TrainingArguments`` fields (short help); abbreviations refused, usage errors
        on one line (``kd_tasks.shared.errors.ArgumentParser``)."""

        def __init__(self, **kwargs):
            kwargs.setdefault("formatter_class", HelpFormatter)
            super().__init__(distillation_arguments_class(), **kwargs)

        def _add_dataclass_arguments(self, dtype: type) -> None:
            hints = get_type_hints(dtype)
            fields = {f.name: f for f in dataclasses.fields(dtype) if f.init and f.name not in OWNED}
            self.add_argument("--config", "--recipe", dest="config",
                              help="YAML/JSON recipe whose keys are the option names below (--recipe: the same)")
            for title, group in GROUPS:
                container = self.add_argument_group(title)
                for field in dataclasses.fields(group):
                    self._add_option(container, fields.pop(field.name), hints, kd_option=True)
            container = self.add_argument_group(TRAINER_GROUP)
            for field in fields.values():
                self._add_option(container, field, hints, kd_option=False)

        def _add_option(self, container, field: dataclasses.Field, hints: dict, kd_option: bool) -> None:
            self._parse_dataclass_field(container, _resolved(field, hints[field.name], short_help=not kd_option))
            if kd_option:  # kd-tasks' spelling first in --help and in error messages: --batch-size, --student-layers
                action = self._option_string_actions[f"--{field.name}"]
                own = field.metadata.get("aliases", []) if field.name in KD_NAME else []
                action.option_strings[:] = list(dict.fromkeys(own + alias(field.name) + action.option_strings))

    DistillationArgumentParser.__qualname__ = "DistillationArgumentParser"
    return DistillationArgumentParser


def is_flag(action: argparse.Action) -> bool:
    """A true/false option (``--fp16``, ``--fp16 false``)."""
    return action.nargs == "?" and action.const is True


def run_namespace(values) -> argparse.Namespace:
    """The namespace the run reads, from a ``DistillationArguments`` (its values as given) or from the
    parser's namespace: kd-tasks' names for the aliased Trainer fields (``epochs``, ``batch_size``, ...), no
    field kd-tasks sets itself, enums as their values, ``report_to`` as one name."""
    given = values.given_values() if hasattr(values, "given_values") else vars(values)
    out = {"config": None}
    for name, value in given.items():
        if name in OWNED:
            continue
        out[KD_NAME.get(name, name)] = value.value if isinstance(value, enum.Enum) else value
    report_to = out.get("report_to")
    if report_to is None or isinstance(report_to, (list, tuple)):
        out["report_to"] = report_to[0] if report_to else "none"
    return argparse.Namespace(**out)


def training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainingArguments`` fields outside kd-tasks' options that the user set (values other than the
    field's default)."""
    own = set(kd_option_names()) | set(ALIASES.values())  # kd-tasks' options are applied by the caller
    out = {}
    for field in training_fields():
        if field.name in OWNED or field.name in own or not hasattr(args, field.name):
            continue
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        value = getattr(args, field.name)
        if value != default:
            out[field.name] = value
    return out


def __getattr__(name: str):
    if name == "DistillationArguments":
        return distillation_arguments_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
