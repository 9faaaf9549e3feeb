"""Task metrics and the teacher-vs-student report (parameters, size on disk, CPU latency, metric kept).

Metrics follow GLUE's definitions (Wang et al. 2019): accuracy; F1 of the positive class for
binary tasks (MRPC, QQP); Matthews correlation (CoLA); Pearson and Spearman correlations (STS-B).
They are computed with scikit-learn and scipy. Token classification is scored by entity-level F1
(:func:`entity_scores`, conlleval's / seqeval's default chunking; the headline ``f1``), token accuracy and
the token-level micro F1 over the non-``O`` tags (``token_f1``); extractive QA by SQuAD v1.1 exact match and
F1 on the answer text (the best span over every sliding window of the context; :func:`squad_scores`), and by
the predicted start/end token span of each window (``span_exact``, ``span_f1``).
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn


def _classification(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    pred = logits.argmax(-1)
    binary = logits.shape[-1] == 2
    return {
        "accuracy": float(accuracy_score(labels, pred)),
        "f1": float(f1_score(labels, pred, average="binary" if binary else "macro", zero_division=0)),
        "matthews_correlation": float(matthews_corrcoef(labels, pred)),
    }


def _regression(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    pred, labels = pred.reshape(-1), labels.reshape(-1)
    if np.std(pred) == 0 or np.std(labels) == 0:  # correlation undefined: a constant prediction
        return {"pearson": 0.0, "spearmanr": 0.0, "mse": float(np.mean((pred - labels) ** 2))}
    return {
        "pearson": float(pearsonr(pred, labels)[0]),
        "spearmanr": float(spearmanr(pred, labels)[0]),
        "mse": float(np.mean((pred - labels) ** 2)),
    }


def _multilabel(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    pred = (logits > 0).astype(int)  # sigmoid(z) > 0.5
    labels = labels.astype(int)
    return {
        "f1_micro": float(f1_score(labels, pred, average="micro", zero_division=0)),
        "f1_macro": float(f1_score(labels, pred, average="macro", zero_division=0)),
        "subset_accuracy": float(accuracy_score(labels, pred)),
    }


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """``(type, start, end)`` chunks of one tag sequence, as CoNLL's conlleval and seqeval's default mode read
    them: ``B-X`` starts a chunk, ``I-X`` continues a chunk of type X (or starts one after ``O`` or another
    type), ``E-X``/``S-X`` (IOBES) end one; ``O`` is outside. A tag without a prefix (``PER``, the IO scheme)
    is read as ``I-PER``."""
    found, start, kind = set(), None, None

    def close(end):
        if start is not None:
            found.add((kind, start, end))

    for i, tag in enumerate(list(tags) + ["O"]):
        if tag == "O" or tag is None:
            close(i - 1)
            start, kind = None, None
            continue
        prefix, _, name = tag.partition("-") if tag[:2] in ("B-", "I-", "E-", "S-") else ("I", "", tag)
        if prefix in ("B", "S") or kind != name or start is None:
            close(i - 1)
            start, kind = i, name
        if prefix in ("E", "S"):
            close(i)
            start, kind = None, None
    return found


def entity_scores(true: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 (an entity counts when its type and both ends match)."""
    gold = {(n,) + e for n, seq in enumerate(true) for e in entities(seq)}
    guess = {(n,) + e for n, seq in enumerate(pred) for e in entities(seq)}
    hit = len(gold & guess)
    precision = hit / len(guess) if guess else 0.0
    recall = hit / len(gold) if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _token(logits: np.ndarray, labels: np.ndarray, label_names: list[str] | None) -> dict[str, float]:
    """Entity-level F1 on the labelled (first sub-word) tokens, as Hugging Face's NER example scores with
    seqeval; plus token accuracy and the micro token F1 over the non-``O`` tags."""
    from sklearn.metrics import f1_score

    pred = logits.argmax(-1)
    keep = labels != -100
    y, p = labels[keep], pred[keep]
    tags = [i for i, name in enumerate(label_names or []) if name != "O"] or sorted(set(y.tolist()))
    names = label_names or [str(i) for i in range(logits.shape[-1])]
    true_seqs = [[names[t] for t in row[k]] for row, k in zip(labels, keep)]
    pred_seqs = [[names[t] for t in row[k]] for row, k in zip(pred, keep)]
    ent = entity_scores(true_seqs, pred_seqs)
    return {
        "accuracy": float((y == p).mean()) if len(y) else 0.0,
        "f1": float(ent["f1"]),
        "precision": float(ent["precision"]),
        "recall": float(ent["recall"]),
        "token_f1": float(f1_score(y, p, labels=tags, average="micro", zero_division=0)),
    }


def _qa(start_logits: np.ndarray, end_logits: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> dict[str, float]:
    exact, f1 = [], []
    for s_log, e_log, gs, ge in zip(start_logits, end_logits, starts, ends):
        ps = int(s_log.argmax())
        pe = ps + int(e_log[ps:].argmax()) if ps < len(e_log) else ps  # the end is not before the start
        exact.append(float(ps == gs and pe == ge))
        overlap = max(0, min(pe, ge) - max(ps, gs) + 1)
        if overlap == 0:
            f1.append(0.0)
        else:
            precision, recall = overlap / (pe - ps + 1), overlap / (ge - gs + 1)
            f1.append(2 * precision * recall / (precision + recall))
    return {"span_exact": float(np.mean(exact)), "span_f1": float(np.mean(f1))}


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's official normalisation: lower case, no punctuation, no articles, single spaces."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, truth: str) -> float:
    from collections import Counter

    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def qa_predictions(start_logits: np.ndarray, end_logits: np.ndarray, reference: Mapping[str, Any],
                   n_best: int = 20, max_answer_tokens: int = 30) -> list[str]:
    """The best text span of each example over all its windows (``run_qa.py``'s post-processing): the highest
    ``start + end`` logit with both tokens in the context, start <= end and at most ``max_answer_tokens``."""
    best: dict[int, tuple[float, str]] = {}
    for f, (s_log, e_log) in enumerate(zip(start_logits, end_logits)):
        ex, offsets = reference["example"][f], reference["offsets"][f]
        context = reference["context"][ex]
        n = min(len(offsets), len(s_log))
        for s in np.argsort(s_log[:n])[::-1][:n_best]:
            for e in np.argsort(e_log[:n])[::-1][:n_best]:
                if offsets[s][0] < 0 or offsets[e][0] < 0 or e < s or e - s + 1 > max_answer_tokens:
                    continue
                score = float(s_log[s] + e_log[e])
                if ex not in best or score > best[ex][0]:
                    best[ex] = (score, context[offsets[s][0]:offsets[e][1]])
    return [best.get(i, (0.0, ""))[1] for i in range(len(reference["context"]))]


def squad_scores(predictions: list[str], answers: list[list[str]]) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1 (percent), each the best over the gold answers, averaged over examples."""
    em = [max(float(normalize_answer(p) == normalize_answer(g)) for g in gold) for p, gold in zip(predictions, answers)]
    f1 = [max(squad_f1(p, g) for g in gold) for p, gold in zip(predictions, answers)]
    return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1))}


def task_metrics(task_type: str, predictions: Any, labels: Any, label_names: list[str] | None = None,
                 qa_reference: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Metrics of one task from the Trainer's predictions and label ids (numpy arrays or tuples of them)."""
    if task_type == "qa":
        start_logits, end_logits = predictions
        starts, ends = labels
        out = _qa(np.asarray(start_logits), np.asarray(end_logits), np.asarray(starts), np.asarray(ends))
        if qa_reference is not None:
            texts = qa_predictions(np.asarray(start_logits), np.asarray(end_logits), qa_reference)
            out.update(squad_scores(texts, qa_reference["answers"]))
        return out
    predictions = np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions)
    labels = np.asarray(labels)
    if task_type == "classification":
        return _classification(predictions, labels)
    if task_type == "regression":
        return _regression(predictions, labels)
    if task_type == "multilabel":
        return _multilabel(predictions, labels)
    if task_type == "token":
        return _token(predictions, labels, label_names)
    raise ValueError(f"unknown task type {task_type!r}")


def metrics_fn(task_type: str, label_names: list[str] | None = None,
               qa_reference: Mapping[str, Any] | None = None) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` for ``transformers.Trainer`` (QA: with ``qa_reference``, SQuAD EM/F1 on text)."""

    def compute(eval_prediction) -> dict[str, float]:
        return task_metrics(task_type, eval_prediction.predictions, eval_prediction.label_ids, label_names,
                            qa_reference)

    return compute


# ----------------------------------------------------------------------------- size and speed


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def weights_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights saved as safetensors by ``save_pretrained`` (same format for both models)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp) if f.endswith(".safetensors"))


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, batch: Mapping[str, torch.Tensor], repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time in milliseconds of one forward of ``batch`` on the CPU, in eval mode."""
    cpu_model = copy.deepcopy(model).to("cpu").eval()
    inputs = {k: v.to("cpu") for k, v in batch.items()}
    for _ in range(warmup):
        cpu_model(**inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        cpu_model(**inputs)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def model_stats(model: nn.Module, batch: Mapping[str, torch.Tensor], metrics: Mapping[str, float], repeats: int = 10) -> dict:
    """Parameters, weight bytes, CPU latency per batch and task metrics of one model."""
    return {
        "parameters": count_parameters(model),
        "size_bytes": weights_size_bytes(model),
        "cpu_latency_ms_per_batch": round(cpu_latency_ms(model, batch, repeats=repeats), 3),
        "latency_batch_size": int(next(iter(batch.values())).shape[0]),
        "cpu_threads": torch.get_num_threads(),
        "metrics": {k: round(float(v), 6) for k, v in metrics.items()},
    }


def build_report(teacher: Mapping[str, Any], student: Mapping[str, Any], main_metric: str) -> dict:
    """Side-by-side stats and the ratios: compression, speed-up, % of the teacher's metric retained."""
    t_metric = teacher["metrics"].get(main_metric)
    s_metric = student["metrics"].get(main_metric)
    retained = None
    if t_metric not in (None, 0) and s_metric is not None:
        retained = round(100.0 * s_metric / t_metric, 2)
    return {
        "main_metric": main_metric,
        "teacher": dict(teacher),
        "student": dict(student),
        "parameter_ratio": round(student["parameters"] / teacher["parameters"], 4),
        "size_ratio": round(student["size_bytes"] / teacher["size_bytes"], 4),
        "speedup": round(teacher["cpu_latency_ms_per_batch"] / max(student["cpu_latency_ms_per_batch"], 1e-9), 3),
        "metric_retained_percent": retained,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a Markdown table."""
    t, s, m = report["teacher"], report["student"], report["main_metric"]

    def metric(stats):
        value = stats["metrics"].get(m)
        return "n/a" if value is None else f"{value:.4f}"

    rows = [
        ("parameters", f"{t['parameters']:,}", f"{s['parameters']:,}", f"{report['parameter_ratio']:.3f}x"),
        ("size on disk (MB)", f"{t['size_bytes'] / 1e6:.2f}", f"{s['size_bytes'] / 1e6:.2f}", f"{report['size_ratio']:.3f}x"),
        (
            f"CPU latency / batch of {s['latency_batch_size']} (ms, {s['cpu_threads']} threads)",
            f"{t['cpu_latency_ms_per_batch']:.1f}",
            f"{s['cpu_latency_ms_per_batch']:.1f}",
            f"{report['speedup']:.2f}x faster",
        ),
        (m, metric(t), metric(s), f"{report['metric_retained_percent']}% retained"),
    ]
    lines = ["| | teacher | student | student / teacher |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def write_model_card(directory: str, report: Mapping[str, Any]) -> str:
    """``README.md`` in the student directory: teacher, data, recipe, metric, size and latency."""
    recipe = report.get("recipe", {})
    t, s, m = report["teacher"], report["student"], report["main_metric"]
    transfer = recipe.get("transfer_data") or {}
    stages = recipe.get("stages") or []
    lines = [
        "---", "library_name: transformers", "tags: [knowledge-distillation, kd-tasks]", "---", "",
        "# Distilled student", "",
        f"Distilled with kd-tasks from the teacher `{recipe.get('teacher')}` on the task `{report.get('task')}`.",
        f"Student: {recipe.get('student_source')}"
        + (f" (teacher layers {recipe.get('kept_teacher_layers')})" if recipe.get("kept_teacher_layers") else "") + ".",
        "",
        "Load it with `AutoModelForSequenceClassification.from_pretrained(this_directory)` (or the Auto class of its "
        "head) and the tokenizer saved beside it.", "",
        "## Recipe", "",
    ]
    for st in stages:
        lines.append(f"- stage `{st['name']}`: " + ", ".join(f"{k}={v}" for k, v in st.items()
                                                              if k not in ("name", "output_dir") and v not in (None, 0, 0.0)))
    if transfer:
        lines.append(f"- transfer data: {transfer.get('unlabeled')} unlabelled and {transfer.get('augmented')} augmented "
                     f"texts for {transfer.get('labelled')} labelled ones (teacher's soft labels only)")
    lines.append(f"- seed {recipe.get('seed')}, max length {recipe.get('max_length')}, batch {recipe.get('batch_size')}")
    lines += ["", "## Evaluation (validation split)", "", format_report(report), "",
              f"Main metric: `{m}`; {report.get('metric_retained_percent')} % of the teacher's.",
              f"Parameters {s['parameters']:,} (teacher {t['parameters']:,}).", ""]
    path = os.path.join(directory, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
