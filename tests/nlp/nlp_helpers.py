"""Helpers for the NLP adapter tests: a vocabulary file, a BERT tokenizer, tiny configs, synthetic sentences."""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

POSITIVE = "good great fine lovely superb nice happy".split()
NEGATIVE = "bad awful poor sad terrible ugly boring".split()
NEUTRAL = "the movie film plot actor was is a very and it this".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TAGS = ["O", "POS", "NEG"]


def write_vocab(directory, words, specials=SPECIALS) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(list(specials) + list(words)) + "\n")
    return path


def make_tokenizer(directory, words=POSITIVE + NEGATIVE + NEUTRAL, lowercase=True):
    """A BertTokenizerFast read from a vocabulary file written here."""
    write_vocab(directory, words)
    return transformers.BertTokenizerFast.from_pretrained(str(directory), do_lower_case=lowercase)


def tiny_config(vocab_size, layers=4, hidden=32, heads=4, num_labels=2, dropout=0.0):
    return transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )


def sentences(n, seed=0):
    """(words, label, tags): label 1 iff the sentence has a positive word; tags mark the sentiment words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(1, 7))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        tags = ["POS" if w in POSITIVE else "NEG" if w in NEGATIVE else "O" for w in words]
        rows.append((words, label, tags))
    return rows


def fit(model, tokenizer, rows, steps=60, lr=3e-3, batch=16):
    """A few Adam steps of plain fine-tuning (makes the tiny teacher a real, accurate teacher)."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        chunk = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
        enc = tokenizer([" ".join(w) for w, _, _ in chunk], padding=True, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([y for _, y, _ in chunk])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


