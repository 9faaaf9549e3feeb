"""Task metrics, and the NLP view of the shared compression report (teacher, student, optionally an int8 student).

Metrics follow GLUE's definitions (Wang et al. 2019): accuracy; F1 of the positive class for
binary tasks (MRPC, QQP); Matthews correlation (CoLA); Pearson and Spearman correlations (STS-B).
They are computed with scikit-learn and scipy. Token classification is scored by entity-level F1
(:func:`entity_scores`, conlleval's / seqeval's default chunking; the headline ``f1``), token accuracy and
the token-level micro F1 over the non-``O`` tags (``token_f1``); extractive QA by SQuAD v1.1 exact match and
F1 on the answer text (the best span over every sliding window of the context; :func:`squad_scores`), and by
the predicted start/end token span of each window (``span_exact``, ``span_f1``).

Sizes, FLOPs, latencies and memory are measured by :mod:`kd_tasks.shared.report`, the one implementation every
task uses: :func:`compression_report` runs it on the CPU for the teacher, the student and (``--quantize``) an int8
dynamically quantised copy of the student, and turns its rows into ``kd_report.json`` (:func:`build_report`,
:func:`format_report`, :func:`write_model_card`).
"""

from __future__ import annotations

import copy
import os
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


# ----------------------------------------------------------------------------- evaluation of extra models


@torch.inference_mode()
def evaluate_model(model: nn.Module, dataset, collator, task_type: str, label_names: list[str] | None = None,
                   qa_reference: Mapping[str, Any] | None = None, batch_size: int = 64) -> dict[str, float]:
    """Task metrics (:func:`task_metrics`) of ``model`` on a tokenised ``dataset``, in eval mode on the CPU (a CPU
    copy of a model elsewhere), in this process alone: no ``Trainer``, since a dynamically quantised model runs
    on the CPU only and under ``torchrun`` only the main process gets here. Batches of ``batch_size`` come from
    ``collator`` in dataset order; per-token predictions and labels (token classification, QA) are padded with
    -100 along the sequence to the longest batch before they are joined, as the ``Trainer`` joins them. The
    model is given the batch entries its ``forward`` takes."""
    import inspect

    model = on_cpu(model)
    accepted = set(inspect.signature(model.forward).parameters)
    qa = task_type == "qa"
    preds: list[list[np.ndarray]] = []
    labels: list[list[np.ndarray]] = []
    was = model.training
    model.eval()
    try:
        for first in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(first, min(first + batch_size, len(dataset)))])
            inputs = {k: v.cpu() for k, v in batch.items()
                      if k in accepted and k not in ("labels", "start_positions", "end_positions")}
            out = model(**inputs)
            if qa:
                preds.append([out.start_logits.float().numpy(), out.end_logits.float().numpy()])
                labels.append([batch["start_positions"].numpy(), batch["end_positions"].numpy()])
            else:
                preds.append([out.logits.float().numpy()])
                labels.append([batch["labels"].numpy()])
    finally:
        model.train(was)

    def join(parts: list[np.ndarray]) -> np.ndarray:
        if parts[0].ndim >= 2 and (qa or task_type == "token"):  # (batch, sequence, ...): pad the sequence
            longest = max(p.shape[1] for p in parts)
            parts = [np.pad(p, [(0, 0), (0, longest - p.shape[1])] + [(0, 0)] * (p.ndim - 2), constant_values=-100)
                     for p in parts]
        return np.concatenate(parts)

    p = [join([b[i] for b in preds]) for i in range(len(preds[0]))]
    y = [join([b[i] for b in labels]) for i in range(len(labels[0]))]
    return task_metrics(task_type, tuple(p) if qa else p[0], tuple(y) if qa else y[0], label_names, qa_reference)


# ----------------------------------------------------------------------------- the compression report

PERCENT_METRICS = {"qa": ("exact_match", "f1")}  # SQuAD scores are percentages; every other metric is a fraction


def metric_fraction(task_type: str, name: str, value: float | None) -> float:
    """A metric on the shared report's scale (a fraction: 0.85 is shown as 85 %); ``nan`` when it is missing."""
    if value is None:
        return float("nan")
    return float(value) / 100.0 if name in PERCENT_METRICS.get(task_type, ()) else float(value)


def on_cpu(model: nn.Module) -> nn.Module:
    """``model`` itself when its weights are on the CPU, else a CPU copy (the caller's model stays where it is)."""
    if all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()]):
        return model
    return copy.deepcopy(model).to("cpu")


def cpu_latency_ms(model: nn.Module, batch: Mapping[str, torch.Tensor], repeats: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of one forward of ``batch`` on the CPU in eval mode (a CPU copy of a model elsewhere),
    timed by :func:`kd_tasks.shared.report.time_forward`."""
    from ..shared.report import time_forward

    cpu_model = on_cpu(model)
    was = cpu_model.training
    cpu_model.eval()
    try:
        return 1000.0 * time_forward(cpu_model, {k: v.to("cpu") for k, v in batch.items()}, warmup=warmup,
                                     repeats=repeats)
    finally:
        cpu_model.train(was)


def model_stats(row: Mapping[str, Any], metrics: Mapping[str, float], batch_size: int, threads: int) -> dict:
    """One model's entry of ``kd_report.json`` from its row of the shared report
    (:func:`kd_tasks.shared.report.build_report`, measured on the CPU): parameters, bytes of its saved
    ``state_dict``, FLOPs per input (torch's flop counter), batch-1 latency, the time of one batch of
    ``batch_size`` (``batch_size`` / measured throughput), peak forward memory, and its task metrics."""
    return {
        "parameters": int(row["params"]),
        "size_bytes": int(row["size_bytes"]),
        "flops_per_input": float(row["flops"]),
        "latency_ms_batch1": round(float(row["latency_ms"]), 4),
        "cpu_latency_ms_per_batch": round(1000.0 * batch_size / float(row["throughput"]), 4),
        "latency_batch_size": int(batch_size),
        "throughput_per_s": round(float(row["throughput"]), 2),
        "peak_bytes": int(row["peak_bytes"]),
        "cpu_threads": int(threads),
        "metrics": {k: round(float(v), 6) for k, v in metrics.items()},
    }


def compression_report(teacher: nn.Module, student: nn.Module, teacher_metrics: Mapping[str, float],
                       student_metrics: Mapping[str, float], *, main_metric: str, task_type: str,
                       example: Mapping[str, torch.Tensor], teacher_example: Mapping[str, torch.Tensor] | None = None,
                       quantized: nn.Module | None = None, quantized_metrics: Mapping[str, float] | None = None,
                       batch_size: int = 32, warmup: int = 5, repeats: int = 30):
    """The shared compression report (:func:`kd_tasks.shared.report.build_report`) of the teacher, the student
    and optionally an int8 copy of it, plus the ``kd_report.json`` dict built from the same measurements.

    Every model is measured on the CPU (a CPU copy of a model trained elsewhere), with the current torch thread
    count, on ``example``: a tokenised validation batch of ``batch_size`` rows (keyword inputs; the teacher on
    ``teacher_example`` when it reads its own tokenizer's ids). The metrics are not recomputed: each row takes
    ``main_metric`` from the metrics given (the validation evaluations of the run). Returns ``(report, kd_report)``.
    """
    from ..shared.report import ModelEntry, build_report as shared_report

    def value(metrics):
        return metric_fraction(task_type, main_metric, metrics.get(main_metric))

    entries = [ModelEntry("teacher", on_cpu(teacher), "teacher", metric=value(teacher_metrics),
                          example=teacher_example),
               ModelEntry("student", on_cpu(student), "student", metric=value(student_metrics))]
    if quantized is not None:
        entries.append(ModelEntry("student int8", quantized, "quantized", metric=value(quantized_metrics or {}),
                                  flops_from="student", note="torch.ao dynamic int8 (Linear layers)"))
    notes = [f"All models measured on the CPU on {batch_size} tokenised validation rows (batch-1 latency: the first "
             f"row); {main_metric} on the validation split."]
    if quantized is not None:
        notes.append("student int8: the saved student with torch.ao dynamic int8 quantisation of its Linear layers, "
                     "evaluated on the validation split on the CPU; FLOPs are the float student's (torch's counter "
                     "does not count quantised kernels).")
    rep = shared_report(entries, example, metric_name=main_metric, batch_size=batch_size, warmup=warmup,
                        repeats=repeats, notes=notes)
    rows = {r["name"]: r for r in rep.rows}
    kd = build_report(model_stats(rows["teacher"], teacher_metrics, batch_size, rep.threads),
                      model_stats(rows["student"], student_metrics, batch_size, rep.threads), main_metric,
                      quantized=(model_stats(rows["student int8"], quantized_metrics or {}, batch_size, rep.threads)
                                 if quantized is not None else None))
    return rep, kd


def _retained(metric: float | None, reference: float | None) -> float | None:
    return round(100.0 * metric / reference, 2) if reference not in (None, 0) and metric is not None else None


def build_report(teacher: Mapping[str, Any], student: Mapping[str, Any], main_metric: str,
                 quantized: Mapping[str, Any] | None = None) -> dict:
    """Side-by-side stats (:func:`model_stats`) and the ratios: compression, speed-up (teacher time / student time
    for a batch of ``latency_batch_size``; ``speedup_batch1`` at batch 1), % of the teacher's metric retained.
    ``quantized`` (the int8 student) goes under ``"quantized"`` with its metric, speed-ups and % retained."""
    t_metric = teacher["metrics"].get(main_metric)

    def speedup(m, key="cpu_latency_ms_per_batch"):
        return round(teacher[key] / max(m[key], 1e-9), 3)

    report = {
        "main_metric": main_metric,
        "teacher": dict(teacher),
        "student": dict(student),
        "parameter_ratio": round(student["parameters"] / teacher["parameters"], 4),
        "size_ratio": round(student["size_bytes"] / teacher["size_bytes"], 4),
        "speedup": speedup(student),
        "speedup_batch1": speedup(student, "latency_ms_batch1"),
        "metric_retained_percent": _retained(student["metrics"].get(main_metric), t_metric),
    }
    if quantized is not None:
        metric = quantized["metrics"].get(main_metric)
        report["quantized"] = {
            **dict(quantized), "method": "torch.ao.quantization.quantize_dynamic, qint8 weights of Linear layers",
            "metric": metric, "speedup_vs_teacher": speedup(quantized),
            "speedup_vs_teacher_batch1": speedup(quantized, "latency_ms_batch1"),
            "size_ratio": round(quantized["size_bytes"] / teacher["size_bytes"], 4),
            "metric_retained_percent": _retained(metric, t_metric),
        }
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a Markdown table (teacher, student and, when present, the int8 student; ratios to the teacher)."""
    t, m = report["teacher"], report["main_metric"]
    models = [("student", report["student"])]
    if report.get("quantized"):
        models.append(("student int8", report["quantized"]))

    def metric(stats):
        return _fmt(stats["metrics"].get(m))

    def ratio(a, b, fmt="{:.3f}x"):
        return fmt.format(a / b) if b else "n/a"

    n, threads = t["latency_batch_size"], t["cpu_threads"]
    rows = [
        ("parameters", lambda s: f"{s['parameters']:,}", lambda s: ratio(s["parameters"], t["parameters"])),
        ("size on disk (MB)", lambda s: f"{s['size_bytes'] / 1e6:.2f}",
         lambda s: ratio(s["size_bytes"], t["size_bytes"])),
        ("MFLOPs / input", lambda s: f"{s['flops_per_input'] / 1e6:.2f}",
         lambda s: ratio(s["flops_per_input"], t["flops_per_input"])),
        (f"CPU latency, batch 1 (ms, {threads} threads)", lambda s: f"{s['latency_ms_batch1']:.2f}",
         lambda s: ratio(t["latency_ms_batch1"], s["latency_ms_batch1"], "{:.2f}x faster")),
        (f"CPU time / batch of {n} (ms, {threads} threads)", lambda s: f"{s['cpu_latency_ms_per_batch']:.1f}",
         lambda s: ratio(t["cpu_latency_ms_per_batch"], s["cpu_latency_ms_per_batch"], "{:.2f}x faster")),
        ("peak forward memory (MB)", lambda s: f"{s['peak_bytes'] / 1e6:.2f}",
         lambda s: ratio(s["peak_bytes"], t["peak_bytes"])),
        (m, metric, lambda s: f"{_retained(s['metrics'].get(m), t['metrics'].get(m))}% retained"),
    ]
    head = ["", "teacher"] + [x for name, _ in models for x in (name, f"{name} / teacher")]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, cell, rel in rows:
        lines.append("| " + " | ".join([label, cell(t)] + [x for _, s in models for x in (cell(s), rel(s))]) + " |")
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
              f"Parameters {s['parameters']:,} (teacher {t['parameters']:,}). Sizes are bytes of the saved "
              f"`state_dict`; times are medians of repeated forward passes on the CPU with {t['cpu_threads']} "
              f"thread(s) (`report.md`, `report.json`, `report.png`: the full compression report)."]
    q = report.get("quantized")
    if q:
        lines += ["", "## int8 (dynamic quantisation)", "",
                  f"`kd_tasks.shared.export.quantize_dynamic_int8(model)` (torch.ao dynamic quantisation, int8 weights "
                  f"of the Linear layers, CPU) gives a student that scores {m} {_fmt(q.get('metric'))} on the "
                  f"validation split ({q.get('metric_retained_percent')} % of the teacher's), "
                  f"{q['speedup_vs_teacher']:.2f}x the teacher's CPU speed on a batch of {q['latency_batch_size']} "
                  f"({q['speedup_vs_teacher_batch1']:.2f}x at batch 1), {q['size_bytes'] / 1e6:.2f} MB. "
                  "It is not saved here: quantise the loaded student at deployment."]
    lines.append("")
    path = os.path.join(directory, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
