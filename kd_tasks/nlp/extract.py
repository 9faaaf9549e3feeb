"""Building the student: load one, cut one out of the teacher, or make a narrower one from scratch.

* :func:`load_model` loads a teacher or student (local directory or hub name) with a task head.
* :func:`extract_student` is DistilBERT's initialisation (Sanh et al. 2019): a model of the teacher's
  class with fewer layers, whose embeddings, kept layers and head are exact copies of the teacher's.
* :func:`narrow_student` builds a smaller config (TinyBERT / MiniLM shapes, or any overrides) with
  random weights; it learns from the teacher through the distillation terms alone.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any, Mapping, Sequence

from torch import nn

from ..shared.errors import KDConfigError, suggest
from .layer_map import evenly_spaced_layers

QKV_NAMES = (  # (query, key, value) projections inside one transformer layer, per model family
    ("attention.self.query", "attention.self.key", "attention.self.value"),  # BERT, RoBERTa, ELECTRA
    ("attention.q_lin", "attention.k_lin", "attention.v_lin"),  # DistilBERT
)

# Student shapes from the papers (width, depth, heads, feed-forward width).
STUDENT_SHAPES: dict[str, dict[str, int]] = {
    # TinyBERT-4 (Jiao et al. 2020): 4 layers, d=312, 12 heads, d_i=1200
    "tinybert-4l-312": dict(num_hidden_layers=4, hidden_size=312, num_attention_heads=12, intermediate_size=1200),
    # TinyBERT-6 has BERT-base's width: 6 layers, d=768
    "tinybert-6l-768": dict(num_hidden_layers=6, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    # MiniLM (Wang et al. 2020) students: 6 and 3 layers of d=384, 12 heads
    "minilm-6l-384": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
    "minilm-3l-384": dict(num_hidden_layers=3, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
    # half-width MiniLM-style student
    "minilm-4l-256": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, intermediate_size=1024),
}


def auto_class(head: str):
    """The ``transformers`` Auto class for a task head."""
    import transformers

    classes = {
        "classification": transformers.AutoModelForSequenceClassification,
        "regression": transformers.AutoModelForSequenceClassification,
        "multilabel": transformers.AutoModelForSequenceClassification,
        "token": transformers.AutoModelForTokenClassification,
        "qa": transformers.AutoModelForQuestionAnswering,
    }
    if head not in classes:
        raise KDConfigError(suggest(head, classes, "task type"))
    return classes[head]


def looks_like_path(name: str) -> bool:
    """True for strings that can only be a filesystem path, never a hub id (``name`` or ``org/name``)."""
    return name.startswith((".", "/", "~")) or name.endswith("/") or "\\" in name or name.count("/") > 1


def resolve_model_source(name_or_path: str, what: str) -> str:
    """Return a local directory, or a hub id; a missing local path raises an error that names it."""
    expanded = os.path.expanduser(str(name_or_path))
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise KDConfigError(f"{what} {name_or_path!r} is a file; give the model's directory (with config.json)")
    if looks_like_path(str(name_or_path)):
        raise KDConfigError(f"{what} path {name_or_path!r} does not exist (looked for directory {os.path.abspath(expanded)})")
    return str(name_or_path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


def load_tokenizer(name_or_path: str, what: str = "model", required: bool = True):
    """The tokenizer of a local directory or hub model; ``None`` for a directory without one when not ``required``."""
    from transformers import AutoTokenizer

    source = resolve_model_source(name_or_path, what)
    if os.path.isdir(source) and not any(os.path.isfile(os.path.join(source, f)) for f in TOKENIZER_FILES):
        if not required:
            return None
        raise KDConfigError(f"{what} {name_or_path!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise KDConfigError(f"cannot load the tokenizer of {what} {name_or_path!r}: {str(e).splitlines()[0]}") from None


def load_model(name_or_path: str, head: str, what: str = "model", **config_overrides: Any) -> nn.Module:
    """Load ``name_or_path`` with the head for ``head``; refuses a teacher whose head would be random.

    ``config_overrides`` (e.g. ``num_labels``, ``problem_type``) are passed to ``from_pretrained``.
    A hub id that cannot be fetched (offline) raises :class:`KDConfigError` naming it.
    """
    source = resolve_model_source(name_or_path, what)
    try:
        model, info = auto_class(head).from_pretrained(source, output_loading_info=True, **config_overrides)
    except (OSError, ValueError) as e:
        raise KDConfigError(
            f"cannot load {what} {name_or_path!r}: it is not a local directory and could not be fetched from the "
            f"hub ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}). Give a local path, or set "
            "HF_HUB_OFFLINE=0 with network access."
        ) from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if what == "teacher" and missing:
        raise KDConfigError(
            f"teacher {name_or_path!r} has no trained weights for {', '.join(sorted(missing)[:4])}"
            f"{' ...' if len(missing) > 4 else ''}: its {head} head would be random. Fine-tune the teacher on the "
            "task first (a plain transformers Trainer run) and pass that directory."
        )
    return model


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted name and module of the model's list of transformer layers.

    The list is the ``nn.ModuleList`` whose length is ``config.num_hidden_layers`` (BERT and RoBERTa:
    ``<base>.encoder.layer``; DistilBERT: ``distilbert.transformer.layer``).
    """
    depth = int(model.config.num_hidden_layers)
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == depth and name.split(".")[-1] in ("layer", "layers")
    ]
    if len(found) != 1:
        raise KDConfigError(
            f"cannot find the transformer layers of {type(model).__name__}: expected one ModuleList named "
            f"'layer' or 'layers' of length {depth}, found {[n for n, _ in found] or 'none'}"
        )
    return found[0]


def qkv_modules(model: nn.Module) -> list[tuple[str, str, str]]:
    """Dotted names of the query/key/value projections of every transformer layer of ``model``."""
    name, layers = find_layer_list(model)
    first = dict(layers[0].named_modules())
    for q, k, v in QKV_NAMES:
        if q in first and k in first and v in first:
            return [tuple(f"{name}.{i}.{m}" for m in (q, k, v)) for i in range(len(layers))]
    raise KDConfigError(
        f"cannot find query/key/value projections in {type(model).__name__} (tried {QKV_NAMES}); attention and "
        "relation terms need them"
    )


def extract_student(teacher: nn.Module, layers: int | Sequence[int]) -> nn.Module:
    """A copy of ``teacher`` keeping only some of its transformer layers (DistilBERT's initialisation).

    ``layers``: a count (evenly spaced, first and last included: :func:`evenly_spaced_layers`) or
    the 0-based indices of the teacher layers to keep, in order. Every other weight (embeddings,
    pooler, task head) is copied unchanged; the student has the teacher's class and width.
    """
    name, teacher_layers = find_layer_list(teacher)
    total = len(teacher_layers)
    keep = evenly_spaced_layers(layers, total) if isinstance(layers, int) else [int(i) for i in layers]
    if not keep or any(not 0 <= i < total for i in keep):
        raise KDConfigError(f"teacher layers to keep {keep} must be between 0 and {total - 1}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    student = type(teacher)(config)
    source = teacher.state_dict()
    prefix = re.compile(rf"^{re.escape(name)}\.(\d+)\.(.*)$")
    mapped = {}
    for key in student.state_dict():
        match = prefix.match(key)
        src = f"{name}.{keep[int(match.group(1))]}.{match.group(2)}" if match else key
        mapped[key] = source[src]
    student.load_state_dict(mapped, strict=True)
    return student.to(next(teacher.parameters()).device)


def narrow_config(base_config: Any, shape: str | Mapping[str, int] | None = None, **overrides: int) -> Any:
    """A copy of ``base_config`` with a student shape (a :data:`STUDENT_SHAPES` name or a dict) applied."""
    config = copy.deepcopy(base_config)
    values: dict[str, Any] = {}
    if isinstance(shape, str):
        if shape not in STUDENT_SHAPES:
            raise KDConfigError(suggest(shape, STUDENT_SHAPES, "student shape"))
        values.update(STUDENT_SHAPES[shape])
    elif shape:
        values.update(shape)
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key, value in values.items():
        if not hasattr(config, key):
            raise KDConfigError(f"{type(config).__name__} has no option {key!r}; cannot build that student shape")
        setattr(config, key, value)
    width, heads = int(config.hidden_size), int(config.num_attention_heads)
    if width % heads:
        raise KDConfigError(f"student hidden_size {width} is not divisible by num_attention_heads {heads}")
    return config


def narrow_student(teacher: nn.Module, shape: str | Mapping[str, int] | None = None, **overrides: int) -> nn.Module:
    """A randomly initialised model of the teacher's class (same head) with a smaller shape."""
    config = narrow_config(teacher.config, shape, **overrides)
    return type(teacher)(config)


def student_from_spec(teacher: nn.Module, spec: Mapping[str, Any], head: str, tokenizer_size: int) -> nn.Module:
    """Build the student from CLI/recipe fields: ``student`` (path), ``student_layers`` /
    ``student_layer_ids`` (extraction) or ``student_shape`` (+ width overrides, from scratch)."""
    chosen = [k for k in ("student", "student_layers", "student_layer_ids", "student_shape") if spec.get(k)]
    if len(chosen) != 1:
        raise KDConfigError(
            "choose exactly one way to build the student: --student PATH, --student-layers N, "
            f"--student-layer-ids 0,5,11 or --student-shape NAME (got {chosen or 'none'})"
        )
    kind = chosen[0]
    if kind == "student":
        overrides = {k: getattr(teacher.config, k) for k in ("num_labels", "problem_type", "id2label", "label2id")}
        model = load_model(spec["student"], head, "student", **overrides)
    elif kind == "student_layers":
        model = extract_student(teacher, int(spec["student_layers"]))
    elif kind == "student_layer_ids":
        ids = spec["student_layer_ids"]
        ids = [int(x) for x in ids.split(",")] if isinstance(ids, str) else list(ids)
        model = extract_student(teacher, ids)
    else:
        model = narrow_student(
            teacher,
            spec["student_shape"],
            hidden_size=spec.get("student_hidden_size"),
            num_attention_heads=spec.get("student_heads"),
            intermediate_size=spec.get("student_intermediate_size"),
        )
    if tokenizer_size > model.config.vocab_size:
        raise KDConfigError(
            f"the student's embedding has {model.config.vocab_size} rows but its tokenizer has {tokenizer_size} "
            "tokens; give a student built for this tokenizer"
        )
    return model
