"""Data loading (local csv/json/parquet), tokenisation per head, the tokenizer check and the collator."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from nlp_helpers import NEGATIVE, NEUTRAL, POSITIVE, make_tokenizer

from kd_tasks.nlp.data import (
    GLUE_TASKS,
    KDCollator,
    TaskSpec,
    TokenizerMismatchError,
    add_teacher_inputs,
    check_tokenizers,
    load_raw,
    task_spec,
    tokenize,
)
from kd_tasks.shared.errors import KDConfigError


def test_local_csv_classification_with_string_labels(sentiment_csv, tokenizer):
    raw = load_raw(train_file=sentiment_csv["train"], validation_file=sentiment_csv["validation"])
    spec = task_spec(raw, "classification")
    assert spec.label_names == ["negative", "positive"] and spec.num_labels == 2
    data = tokenize(raw["train"], tokenizer, spec, max_length=16)
    assert set(data.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels", "kd_index"}
    first = raw["train"][0]
    assert data[0]["labels"] == ["negative", "positive"].index(first["label"])
    assert data[0]["input_ids"] == tokenizer(first["sentence"])["input_ids"]
    assert data["kd_index"] == list(range(len(data)))


def test_parquet_and_json_load_and_split_off_validation(tmp_path):
    frame = pd.DataFrame({"text": [f"the movie {w}" for w in POSITIVE + NEGATIVE], "score": [1.5] * 7 + [-2.0] * 7})
    frame.to_parquet(tmp_path / "d.parquet")
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    for name in ("d.parquet", "d.jsonl"):
        raw = load_raw(train_file=str(tmp_path / name), validation_fraction=0.25, seed=0)
        assert len(raw["train"]) + len(raw["validation"]) == 14 and len(raw["validation"]) >= 3
        spec = task_spec(raw, "regression", text_column="text", label_column="score")
        assert spec.num_labels == 1 and spec.metric == "pearson"
    with pytest.raises(KDConfigError, match="did you mean 'score'"):
        task_spec(raw, "regression", text_column="text", label_column="scor")
    with pytest.raises(KDConfigError, match="does not exist"):
        load_raw(train_file=str(tmp_path / "missing.csv"))
    with pytest.raises(KDConfigError, match="GLUE task"):
        load_raw(task="sst-2")
    assert GLUE_TASKS["stsb"].num_labels == 1 and GLUE_TASKS["cola"].metric == "matthews_correlation"


def test_multilabel_labels_become_multi_hot(tmp_path, tokenizer):
    frame = pd.DataFrame({"sentence": ["good film", "bad plot", "good bad"], "label": [["pos"], ["neg"], ["pos", "neg"]]})
    frame.to_json(tmp_path / "m.jsonl", orient="records", lines=True)
    raw = load_raw(train_file=str(tmp_path / "m.jsonl"), validation_file=str(tmp_path / "m.jsonl"))
    spec = task_spec(raw, "multilabel")
    assert spec.label_names == ["neg", "pos"]
    data = tokenize(raw["train"], tokenizer, spec)
    assert data["labels"] == [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]


def test_token_labels_go_on_first_subtoken(tmp_path, ner_json):
    # "superb" is split into sub-tokens by a vocabulary that only has "super" and "##b"
    tok = make_tokenizer(tmp_path / "sub", words=[w for w in POSITIVE + NEGATIVE + NEUTRAL if w != "superb"] + ["super", "##b"])
    raw = load_raw(train_file=ner_json)
    spec = task_spec(raw, "token")
    assert spec.text_column == "tokens" and spec.label_column == "ner_tags"
    assert spec.label_names == ["NEG", "O", "POS"]
    (tmp_path / "one.jsonl").write_text(json.dumps({"tokens": ["the", "superb", "film"], "ner_tags": ["O", "POS", "O"]}))
    data = tokenize(load_raw(train_file=str(tmp_path / "one.jsonl"), validation_file=ner_json)["train"], tok, spec)
    ids = data[0]["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "the", "super", "##b", "film", "[SEP]"]
    assert data[0]["labels"] == [-100, 1, 2, -100, 1, -100]


def test_qa_positions_point_at_the_answer_tokens(qa_json, tokenizer):
    raw = load_raw(train_file=qa_json, validation_fraction=0.2)
    spec = task_spec(raw, "qa")
    data = tokenize(raw["train"], tokenizer, spec, max_length=32)
    for row, enc in zip(raw["train"], data):
        answer = row["answers"]["text"][0]
        span = enc["input_ids"][enc["start_positions"] : enc["end_positions"] + 1]
        assert tokenizer.decode(span) == answer
    # an answer cut off by truncation points at [CLS]
    cut = tokenize(raw["train"], tokenizer, spec, max_length=10)
    for row, enc in zip(raw["train"], cut):
        if len(tokenizer(row["question"], row["context"])["input_ids"]) > 10 and enc["start_positions"] == 0:
            assert enc["end_positions"] == 0
            break
    else:
        pytest.fail("no truncated example found")


def test_tokenizer_mismatch_is_refused_with_reasons(tmp_path, tokenizer):
    same = make_tokenizer(tmp_path / "same")
    assert check_tokenizers(tokenizer, same) == []
    other_vocab = make_tokenizer(tmp_path / "other", words=list(reversed(POSITIVE + NEGATIVE + NEUTRAL)))
    with pytest.raises(TokenizerMismatchError, match="vocabularies differ") as err:
        check_tokenizers(tokenizer, other_vocab)
    assert "--teacher-inputs separate" in str(err.value)
    cased = make_tokenizer(tmp_path / "cased", lowercase=False)
    with pytest.raises(TokenizerMismatchError, match="probe text"):
        check_tokenizers(tokenizer, cased)
    # choosing separate inputs accepts the mismatch and returns the reasons
    assert check_tokenizers(tokenizer, other_vocab, separate_teacher_inputs=True)


def test_separate_teacher_inputs_are_padded_by_the_teacher_tokenizer(tmp_path, sentiment_csv, tokenizer):
    student_tok = make_tokenizer(tmp_path / "student", words=list(reversed(POSITIVE + NEGATIVE + NEUTRAL)))
    raw = load_raw(train_file=sentiment_csv["train"], validation_file=sentiment_csv["validation"])
    spec = task_spec(raw, "classification")
    data = add_teacher_inputs(tokenize(raw["train"], student_tok, spec), raw["train"], tokenizer, spec)
    batch = KDCollator(student_tok, "classification", teacher_tokenizer=tokenizer)([data[i] for i in range(4)])
    assert batch["teacher_input_ids"].shape == batch["teacher_attention_mask"].shape
    texts = raw["train"][:4]["sentence"]
    expected = tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]
    assert torch.equal(batch["teacher_input_ids"], expected)
    assert torch.equal(batch["input_ids"], student_tok(texts, padding=True, return_tensors="pt")["input_ids"])
    assert batch["kd_index"].tolist() == [0, 1, 2, 3]
    with pytest.raises(KDConfigError, match="sequence-level"):
        add_teacher_inputs(data, raw["train"], tokenizer, TaskSpec(task_type="token"))


def test_glue_without_network_fails_with_advice():
    with pytest.raises(KDConfigError, match="--train-file"):
        load_raw(task="sst2")
