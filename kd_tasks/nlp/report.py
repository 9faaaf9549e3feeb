"""Task metrics and the teacher-vs-student report (parameters, size on disk, CPU latency, metric kept).

Metrics follow GLUE's definitions (Wang et al. 2019): accuracy; F1 of the positive class for
binary tasks (MRPC, QQP); Matthews correlation (CoLA); Pearson and Spearman correlations (STS-B).
They are computed with scikit-learn and scipy. Token classification is scored per labelled token
(accuracy, and micro F1 over the tags other than ``O``); extractive QA by the predicted start/end
token span (exact match and token-overlap F1 against the gold span).
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


def _token(logits: np.ndarray, labels: np.ndarray, label_names: list[str] | None) -> dict[str, float]:
    from sklearn.metrics import f1_score

    pred = logits.argmax(-1)
    keep = labels != -100
    y, p = labels[keep], pred[keep]
    tags = [i for i, name in enumerate(label_names or []) if name != "O"] or sorted(set(y.tolist()))
    return {
        "accuracy": float((y == p).mean()) if len(y) else 0.0,
        "f1": float(f1_score(y, p, labels=tags, average="micro", zero_division=0)),
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


def task_metrics(task_type: str, predictions: Any, labels: Any, label_names: list[str] | None = None) -> dict[str, float]:
    """Metrics of one task from the Trainer's predictions and label ids (numpy arrays or tuples of them)."""
    if task_type == "qa":
        start_logits, end_logits = predictions
        starts, ends = labels
        return _qa(np.asarray(start_logits), np.asarray(end_logits), np.asarray(starts), np.asarray(ends))
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


def metrics_fn(task_type: str, label_names: list[str] | None = None) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` for ``transformers.Trainer``."""

    def compute(eval_prediction) -> dict[str, float]:
        return task_metrics(task_type, eval_prediction.predictions, eval_prediction.label_ids, label_names)

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
