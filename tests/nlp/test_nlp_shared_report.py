"""``kd-tasks nlp`` ends with the shared compression report (teacher, student, ``--quantize``: an int8 student);
``kd_report.json`` is filled from the same measurements; the int8 row is scored by evaluating that model."""

from __future__ import annotations

import argparse
import copy
import csv
import json

import numpy as np
import pytest
import torch
import transformers
from nlp_helpers import sentences, tiny_config
from test_distill_script import common

from kd_tasks.nlp.data import QA_META, KDCollator, load_raw, qa_reference, task_spec, tokenize
from kd_tasks.nlp.distill import _evaluate, main, parse_args
from kd_tasks.nlp.report import evaluate_model
from kd_tasks.shared.errors import KDConfigError
from kd_tasks.shared.export import quantize_dynamic_int8
from kd_tasks.shared.report import count_flops

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def noisy_validation(tmp_path_factory):
    """40 validation sentences, every 4th label flipped: no model scores 100 %, so the metrics are informative."""
    path = tmp_path_factory.mktemp("noisy") / "validation.csv"
    rows = []
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        for i, (words, label, _) in enumerate(sentences(40, seed=7)):
            label = 1 - label if i % 4 == 0 else label
            rows.append((" ".join(words), ["negative", "positive"][label]))
            writer.writerow(rows[-1])
    return str(path), rows


def _run(out, teacher_dir, sentiment_csv, validation, *extra):
    argv = (["--teacher", teacher_dir, "--train-file", sentiment_csv["train"], "--validation-file", validation,
             "--threads", "1", "--student-layers", "2", "--max-steps", "4", "--batch-size", "16",
             "--learning-rate", "2e-3", "--save-strategy", "no", "--disable-tqdm"]
            + common(out, eval_batch_size=64) + list(extra))
    assert main(argv) == 0


def _accuracy_f1(model, tokenizer, rows, label2id):
    """Accuracy and positive-class F1 of ``model`` on ``rows`` in one padded batch (independent of the adapter)."""
    enc = tokenizer([t for t, _ in rows], padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1).numpy()
    gold = np.array([label2id[y] for _, y in rows])
    pos = label2id["positive"]
    tp = int(np.sum((pred == pos) & (gold == pos)))
    fp = int(np.sum((pred == pos) & (gold != pos)))
    fn = int(np.sum((pred != pos) & (gold == pos)))
    return float(np.mean(pred == gold)), (2 * tp / (2 * tp + fp + fn) if tp else 0.0)


def test_cli_writes_the_shared_report_with_a_measured_int8_row(tmp_path, teacher_dir, sentiment_csv, tokenizer,
                                                                noisy_validation, capsys):
    validation, rows = noisy_validation
    out = tmp_path / "out"
    _run(out, teacher_dir, sentiment_csv, validation, "--quantize")
    printed = capsys.readouterr().out
    assert "student int8" in printed and f"report: {out / 'report.md'}" in printed

    # the shared report's three files
    assert (out / "report.png").read_bytes()[:8] == PNG_MAGIC
    from matplotlib.image import imread

    assert imread(str(out / "report.png")).shape[0] > 100
    shared = json.loads((out / "report.json").read_text())
    assert shared["metric_name"] == "accuracy" and shared["threads"] == 1 and shared["batch_size"] == 4
    assert shared["device"] == "cpu"
    rows_by_name = {r["name"]: r for r in shared["rows"]}
    assert [(r["name"], r["role"]) for r in shared["rows"]] == [("teacher", "teacher"), ("student", "student"),
                                                                 ("student int8", "quantized")]
    assert "| student int8 | quantized |" in (out / "report.md").read_text()

    # parameters: the saved models' own counts
    teacher = transformers.AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    student = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert student.config.num_hidden_layers == 2
    assert rows_by_name["teacher"]["params"] == sum(p.numel() for p in teacher.parameters())
    assert rows_by_name["student"]["params"] == sum(p.numel() for p in student.parameters())
    assert rows_by_name["student int8"]["size_bytes"] < 0.8 * rows_by_name["student"]["size_bytes"]

    # metrics: teacher and student rows carry the run's validation scores; the int8 row an evaluation of
    # quantize_dynamic_int8(saved student), recomputed here without the adapter
    kd = json.loads((out / "kd_report.json").read_text())
    ids = student.config.label2id  # the data's labels, in the order the teacher was trained with
    assert ids == {"negative": 0, "positive": 1}
    t_acc, _ = _accuracy_f1(teacher, tokenizer, rows, ids)
    s_acc, _ = _accuracy_f1(student, tokenizer, rows, ids)
    q_acc, q_f1 = _accuracy_f1(quantize_dynamic_int8(student), tokenizer, rows, ids)
    assert 0.5 < t_acc < 1.0  # the flipped labels cost the teacher too
    assert rows_by_name["teacher"]["metric"] == pytest.approx(t_acc, abs=1e-9)
    assert rows_by_name["student"]["metric"] == pytest.approx(s_acc, abs=1e-9)
    assert rows_by_name["student int8"]["metric"] == pytest.approx(q_acc, abs=1e-9)
    assert kd["quantized"]["metric"] == pytest.approx(q_acc, abs=1e-6)
    assert kd["quantized"]["metrics"]["f1"] == pytest.approx(q_f1, abs=1e-6)
    assert kd["quantized"]["metric_retained_percent"] == pytest.approx(100 * q_acc / t_acc, abs=0.01)
    assert rows_by_name["student int8"]["retained"] == pytest.approx(q_acc / t_acc)

    # kd_report.json: the same measurements, not a second set
    for name, key in (("teacher", "teacher"), ("student", "student"), ("student int8", "quantized")):
        row, stats = rows_by_name[name], kd[key]
        assert stats["parameters"] == row["params"] and stats["size_bytes"] == row["size_bytes"]
        assert stats["latency_ms_batch1"] == pytest.approx(row["latency_ms"], abs=1e-4)
        assert stats["cpu_latency_ms_per_batch"] == pytest.approx(1000 * 4 / row["throughput"], abs=1e-4)
        assert stats["latency_batch_size"] == 4 and stats["cpu_threads"] == 1
    t, q = kd["teacher"], kd["quantized"]
    assert q["speedup_vs_teacher"] == pytest.approx(t["cpu_latency_ms_per_batch"] / q["cpu_latency_ms_per_batch"],
                                                    abs=2e-3)
    assert kd["speedup"] == pytest.approx(t["cpu_latency_ms_per_batch"] / kd["student"]["cpu_latency_ms_per_batch"],
                                          abs=2e-3)
    assert kd["compression_report"]["png"] == str(out / "report.png")
    card = (out / "README.md").read_text()
    assert "## int8 (dynamic quantisation)" in card and "student int8 / teacher" in card


def test_int8_row_is_evaluated_not_copied(tmp_path, teacher_dir, sentiment_csv, noisy_validation, monkeypatch):
    """A quantiser whose model always answers "negative": the int8 row must score exactly the share of
    negative labels, whatever the student scores."""
    import kd_tasks.shared.export as export

    real = export.quantize_dynamic_int8

    def always_negative(model):
        model = copy.deepcopy(model)
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor([0.0, 0.0]))
            model.classifier.bias[model.config.label2id["negative"]] = 5.0
        return real(model)

    monkeypatch.setattr(export, "quantize_dynamic_int8", always_negative)
    validation, rows = noisy_validation
    out = tmp_path / "out"
    _run(out, teacher_dir, sentiment_csv, validation, "--quantize")
    kd = json.loads((out / "kd_report.json").read_text())
    negative = sum(y == "negative" for _, y in rows) / len(rows)
    assert kd["quantized"]["metrics"]["accuracy"] == pytest.approx(negative, abs=1e-6)
    assert kd["quantized"]["metrics"]["accuracy"] != pytest.approx(kd["student"]["metrics"]["accuracy"])


def _token_and_qa_sets(head_teacher_dirs, ner_json, qa_json, tokenizer):
    out = {}
    for kind, path, extra in (("token", ner_json, {}), ("qa", qa_json, {"text_column": "question",
                                                                         "text_pair_column": "context",
                                                                         "label_column": "answers"})):
        raw = load_raw(None, path, None, seed=0)
        spec = task_spec(raw, kind, None, extra.get("text_column"), extra.get("text_pair_column"),
                         extra.get("label_column"))
        data = tokenize(raw["validation"], tokenizer, spec, 24)
        ref = None
        if kind == "qa":
            ref = qa_reference(raw["validation"], data, spec)
            data = data.remove_columns(list(QA_META))
        out[kind] = (spec, data, ref)
    return out


def test_evaluate_model_matches_the_trainer_on_padded_batches(head_teacher_dirs, ner_json, qa_json, tokenizer):
    """Token and QA predictions of different lengths are padded and joined as the Trainer joins them: the same
    metrics as the Trainer's evaluation, over several batches."""
    from kd_tasks.nlp.extract import load_model

    for kind, (spec, data, ref) in _token_and_qa_sets(head_teacher_dirs, ner_json, qa_json, tokenizer).items():
        model = load_model(head_teacher_dirs[kind], kind, "teacher").eval()
        collator = KDCollator(tokenizer, kind)
        args = argparse.Namespace(eval_batch_size=3, cpu=True)
        want = _evaluate(model, data, collator, spec, args, ref)
        got = evaluate_model(model, data, collator, kind, spec.label_names, ref, batch_size=3)
        assert len(data) > 3
        for key, value in got.items():
            assert value == pytest.approx(want[key], abs=1e-9), (kind, key)


def test_flops_of_a_keyword_input_model_count_every_matmul():
    """Dict inputs reach the model as keywords and the CPU attention kernel is counted: FLOPs equal the analytic
    count of a BERT encoder (Linear layers and the two attention matmuls) and an eager-attention run."""
    b, n, h, i, layers, labels = 3, 7, 32, 64, 2, 2
    batch = {"input_ids": torch.randint(5, 30, (b, n)), "attention_mask": torch.ones(b, n, dtype=torch.long)}
    expected = layers * (n * (8 * h * h + 4 * h * i) + 4 * n * n * h) + 2 * h * h + 2 * h * labels
    for attention in ("sdpa", "eager"):
        config = tiny_config(30, layers=layers, hidden=h)
        config._attn_implementation = attention
        model = transformers.BertForSequenceClassification(config).eval()
        assert count_flops(model, batch) == pytest.approx(expected), attention


def test_quantize_option_validation(tmp_path, teacher_dir, sentiment_csv, capsys):
    data = ["--teacher", teacher_dir, "--train-file", sentiment_csv["train"]]
    assert main(data + common(tmp_path / "a", quantize=True, no_report=True)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--quantize and --no-report" in err[0]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quantize: sometimes\n")
    with pytest.raises(KDConfigError, match="--quantize .*must be true or false"):
        parse_args(["--config", str(recipe)] + data + common(tmp_path / "b"))
    recipe.write_text("quantize: true\n")
    assert parse_args(["--config", str(recipe)] + data + common(tmp_path / "c")).quantize is True
    assert parse_args(data + common(tmp_path / "d")).quantize is False


def test_distillation_arguments_accept_quantize(tmp_path, teacher_dir):
    from transformers import HfArgumentParser

    from kd_tasks.nlp.arguments import DistillationArguments

    assert DistillationArguments(output_dir=str(tmp_path), teacher=teacher_dir).quantize is False
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path}\nteacher: {teacher_dir}\nquantize: true\n")
    (dargs,) = HfArgumentParser(DistillationArguments).parse_yaml_file(str(recipe))
    assert dargs.quantize is True
