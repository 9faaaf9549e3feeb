"""Task metrics (GLUE definitions) and the teacher-vs-student report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers
from nlp_helpers import tiny_config

from kd_tasks.nlp.report import (compression_report, cpu_latency_ms, format_report, metric_fraction,
                                  task_metrics)
from kd_tasks.shared.export import quantize_dynamic_int8
from kd_tasks.shared.report import count_params


def test_classification_metrics_on_a_hand_made_case():
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    pred = np.array([1, 1, 0, 0, 0, 1, 1, 0])
    logits = np.stack([1 - pred, pred], axis=1).astype(float)
    m = task_metrics("classification", logits, labels)
    tp, tn, fp, fn = 3, 3, 1, 1
    assert m["accuracy"] == 0.75
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert m["matthews_correlation"] == pytest.approx(mcc)


def test_regression_metrics_are_pearson_and_spearman():
    labels = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    pred = np.array([[0.1], [0.9], [2.5], [2.9], [4.2]])
    m = task_metrics("regression", pred, labels)
    x, y = pred[:, 0] - pred.mean(), labels - labels.mean()
    assert m["pearson"] == pytest.approx(float((x * y).sum() / np.sqrt((x**2).sum() * (y**2).sum())))
    assert m["spearmanr"] == pytest.approx(1.0)
    assert task_metrics("regression", np.zeros((5, 1)), labels)["pearson"] == 0.0  # constant prediction


def test_token_metrics_ignore_padding_and_o_tags():
    names = ["O", "POS", "NEG"]
    labels = np.array([[-100, 0, 1, 2, -100], [-100, 1, 0, -100, -100]])
    pred_ids = np.array([[2, 0, 1, 1, 0], [1, 1, 0, 0, 0]])
    logits = np.eye(3)[pred_ids]
    m = task_metrics("token", logits, labels, names)
    # kept tokens: (0,O) (1,POS) (2->1 wrong NEG) (1,POS) (0,O): 4/5 right
    assert m["accuracy"] == pytest.approx(0.8)
    # token level, non-O tags: gold POS, NEG, POS; predicted POS, POS, POS -> tp 2, fp 1, fn 1
    assert m["token_f1"] == pytest.approx(2 / 3)
    # entity level (IO tags): gold (POS 1-1), (NEG 2-2), (POS 1-1 of row 2); predicted (POS 1-2), (POS 1-1 of row 2)
    # -> 1 hit; precision 1/2, recall 1/3, F1 0.4
    assert m["f1"] == pytest.approx(0.4) and m["precision"] == pytest.approx(0.5)


def test_qa_span_metrics():
    start = np.full((2, 6), -5.0)
    end = np.full((2, 6), -5.0)
    start[0, 2], end[0, 3] = 5, 5  # predicts 2..3, gold 2..3: exact
    start[1, 1], end[1, 2] = 5, 5  # predicts 1..2, gold 2..4: overlap 1 token
    m = task_metrics("qa", (start, end), (np.array([2, 2]), np.array([3, 4])))
    assert m["span_exact"] == 0.5
    p, r = 1 / 2, 1 / 3
    assert m["span_f1"] == pytest.approx((1 + 2 * p * r / (p + r)) / 2)


def _state_dict_bytes(model) -> int:
    import io

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def test_report_ratios_and_table():
    torch.manual_seed(0)
    big = transformers.BertForSequenceClassification(tiny_config(30, layers=4))
    small = transformers.BertForSequenceClassification(tiny_config(30, layers=1))
    batch = {"input_ids": torch.randint(5, 30, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    q = quantize_dynamic_int8(small)
    shared, report = compression_report(big, small, {"accuracy": 0.9}, {"accuracy": 0.81}, main_metric="accuracy",
                                        task_type="classification", example=batch, quantized=q,
                                        quantized_metrics={"accuracy": 0.72}, batch_size=4, warmup=1, repeats=3)
    t, s = report["teacher"], report["student"]
    assert t["parameters"] == count_params(big) == sum(p.numel() for p in big.parameters())
    assert s["parameters"] == sum(p.numel() for p in small.parameters())
    assert t["size_bytes"] == _state_dict_bytes(big) and s["size_bytes"] == _state_dict_bytes(small)
    assert report["quantized"]["size_bytes"] == _state_dict_bytes(q) < 0.8 * s["size_bytes"]
    assert report["metric_retained_percent"] == pytest.approx(90.0)
    assert report["quantized"]["metric_retained_percent"] == pytest.approx(80.0)
    assert report["parameter_ratio"] == pytest.approx(s["parameters"] / t["parameters"], abs=1e-4)
    assert report["speedup"] == pytest.approx(t["cpu_latency_ms_per_batch"] / s["cpu_latency_ms_per_batch"], abs=2e-3)
    assert [r["metric"] for r in shared.rows] == [0.9, 0.81, 0.72]
    assert shared.rows[2]["flops"] == shared.rows[1]["flops"] > 0  # the int8 row: the float student's FLOPs
    table = format_report(report)
    assert "90.0% retained" in table and "80.0% retained" in table and "| student int8 |" in table


def test_squad_percentages_become_fractions_in_the_shared_report():
    assert metric_fraction("qa", "f1", 85.0) == pytest.approx(0.85)
    assert metric_fraction("qa", "span_f1", 0.5) == 0.5 and metric_fraction("classification", "f1", 0.5) == 0.5
    assert math.isnan(metric_fraction("classification", "accuracy", None))


def test_teacher_with_its_own_tokenizer_is_measured_on_its_own_inputs():
    """The teacher reads a 30-word vocabulary, the student a 60-word one: the teacher row is timed on the teacher's
    batch (9 tokens; the student's ids would be out of its range), its FLOPs those of 9 tokens."""
    torch.manual_seed(0)
    h, i = 32, 64
    teacher = transformers.BertForSequenceClassification(tiny_config(30, layers=2))
    student = transformers.BertForSequenceClassification(tiny_config(60, layers=1))
    mine = {"input_ids": torch.randint(30, 60, (4, 5)), "attention_mask": torch.ones(4, 5, dtype=torch.long)}
    theirs = {"input_ids": torch.randint(5, 30, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long)}
    shared, _ = compression_report(teacher, student, {"accuracy": 1.0}, {"accuracy": 1.0}, main_metric="accuracy",
                                   task_type="classification", example=mine, teacher_example=theirs, batch_size=4,
                                   warmup=1, repeats=3)

    def flops(layers, n):
        return layers * (n * (8 * h * h + 4 * h * i) + 4 * n * n * h) + 2 * h * h + 2 * h * 2

    assert shared.rows[0]["flops"] == pytest.approx(flops(2, 9))
    assert shared.rows[1]["flops"] == pytest.approx(flops(1, 5))


def test_cpu_latency_is_the_shared_timer_on_a_cpu_copy():
    model = transformers.BertForSequenceClassification(tiny_config(30, layers=1)).train()
    batch = {"input_ids": torch.randint(5, 30, (2, 5))}
    assert cpu_latency_ms(model, batch, repeats=3, warmup=1) > 0
    assert model.training  # the caller's mode is restored


def test_entity_f1_on_hand_made_iob_tags():
    from kd_tasks.nlp.report import entities, entity_scores

    # the example of seqeval's README: the MISC chunk is predicted one token too early -> 1 of 2 entities right
    true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    assert entity_scores(true, pred) == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
    # conlleval chunking: I- after O starts a chunk, B- splits, a type change splits; IOBES ends
    assert entities(["I-LOC", "I-LOC", "B-LOC", "I-PER", "O", "S-ORG", "B-X", "E-X"]) == {
        ("LOC", 0, 1), ("LOC", 2, 2), ("PER", 3, 3), ("ORG", 5, 5), ("X", 6, 7)}
    try:
        from seqeval.metrics import f1_score
    except ImportError:
        return
    assert entity_scores(true, pred)["f1"] == pytest.approx(f1_score(true, pred))
