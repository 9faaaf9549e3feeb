"""Tiny offline fixtures for the NLP adapter: a BERT tokenizer from a written vocabulary, a fine-tuned tiny
teacher, and data files in csv / jsonl."""

from __future__ import annotations

import csv
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub read it
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
pytest.importorskip("transformers", reason="the NLP adapter needs kd-tasks[nlp]")

import torch  # noqa: E402
import transformers  # noqa: E402

# Tiny models: one thread is much faster than two on a shared machine (no oversubscription).
torch.set_num_threads(1)

from nlp_helpers import fit, make_tokenizer, sentences, tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def nlp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("nlp")


@pytest.fixture(scope="session")
def tokenizer(nlp_dir):
    return make_tokenizer(nlp_dir / "tok")


@pytest.fixture(scope="session")
def teacher_dir(nlp_dir, tokenizer):
    """A 4-layer, 32-wide BERT teacher fine-tuned on the sentiment data, saved with its tokenizer."""
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(tiny_config(len(tokenizer)))
    fit(model, tokenizer, sentences(128, seed=1))
    path = nlp_dir / "teacher"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def sentiment_csv(nlp_dir):
    paths = {}
    for split, n, seed in (("train", 96, 2), ("validation", 32, 3)):
        path = nlp_dir / f"{split}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "label"])
            for words, label, _ in sentences(n, seed):
                writer.writerow([" ".join(words), ["negative", "positive"][label]])
        paths[split] = str(path)
    return paths


@pytest.fixture(scope="session")
def ner_json(nlp_dir):
    path = nlp_dir / "ner.jsonl"
    with open(path, "w") as f:
        for words, _, tags in sentences(48, seed=4):
            f.write(json.dumps({"tokens": words, "ner_tags": tags}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def qa_json(nlp_dir):
    """Question 'what is the feeling' over a sentence; the answer is its sentiment word."""
    path = nlp_dir / "qa.jsonl"
    with open(path, "w") as f:
        for words, _, tags in sentences(48, seed=5):
            context = " ".join(words)
            i = next(i for i, t in enumerate(tags) if t != "O")
            word, start = words[i], sum(len(w) + 1 for w in words[:i])
            f.write(json.dumps({"question": "is it good or bad", "context": context,
                                "answers": {"text": [word], "answer_start": [start]}}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def head_teacher_dirs(nlp_dir, tokenizer):
    """Token-classification (tags NEG, O, POS) and extractive-QA teachers of the tiny shape, saved with heads."""
    paths = {}
    for name, cls, labels in (("token", transformers.BertForTokenClassification, 3),
                              ("qa", transformers.BertForQuestionAnswering, 2)):
        torch.manual_seed(0)
        config = tiny_config(len(tokenizer), num_labels=labels)
        if name == "token":
            config.id2label = {0: "NEG", 1: "O", 2: "POS"}
            config.label2id = {v: k for k, v in config.id2label.items()}
        path = nlp_dir / f"teacher_{name}"
        cls(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = str(path)
    return paths
