"""``kd-tasks nlp --export onnx``: the saved student as ONNX with keyword inputs and dynamic batch and sequence
axes, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from nlp_helpers import tiny_config
from test_distill_script import common

from kd_tasks.nlp.distill import main
from kd_tasks.nlp.export import _compare, export_student_onnx
from kd_tasks.shared.errors import KDConfigError
from kd_tasks.shared.export import onnx_session, run_onnx

pytest.importorskip("onnxruntime")


def batch_of(tokenizer, texts):
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


TEXTS = ["the movie was good", "a very bad and boring plot", "it is nice", "the actor was sad and awful and ugly"]
OTHER = ["good", "the film was a very lovely and happy film and the plot was superb", "bad"]


def assert_same_as_pytorch(model, path, batch, names):
    with torch.no_grad():
        ref = model(**batch)
    got = run_onnx(path, batch)
    assert len(got) == len(names)
    for name, value in zip(names, got):
        np.testing.assert_allclose(value, ref[name].numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["classification", "token", "qa"])
def test_export_has_keyword_inputs_dynamic_axes_and_matches_pytorch(kind, tmp_path, tokenizer, teacher_dir,
                                                                    head_teacher_dirs):
    source = teacher_dir if kind == "classification" else head_teacher_dirs[kind]
    cls = {"classification": transformers.AutoModelForSequenceClassification,
           "token": transformers.AutoModelForTokenClassification,
           "qa": transformers.AutoModelForQuestionAnswering}[kind]
    model = cls.from_pretrained(source).eval()
    info = export_student_onnx(model, batch_of(tokenizer, TEXTS), str(tmp_path), kind)
    path = tmp_path / "onnx" / "model.onnx"
    assert info["path"] == str(path) and path.is_file()
    names = ["start_logits", "end_logits"] if kind == "qa" else ["logits"]
    assert info["inputs"] == ["input_ids", "attention_mask", "token_type_ids"] and info["outputs"] == names
    assert info["max_abs_diff_vs_pytorch"] < 1e-4
    session = onnx_session(path)
    for i in session.get_inputs():  # both axes symbolic: one file for any batch size and sentence length
        assert isinstance(i.shape[0], str) and isinstance(i.shape[1], str), (i.name, i.shape)
    assert [o.name for o in session.get_outputs()] == names
    for texts in (TEXTS[:1], OTHER, TEXTS + OTHER):  # batch 1, 3, 7; other sequence lengths than the example's
        assert_same_as_pytorch(model, path, batch_of(tokenizer, texts), names)
    assert model.training is False and next(model.parameters()).requires_grad  # the model is not changed


def test_a_model_without_token_type_ids_exports_two_inputs(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=64, num_labels=3)
    model = transformers.DistilBertForSequenceClassification(config).eval()
    batch = batch_of(tokenizer, TEXTS)
    assert "token_type_ids" in batch  # given, but DistilBERT does not take it
    info = export_student_onnx(model, batch, str(tmp_path), "classification")
    assert info["inputs"] == ["input_ids", "attention_mask"]
    assert [i.name for i in onnx_session(info["path"]).get_inputs()] == ["input_ids", "attention_mask"]
    other = {k: v for k, v in batch_of(tokenizer, OTHER).items() if k != "token_type_ids"}
    assert_same_as_pytorch(model, info["path"], other, ["logits"])


def test_the_check_catches_a_graph_of_another_model(tmp_path, tokenizer):
    torch.manual_seed(0)
    a = transformers.BertForSequenceClassification(tiny_config(len(tokenizer), layers=1)).eval()
    b = transformers.BertForSequenceClassification(tiny_config(len(tokenizer), layers=1)).eval()
    info = export_student_onnx(a, batch_of(tokenizer, TEXTS), str(tmp_path), "classification")
    inputs = batch_of(tokenizer, OTHER)
    with pytest.raises(KDConfigError, match="logits differs from PyTorch"):
        _compare(b, info["path"], inputs, ("logits",), onnx_session(info["path"]), 1e-4, 1e-3)


def test_cli_export_onnx_writes_the_saved_student(tmp_path, teacher_dir, sentiment_csv, tokenizer, capsys):
    out = tmp_path / "out"
    data = ["--teacher", teacher_dir, "--train-file", sentiment_csv["train"], "--validation-file",
            sentiment_csv["validation"]]
    assert main(data + ["--export", "onnx"] + common(out, student_layers=2, batch_size=16, max_steps=2)) == 0
    path = out / "onnx" / "model.onnx"
    assert path.is_file() and f"ONNX: {path}" in capsys.readouterr().out
    report = json.loads((out / "kd_report.json").read_text())
    assert report["onnx"]["path"] == str(path) and report["onnx"]["max_abs_diff_vs_pytorch"] < 1e-4
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert saved.config.num_hidden_layers == 2
    assert_same_as_pytorch(saved, path, batch_of(tokenizer, OTHER), ["logits"])
    # --overwrite replaces the run, its export included
    assert main(data + common(out, student_layers=2, batch_size=16, max_steps=1, no_report=True, overwrite=True)) == 0
    assert not path.exists()


def test_export_choice_is_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--teacher", "t", "--output-dir", str(tmp_path), "--export", "tflite"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--export" in err and "onnx" in err and "Traceback" not in err
