"""Task data: GLUE through ``datasets``, or local csv/tsv/json/jsonl/parquet files; tokenisation per head.

Local files name their columns:

* ``classification`` / ``regression``: a text column, optionally a second (pair) text column, and a
  label column (class names or ids; a float for regression);
* ``multilabel``: the label column holds a list of class names/ids (json/parquet), or a string of
  names separated by ``;`` (csv);
* ``token``: the text column holds a list of words, the label column a list of tags (names or ids);
* ``qa``: question (text column), context (pair column) and SQuAD-style answers
  ``{"text": [...], "answer_start": [...]}`` (label column).

Tokenizer mismatch: the teacher and student must read the same tokens for anything but
sequence-level logit distillation; :func:`check_tokenizers` refuses otherwise with the reasons.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..shared.errors import KDConfigError, suggest

TASK_TYPES = ("classification", "regression", "multilabel", "token", "qa")
TEACHER_PREFIX = "teacher_"
INDEX_COLUMN = "kd_index"


@dataclass(frozen=True)
class GlueTask:
    text: str
    pair: str | None
    num_labels: int
    metric: str
    validation: str = "validation"


# Columns and headline metric per GLUE task (Wang et al. 2019, "GLUE").
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("sentence", None, 2, "matthews_correlation"),
    "sst2": GlueTask("sentence", None, 2, "accuracy"),
    "mrpc": GlueTask("sentence1", "sentence2", 2, "f1"),
    "qqp": GlueTask("question1", "question2", 2, "f1"),
    "stsb": GlueTask("sentence1", "sentence2", 1, "pearson"),
    "mnli": GlueTask("premise", "hypothesis", 3, "accuracy", "validation_matched"),
    "qnli": GlueTask("question", "sentence", 2, "accuracy"),
    "rte": GlueTask("sentence1", "sentence2", 2, "accuracy"),
    "wnli": GlueTask("sentence1", "sentence2", 2, "accuracy"),
}

DEFAULT_METRIC = {
    "classification": "accuracy",
    "regression": "pearson",
    "multilabel": "f1_micro",
    "token": "f1",
    "qa": "f1",  # SQuAD F1 on the answer text
}


@dataclass
class TaskSpec:
    """What the data looks like and how the task is scored."""

    task_type: str = "classification"
    text_column: str = "sentence"
    text_pair_column: str | None = None
    label_column: str = "label"
    label_names: list[str] | None = None
    metric: str = "accuracy"
    glue_task: str | None = None
    labels_are_ids: bool = False  # the label column already holds ids 0..N-1 (GLUE's ClassLabel)
    doc_stride: int | None = None  # qa: overlap of the context windows (default min(128, max_length // 4))

    @property
    def num_labels(self) -> int:
        if self.task_type == "regression":
            return 1
        if self.task_type == "qa":
            return 2
        return len(self.label_names or [])


# ----------------------------------------------------------------------------- loading


def file_format(path: str) -> tuple[str, dict[str, Any]]:
    """``datasets`` builder name and options for a local data file."""
    ext = os.path.splitext(path)[1].lower()
    formats = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}),
               ".jsonl": ("json", {}), ".parquet": ("parquet", {})}
    if ext not in formats:
        raise KDConfigError(f"data file {path!r}: unsupported extension {ext!r}; use .csv, .tsv, .json, .jsonl or .parquet")
    return formats[ext]


def load_raw(
    task: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    validation_fraction: float = 0.1,
    seed: int = 0,
):
    """A ``DatasetDict`` with ``train`` and ``validation`` splits.

    ``task`` names a GLUE task (fetched by ``datasets`` from the hub ``nyu-mll/glue``); otherwise
    ``train_file`` (and optionally ``validation_file``; without it ``validation_fraction`` of the
    training file is held out with ``seed``) are read locally.
    """
    import datasets

    if task:
        if task not in GLUE_TASKS:
            raise KDConfigError(suggest(task, GLUE_TASKS, "GLUE task") + " Or give --train-file with local data.")
        try:
            raw = datasets.load_dataset("nyu-mll/glue", task)
        except Exception as e:  # offline, or no such dataset in the local cache
            raise KDConfigError(
                f"cannot load GLUE task {task!r} through datasets ({e.__class__.__name__}: {e}). Without network "
                "access, give local files with --train-file/--validation-file."
            ) from None
        return datasets.DatasetDict(train=raw["train"], validation=raw[GLUE_TASKS[task].validation])
    if not train_file:
        raise KDConfigError("no data: give --task (a GLUE task) or --train-file (csv/tsv/json/jsonl/parquet)")
    files = {"train": train_file}
    if validation_file:
        files["validation"] = validation_file
    flags = {"train": "--train-file", "validation": "--validation-file"}
    for split, path in files.items():
        if not os.path.isfile(path):
            raise KDConfigError(f"{flags[split]} {path!r} does not exist", hint="check the path")
        if os.path.getsize(path) == 0:
            raise KDConfigError(f"{flags[split]} {path!r} is empty", hint="give a file with a header and examples")
    builder, options = file_format(train_file)
    if validation_file and file_format(validation_file)[0] != builder:
        raise KDConfigError("train and validation files must have the same format")
    try:
        raw = datasets.load_dataset(builder, data_files=files, **options)
    except Exception as e:  # noqa: BLE001 -- unparsable rows, a header only, mixed types: the file is at fault
        raise KDConfigError(f"cannot read the data files {', '.join(repr(p) for p in files.values())} as {builder} "
                            f"({type(e).__name__}: {' '.join(str(e).split())[:300]})",
                            hint="check that every file is valid " + builder + " with the same columns") from None
    for split, data in raw.items():
        if len(data) == 0:
            raise KDConfigError(f"{flags.get(split, split)} {files.get(split)!r} has no examples",
                                hint="give a file with at least one example per class")
    if "validation" not in raw:
        if len(raw["train"]) < 2:
            raise KDConfigError(f"--train-file {train_file!r} has {len(raw['train'])} example: too few to hold out a "
                                "validation split", hint="give more examples, or a --validation-file")
        parts = raw["train"].train_test_split(test_size=validation_fraction, seed=seed)
        raw = datasets.DatasetDict(train=parts["train"], validation=parts["test"])
    return raw


def task_spec(
    raw,
    task_type: str = "classification",
    task: str | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
) -> TaskSpec:
    """Describe the task from the arguments and the data (label names are read from the data)."""
    if task:
        glue = GLUE_TASKS[task]
        spec = TaskSpec(
            task_type="regression" if glue.num_labels == 1 else "classification",
            text_column=glue.text,
            text_pair_column=glue.pair,
            label_column="label",
            metric=glue.metric,
            glue_task=task,
            labels_are_ids=True,
        )
        if glue.num_labels > 1:
            feature = raw["train"].features["label"]
            spec.label_names = list(getattr(feature, "names", None) or range(glue.num_labels))
            spec.label_names = [str(n) for n in spec.label_names]
        return spec
    if task_type not in TASK_TYPES:
        raise KDConfigError(suggest(task_type, TASK_TYPES, "task type"))
    defaults = {"token": ("tokens", "ner_tags"), "qa": ("question", "answers")}
    text_default, label_default = defaults.get(task_type, ("sentence", "label"))
    spec = TaskSpec(
        task_type=task_type,
        text_column=text_column or text_default,
        text_pair_column=text_pair_column or ("context" if task_type == "qa" else None),
        label_column=label_column or label_default,
        metric=DEFAULT_METRIC[task_type],
    )
    columns = raw["train"].column_names
    for col in (spec.text_column, spec.text_pair_column, spec.label_column):
        if col and col not in columns:
            raise KDConfigError(f"the training data has no column {col!r}; " + suggest(col, columns, "column"))
    if task_type in ("classification", "multilabel", "token"):
        spec.label_names = collect_label_names(raw, spec)
        if task_type == "classification" and len(spec.label_names) < 2:
            raise KDConfigError(f"label column {spec.label_column!r} holds {len(spec.label_names)} distinct label(s) "
                                f"({spec.label_names}); classification needs at least 2",
                                hint="check --label-column and the data, or use --task-type regression")
    return spec


def _label_values(value: Any, task_type: str) -> list:
    if task_type == "classification":
        return [value]
    if isinstance(value, str):
        return [v.strip() for v in value.split(";") if v.strip()]
    return list(value)


def collect_label_names(raw, spec: TaskSpec) -> list[str]:
    """Sorted class names found in all splits (ids ``0..max`` when the labels are integers)."""
    values = set()
    for split in raw.values():
        for value in split[spec.label_column]:
            values.update(_label_values(value, spec.task_type))
    if values and all(isinstance(v, int) or (isinstance(v, float) and v.is_integer()) for v in values):
        top = int(max(values))
        if min(values) < 0:
            raise KDConfigError(f"label column {spec.label_column!r} has negative ids; use 0..N-1 or names")
        return [str(i) for i in range(top + 1)]
    return sorted(str(v) for v in values)


# ----------------------------------------------------------------------------- tokenisation


def label_ids(value: Any, spec: TaskSpec) -> Any:
    """The label of one example as the model's ``labels`` (int, float, multi-hot, or tag ids)."""
    if spec.task_type == "regression":
        return float(value)
    index = {name: i for i, name in enumerate(spec.label_names or [])}

    def one(v: Any) -> int:
        if spec.labels_are_ids:
            if not 0 <= int(v) < len(index):
                raise KDConfigError(f"label id {v!r} is outside 0..{len(index) - 1}")
            return int(v)
        key = str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
        if key not in index:
            raise KDConfigError(f"label {v!r} is not one of the task's labels {list(index)[:10]}")
        return index[key]

    if spec.task_type == "classification":
        return one(value)
    if spec.task_type == "multilabel":
        hot = [0.0] * len(index)
        for v in _label_values(value, spec.task_type):
            hot[one(v)] = 1.0
        return hot
    return [one(v) for v in value]  # token tags


def _encode_classification(batch, tokenizer, spec: TaskSpec, max_length: int) -> dict:
    pair = batch[spec.text_pair_column] if spec.text_pair_column else None
    enc = tokenizer(batch[spec.text_column], pair, truncation=True, max_length=max_length)
    if spec.label_column in batch:
        enc["labels"] = [label_ids(v, spec) for v in batch[spec.label_column]]
    return dict(enc)


def _encode_tokens(batch, tokenizer, spec: TaskSpec, max_length: int) -> dict:
    """Tags go on the first sub-token of each word; other sub-tokens and special tokens get -100."""
    enc = tokenizer(batch[spec.text_column], is_split_into_words=True, truncation=True, max_length=max_length)
    if spec.label_column in batch:
        all_labels = []
        for i, tags in enumerate(batch[spec.label_column]):
            tags = label_ids(tags, spec)
            previous, labels = None, []
            for word in enc.word_ids(batch_index=i):
                labels.append(-100 if word is None or word == previous else tags[word])
                previous = word
            all_labels.append(labels)
        enc["labels"] = all_labels
    return dict(enc)


DOC_STRIDE = 128  # overlap (tokens) between consecutive windows of a long context, as Hugging Face's run_qa.py


def _encode_qa(batch, tokenizer, spec: TaskSpec, max_length: int, doc_stride: int | None = None) -> dict:
    """Sliding windows over the context (Hugging Face's ``run_qa.py``): a context longer than ``max_length``
    gives several features overlapping by ``doc_stride`` tokens. Each feature's start/end token is the first
    answer's, when the answer lies wholly inside its window, else 0 ([CLS]). ``qa_example`` names the example
    and ``qa_offsets`` the character span of each context token (``[-1, -1]`` elsewhere), so that predicted
    token spans are mapped back to text (:func:`kd_tasks.nlp.report.squad_scores`)."""
    doc_stride = spec.doc_stride if doc_stride is None else doc_stride
    stride = min(DOC_STRIDE, max(max_length // 4, 1)) if doc_stride is None else int(doc_stride)
    if stride >= max_length // 2:
        raise KDConfigError(f"--doc-stride {stride} must be below half of --max-length {max_length}",
                            hint="the windows overlap by this many tokens; the question takes the rest")
    longest = max(len(q) for q in tokenizer(list(batch[spec.text_column]), add_special_tokens=False)["input_ids"])
    room = max_length - longest - tokenizer.num_special_tokens_to_add(pair=True)  # context tokens per window
    if room < 1:
        raise KDConfigError(f"a question of {longest} tokens leaves no room for the context in --max-length {max_length}",
                            hint="raise --max-length")
    stride = min(stride, room - 1)  # the tokenizer needs each window to move forward
    enc = tokenizer(
        batch[spec.text_column], batch[spec.text_pair_column], truncation="only_second",
        max_length=max_length, stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
    )
    owner = enc.pop("overflow_to_sample_mapping")
    starts, ends, kept_offsets = [], [], []
    for i, offsets in enumerate(enc.pop("offset_mapping")):
        seq = enc.sequence_ids(i)
        kept_offsets.append([list(o) if seq[j] == 1 else [-1, -1] for j, o in enumerate(offsets)])
        answers = batch[spec.label_column][owner[i]]
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        context = [j for j, s in enumerate(enc.sequence_ids(i)) if s == 1]
        start = end = 0
        if context and offsets[context[0]][0] <= start_char and offsets[context[-1]][1] >= end_char:
            start = next(j for j in context if offsets[j][1] > start_char)
            end = next(j for j in reversed(context) if offsets[j][0] < end_char)
        starts.append(start)
        ends.append(end)
    enc["start_positions"], enc["end_positions"] = starts, ends
    enc["qa_example"] = [int(batch["_qa_row"][k]) for k in owner] if "_qa_row" in batch else list(owner)
    enc["qa_offsets"] = kept_offsets
    return dict(enc)


QA_META = ("qa_example", "qa_offsets")


def qa_reference(raw_split, features, spec: TaskSpec) -> dict:
    """What SQuAD scoring needs besides the model's logits: each feature's example and token offsets, and each
    example's context and gold answer texts."""
    return {"example": list(features["qa_example"]), "offsets": list(features["qa_offsets"]),
            "context": list(raw_split[spec.text_pair_column]),
            "answers": [list(a["text"]) for a in raw_split[spec.label_column]]}


ENCODERS = {
    "classification": _encode_classification,
    "regression": _encode_classification,
    "multilabel": _encode_classification,
    "token": _encode_tokens,
    "qa": _encode_qa,
}


def tokenize(dataset, tokenizer, spec: TaskSpec, max_length: int = 128, with_index: bool = True):
    """Tokenise one split for ``spec``; keeps only model inputs, labels and the ``kd_index`` column."""
    encode = ENCODERS[spec.task_type]
    if spec.task_type in ("token", "qa") and not getattr(tokenizer, "is_fast", False):
        raise KDConfigError(f"the {spec.task_type!r} task needs a fast tokenizer (word ids / offsets)")
    if spec.task_type == "qa":  # windows: one example can give several features; remember whose they are
        dataset = dataset.add_column("_qa_row", list(range(len(dataset))))
    out = dataset.map(
        lambda batch: encode(batch, tokenizer, spec, max_length),
        batched=True,
        remove_columns=dataset.column_names,
        desc="tokenizing",
    )
    if with_index:
        out = out.add_column(INDEX_COLUMN, list(range(len(out))))
    return out


def add_teacher_inputs(tokenized, dataset, teacher_tokenizer, spec: TaskSpec, max_length: int = 128):
    """Add ``teacher_input_ids`` etc.: the same texts in the teacher's tokenisation (sequence tasks only)."""
    if spec.task_type not in ("classification", "regression", "multilabel"):
        raise KDConfigError(
            f"separate teacher inputs work for sequence-level tasks only; {spec.task_type!r} labels tokens, which "
            "two tokenizers split differently. Use one tokenizer for both models."
        )
    pair = list(dataset[spec.text_pair_column]) if spec.text_pair_column else None
    enc = teacher_tokenizer(list(dataset[spec.text_column]), pair, truncation=True, max_length=max_length)
    for key, values in enc.items():
        tokenized = tokenized.add_column(TEACHER_PREFIX + key, values)
    return tokenized


# ----------------------------------------------------------------------------- tokenizer check


class TokenizerMismatchError(KDConfigError):
    """Teacher and student tokenizers split text differently."""


PROBE_TEXT = "Hello, World! The naïve café's rock-'n'-roll costs $3.50 — 12,345 tokens?"


def tokenizer_differences(teacher_tok, student_tok) -> list[str]:
    """Reasons the two tokenizers differ (empty when they read text identically)."""
    reasons = []
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab != s_vocab:
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        moved = sum(1 for k in set(t_vocab) & set(s_vocab) if t_vocab[k] != s_vocab[k])
        reasons.append(
            f"vocabularies differ (teacher {len(t_vocab)} tokens, student {len(s_vocab)}; only in teacher e.g. "
            f"{only_t}, only in student e.g. {only_s}, {moved} shared tokens with different ids)"
        )
    for name in ("cls_token_id", "sep_token_id", "pad_token_id", "unk_token_id", "mask_token_id"):
        a, b = getattr(teacher_tok, name, None), getattr(student_tok, name, None)
        if a != b:
            reasons.append(f"{name} differs (teacher {a}, student {b})")
    a, b = teacher_tok(PROBE_TEXT)["input_ids"], student_tok(PROBE_TEXT)["input_ids"]
    if a != b:
        reasons.append(f"they split the probe text {PROBE_TEXT!r} differently ({len(a)} vs {len(b)} tokens)")
    return reasons


def check_tokenizers(teacher_tok, student_tok, separate_teacher_inputs: bool = False) -> list[str]:
    """Raise :class:`TokenizerMismatchError` unless the tokenizers match or the user chose separate inputs.

    Returns the differences (empty if none) so a caller using separate inputs can report them.
    """
    reasons = tokenizer_differences(teacher_tok, student_tok)
    if reasons and not separate_teacher_inputs:
        raise TokenizerMismatchError(
            "the teacher and student tokenizers differ: " + "; ".join(reasons) + ". Token-level and intermediate "
            "distillation need both models to read the same tokens. Give the student the teacher's tokenizer, "
            "or pass --teacher-inputs separate to tokenise each example twice and distil the sequence-level "
            "logits only."
        )
    return reasons


# ----------------------------------------------------------------------------- batching


class KDCollator:
    """Pads student inputs with the student's collator and ``teacher_*`` inputs with the teacher's tokenizer."""

    def __init__(self, tokenizer, task_type: str = "classification", teacher_tokenizer=None):
        from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

        self.base = (
            DataCollatorForTokenClassification(tokenizer)
            if task_type == "token"
            else DataCollatorWithPadding(tokenizer)
        )
        self.teacher_tokenizer = teacher_tokenizer

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict:
        student = [{k: v for k, v in f.items() if not k.startswith(TEACHER_PREFIX)} for f in features]
        teacher = [{k[len(TEACHER_PREFIX):]: v for k, v in f.items() if k.startswith(TEACHER_PREFIX)} for f in features]
        batch = dict(self.base(student))
        if teacher and teacher[0]:
            if self.teacher_tokenizer is None:
                raise KDConfigError("the data has teacher inputs but the collator was given no teacher tokenizer")
            padded = self.teacher_tokenizer.pad(teacher, return_tensors="pt")
            batch.update({TEACHER_PREFIX + k: v for k, v in padded.items()})
        return batch
