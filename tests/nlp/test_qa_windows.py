"""Extractive QA: sliding windows over long contexts map answers back to text spans; SQuAD EM/F1."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from kd_tasks.nlp.data import TaskSpec, qa_reference, tokenize
from kd_tasks.nlp.report import normalize_answer, qa_predictions, squad_scores, task_metrics
from kd_tasks.shared.errors import KDConfigError

WORDS = "the movie was very good and the plot was very bad and the actor was very nice".split()


def _raw():
    context = " ".join(WORDS * 2)
    answer = "actor was very nice"
    start = context.index(answer, len(context) // 2)  # the second occurrence, far into the context
    return datasets.Dataset.from_dict({"question": ["is it good or bad", "what is bad"],
                                       "context": [context, "the plot was bad"],
                                       "answers": [{"text": [answer], "answer_start": [start]},
                                                   {"text": ["bad"], "answer_start": [13]}]})


def test_windows_cover_a_long_context_and_map_the_answer_back_to_its_text(tokenizer):
    raw = _raw()
    spec = TaskSpec(task_type="qa", text_column="question", text_pair_column="context", label_column="answers",
                    doc_stride=4)
    feats = tokenize(raw, tokenizer, spec, max_length=20)
    assert len(feats) > 3  # the 31-word context needs several windows of 20 tokens
    owners = feats["qa_example"]
    assert owners.count(0) == len(feats) - 1 and owners.count(1) == 1
    found = 0
    for i in range(len(feats)):
        s, e, offsets = feats[i]["start_positions"], feats[i]["end_positions"], feats[i]["qa_offsets"]
        ex = owners[i]
        if s == 0:
            assert e == 0
            continue
        found += 1
        context = raw[ex]["context"]
        gold = raw[ex]["answers"]
        assert context[offsets[s][0]:offsets[e][1]] == gold["text"][0]
        assert offsets[s][0] == gold["answer_start"][0]  # the annotated occurrence, not an earlier copy
    assert found >= 2  # example 1, and example 0 in at least one window
    # consecutive windows of example 0 overlap by doc_stride tokens
    ctx = [[j for j, o in enumerate(feats[i]["qa_offsets"]) if o[0] >= 0] for i in range(len(feats)) if owners[i] == 0]
    first_end = feats[0]["qa_offsets"][ctx[0][-1]]
    second = [feats[1]["qa_offsets"][j] for j in ctx[1]]
    assert sum(1 for o in second if o[1] <= first_end[1]) == 4


def test_post_processing_picks_the_best_span_over_windows_and_squad_scores(tokenizer):
    raw = _raw()
    spec = TaskSpec(task_type="qa", text_column="question", text_pair_column="context", label_column="answers",
                    doc_stride=4)
    feats = tokenize(raw, tokenizer, spec, max_length=20)
    ref = qa_reference(raw, feats, spec)
    n, length = len(feats), 20
    start, end = np.zeros((n, length)), np.zeros((n, length))
    for i in range(n):  # logits that point at each feature's gold span, strongest in the gold windows
        s, e = feats[i]["start_positions"], feats[i]["end_positions"]
        if s:
            start[i, s], end[i, e] = 5.0, 5.0
    texts = qa_predictions(start, end, ref)
    assert texts == ["actor was very nice", "bad"]
    assert squad_scores(texts, ref["answers"]) == {"exact_match": 100.0, "f1": 100.0}
    labels = (np.array(feats["start_positions"]), np.array(feats["end_positions"]))
    m = task_metrics("qa", (start, end), labels, qa_reference=ref)
    assert m["exact_match"] == 100.0 and m["span_exact"] == 1.0


def test_squad_normalisation_and_partial_f1():
    assert normalize_answer("The  Cat, sat.") == "cat sat"
    scores = squad_scores(["the cat", "a big dog", "nothing"], [["Cat"], ["big dog barks", "small dog"], ["x"]])
    # EM: 1, 0, 0; F1: 1, 2*(2/2*2/3)/(2/2+2/3)=0.8, 0
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8 + 0) / 3)


def test_a_stride_too_large_is_refused(tokenizer):
    spec = TaskSpec(task_type="qa", text_column="question", text_pair_column="context", label_column="answers",
                    doc_stride=12)
    with pytest.raises(KDConfigError, match="doc-stride"):
        tokenize(_raw(), tokenizer, spec, max_length=20)
