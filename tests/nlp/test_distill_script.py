"""The script: ``python -m kd_tasks.nlp.distill`` / ``kd-tasks nlp`` end to end on tiny offline models."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from nlp_helpers import NEGATIVE, NEUTRAL, POSITIVE, make_tokenizer
from transformers import AutoModelForSequenceClassification

from kd_tasks.nlp.data import KDCollator, load_raw, task_spec, tokenize
from kd_tasks.nlp.distill import build_parser, main, parse_args
from kd_tasks.nlp.report import task_metrics
from kd_tasks.shared.errors import KDConfigError

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "nlp")


def common(out, **extra):
    argv = ["--output-dir", str(out), "--cpu", "--max-length", "16", "--eval-batch-size", "32",
            "--latency-batch-size", "4", "--seed", "0"]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return argv


def last_log_history(out):
    checkpoints = sorted(glob.glob(os.path.join(out, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))
    with open(os.path.join(checkpoints[-1], "trainer_state.json")) as f:
        return checkpoints[-1], json.load(f)["log_history"]


def test_help_shows_an_example():
    text = build_parser().format_help()
    assert "examples:" in text and "--student-layers 6" in text and "--config" in text


def test_end_to_end_loss_falls_and_student_reloads(tmp_path, teacher_dir, sentiment_csv, tokenizer):
    out = tmp_path / "out"
    argv = ["--teacher", teacher_dir, "--train-file", sentiment_csv["train"], "--validation-file",
            sentiment_csv["validation"]] + common(out, student_layers=2, epochs=3, batch_size=16, learning_rate=2e-3,
                                                  logging_steps=1, alpha_hidden=1.0, hidden_loss="cosine")
    assert main(argv) == 0
    checkpoint, history = last_log_history(out)
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 18 and sum(losses[-3:]) < 0.8 * sum(losses[:3])
    assert all(k in history[0] for k in ("loss_task", "loss_kd", "loss_hidden"))

    report = json.loads((out / "kd_report.json").read_text())
    assert report["teacher"]["parameters"] > report["student"]["parameters"]
    assert report["student"]["size_bytes"] < report["teacher"]["size_bytes"]
    assert report["main_metric"] == "accuracy" and report["metric_retained_percent"] is not None
    assert (out / "kd_report.md").read_text().count("|") > 10

    # the saved student is a plain HF model: same logits as the final checkpoint, and the reported accuracy
    student = AutoModelForSequenceClassification.from_pretrained(out).eval()
    final = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    assert student.config.num_hidden_layers == 2
    raw = load_raw(train_file=sentiment_csv["train"], validation_file=sentiment_csv["validation"])
    spec = task_spec(raw, "classification")
    data = tokenize(raw["validation"], tokenizer, spec, max_length=16)
    batch = KDCollator(tokenizer)([data[i] for i in range(len(data))])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        logits = student(**inputs).logits
        torch.testing.assert_close(logits, final(**inputs).logits)
    accuracy = task_metrics("classification", logits.numpy(), batch["labels"].numpy())["accuracy"]
    assert accuracy == pytest.approx(report["student"]["metrics"]["accuracy"])


def test_recipe_keys_are_option_names_and_typos_are_rejected(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: t/\nstudent-layers: 3\nalpha_kd: 0.9\nepochs: 2\noutput-dir: o\n")
    args = parse_args(["--config", str(recipe), "--epochs", "5"])
    assert (args.student_layers, args.alpha_kd, args.epochs, args.output_dir) == (3, 0.9, 5.0, "o")
    recipe.write_text("teacher: t\nstudent-layer: 3\n")
    with pytest.raises(KDConfigError, match="did you mean 'student-layers'"):
        parse_args(["--config", str(recipe)])
    with pytest.raises(SystemExit):  # no teacher anywhere
        parse_args(["--output-dir", "o"])


@pytest.mark.parametrize("name", sorted(os.listdir(CONFIGS)))
def test_shipped_recipes_parse(name):
    args = parse_args(["--config", os.path.join(CONFIGS, name), "--teacher", "t", "--output-dir", "o"])
    assert sum(bool(getattr(args, k)) for k in ("student", "student_layers", "student_layer_ids", "student_shape")) == 1


def test_missing_teacher_path_is_named(tmp_path, sentiment_csv, capsys):
    missing = str(tmp_path / "nowhere" / "teacher")
    rc = main(["--teacher", missing, "--train-file", sentiment_csv["train"]] + common(tmp_path / "o", student_layers=2))
    assert rc == 2 and missing in capsys.readouterr().err


def test_tokenizer_mismatch_refused_unless_separate_inputs_with_cached_logits(tmp_path, teacher_dir, sentiment_csv):
    student_dir = tmp_path / "student"
    other = make_tokenizer(student_dir, words=list(reversed(POSITIVE + NEGATIVE + NEUTRAL)))
    AutoModelForSequenceClassification.from_pretrained(teacher_dir).save_pretrained(student_dir)
    other.save_pretrained(student_dir)
    base = ["--teacher", teacher_dir, "--student", str(student_dir), "--train-file", sentiment_csv["train"],
            "--max-train-samples", "32", "--max-eval-samples", "16"]
    assert main(base + common(tmp_path / "refused", epochs=1)) == 2
    cache = tmp_path / "cache"
    argv = base + common(tmp_path / "ok", epochs=1, batch_size=16, logging_steps=1, teacher_inputs="separate",
                         cache_teacher_logits=cache, no_report=True)
    assert main(argv) == 0
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["count"] == 32 and meta["arrays"]["output"]["shape"] == [32, 2]
    _, history = last_log_history(tmp_path / "ok")
    assert history[0]["loss_kd"] > 0


def test_token_classification_and_qa_paths_run(tmp_path, head_teacher_dirs, ner_json, qa_json):
    token = ["--teacher", head_teacher_dirs["token"], "--task-type", "token", "--train-file", ner_json]
    assert main(token + common(tmp_path / "tok", student_layers=2, epochs=1, batch_size=16, alpha_attention=1.0)) == 0
    report = json.loads((tmp_path / "tok" / "kd_report.json").read_text())
    assert report["main_metric"] == "f1" and "accuracy" in report["student"]["metrics"]
    qa = ["--teacher", head_teacher_dirs["qa"], "--task-type", "qa", "--train-file", qa_json]
    assert main(qa + common(tmp_path / "qa", student_layers=2, epochs=1, batch_size=16, logging_steps=1, alpha_qkv_relation=1.0,
                            relation_heads=2, max_length=24)) == 0
    _, history = last_log_history(tmp_path / "qa")
    assert history[0]["loss_kd"] > 0 and history[0]["loss_qkv_relation"] > 0
    report = json.loads((tmp_path / "qa" / "kd_report.json").read_text())
    assert report["main_metric"] == "f1"  # SQuAD F1 on the answer text
    assert {"exact_match", "f1", "span_f1"} <= set(report["student"]["metrics"])


def test_resume_latest_continues_from_the_last_checkpoint(tmp_path, teacher_dir, sentiment_csv):
    base = ["--teacher", teacher_dir, "--train-file", sentiment_csv["train"], "--max-train-samples", "32",
            "--max-eval-samples", "8"]
    out = tmp_path / "run"
    assert main(base + common(out, student_layers=2, batch_size=16, max_steps=2, save_steps=1, logging_steps=1,
                              no_report=True)) == 0
    assert main(base + common(out, student_layers=2, batch_size=16, max_steps=3, save_steps=1, logging_steps=1,
                              no_report=True, resume="latest")) == 0
    checkpoint, history = last_log_history(out)
    assert checkpoint.endswith("checkpoint-3")
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]  # steps 1-2 restored, step 3 trained


def test_a_used_output_dir_is_refused_then_overwritten_and_resume_checks_the_run(tmp_path, teacher_dir,
                                                                                sentiment_csv, capsys):
    base = ["--teacher", teacher_dir, "--train-file", sentiment_csv["train"], "--max-train-samples", "32",
            "--max-eval-samples", "8"]
    out = tmp_path / "run"
    argv = base + common(out, student_layers=2, batch_size=16, max_steps=2, save_steps=1, no_report=True)
    assert main(argv) == 0
    saved = (out / "checkpoint-2" / "trainer_state.json").read_text()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "checkpoint-2" / "trainer_state.json").read_text() == saved  # untouched
    # resuming with another learning rate is another run
    assert main(base + common(out, student_layers=2, batch_size=16, max_steps=3, save_steps=1, no_report=True,
                              learning_rate=1e-3, resume=True)) == 2
    err = capsys.readouterr().err
    assert "belongs to another run" in err and "learning_rate" in err
    # --overwrite starts again: the earlier run's checkpoints are gone, not mixed with the new ones
    assert main(base + common(out, student_layers=2, batch_size=16, max_steps=1, save_steps=1, no_report=True,
                              overwrite=True)) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]


def test_cached_teacher_logits_as_top_k_with_the_tail_mass(tmp_path, teacher_dir, sentiment_csv):
    cache = tmp_path / "cache"
    argv = ["--teacher", teacher_dir, "--train-file", sentiment_csv["train"], "--max-train-samples", "32",
            "--max-eval-samples", "16"] + common(tmp_path / "out", student_layers=1, epochs=1, batch_size=16,
                                                  logging_steps=1, cache_teacher_logits=cache, cache_top_k=1,
                                                  no_report=True)
    assert main(argv) == 0
    arrays = json.loads((cache / "meta.json").read_text())["arrays"]
    assert "output" not in arrays and arrays["output.topk_values"]["shape"] == [32, 1]
    assert arrays["output.topk_values"]["topk"] == {"k": 1, "classes": 2}
    _, history = last_log_history(tmp_path / "out")
    assert history[0]["loss_kd"] > 0


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, teacher_dir, sentiment_csv):
    from safetensors.torch import load_file

    base = ["--teacher", teacher_dir, "--train-file", sentiment_csv["train"], "--max-train-samples", "48",
            "--max-eval-samples", "8"]
    opts = dict(student_layers=2, batch_size=8, save_steps=2, logging_steps=1, no_report=True, learning_rate=1e-3,
                lr_scheduler_type="constant")  # the schedule must not depend on max_steps
    assert main(base + common(tmp_path / "full", max_steps=5, **opts)) == 0
    assert main(base + common(tmp_path / "part", max_steps=2, **opts)) == 0  # stopped after step 2
    assert main(base + common(tmp_path / "part", max_steps=5, resume="latest", **opts)) == 0
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert full.keys() == resumed.keys()
    assert [k for k in full if not torch.equal(full[k], resumed[k])] == []  # bit for bit
