"""Transfer data for distillation: unlabelled text and TinyBERT-style augmented copies.

The teacher labels more text than the labelled set holds; the student learns those examples from
the teacher's soft labels alone (no task loss: their label is ``-100``, or ``nan`` for regression).

* :func:`read_texts` reads unlabelled text: a ``.txt`` file (one text per line) or one column of a
  csv/tsv/json/jsonl/parquet file.
* :class:`WordReplacer` is TinyBERT's data augmentation (Jiao et al. 2020, Alg. 1): each word of a
  sentence is replaced, with probability ``prob`` (0.4 in the paper), by one of its ``k`` (15)
  candidates: the masked LM's top predictions for the word masked in context where a masked LM is
  given (``mlm=``), else the word's neighbours from a list (``neighbours=``: a thesaurus or
  word-embedding neighbour file) or, by default, its nearest neighbours by cosine in the teacher's own
  word-piece embedding matrix (:func:`embedding_neighbours`, whole words only). ``copies`` new
  sentences per input sentence.
* :class:`TransferSet` keeps the generated texts next to the teacher cache
  (``<cache>.transfer.json``), keyed by the digest of everything that produced them (input texts,
  augmentation settings, the augmenter's weights), so they are generated once; a mismatch is refused
  as stale, like the cache itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from typing import Any, Callable, Iterable, Sequence

import torch

from ..shared.errors import KDConfigError

WORD = re.compile(r"^([^\w]*)([A-Za-z]+(?:'[A-Za-z]+)?)([^\w]*)$")


def read_texts(path: str, column: str | None = None, flag: str = "--unlabeled-file") -> list[str]:
    """Texts of ``path``: one per non-empty line of a ``.txt`` file, or ``column`` of a table file."""
    if not os.path.isfile(path):
        raise KDConfigError(f"{flag} {path!r} does not exist", hint="check the path")
    if path.lower().endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    else:
        import datasets

        from .data import file_format

        builder, options = file_format(path)
        try:
            data = datasets.load_dataset(builder, data_files={"train": path}, **options)["train"]
        except Exception as e:  # noqa: BLE001 -- an unreadable file is an input error
            raise KDConfigError(f"cannot read {flag} {path!r} as {builder} ({type(e).__name__})") from None
        column = column or ("sentence" if "sentence" in data.column_names else "text")
        if column not in data.column_names:
            raise KDConfigError(f"{flag} {path!r} has no column {column!r} (columns: {data.column_names}); "
                                "give --unlabeled-column")
        texts = [str(t).strip() for t in data[column] if t is not None and str(t).strip()]
    if not texts:
        raise KDConfigError(f"{flag} {path!r} holds no text")
    return texts


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _is_whole_word(token: str) -> bool:
    return token.isalpha() and not token.startswith("##")


def embedding_neighbours(model: torch.nn.Module, tokenizer, words: Iterable[str], k: int = 15,
                         chunk: int = 1024) -> dict[str, list[str]]:
    """The ``k`` nearest whole-word tokens (cosine of the input embeddings) of each word that is one token."""
    vocab = tokenizer.get_vocab()
    pool = sorted((i, t) for t, i in vocab.items() if _is_whole_word(t) and len(t) > 1)
    pool_ids = torch.tensor([i for i, _ in pool])
    pool_words = [t for _, t in pool]
    weight = model.get_input_embeddings().weight.detach().float()
    pool_vecs = torch.nn.functional.normalize(weight[pool_ids], dim=-1)
    lookup = {}
    for w in sorted(set(words)):
        key = w.lower() if getattr(tokenizer, "do_lower_case", True) else w
        if key in vocab and _is_whole_word(key):
            lookup[w] = vocab[key]
    out: dict[str, list[str]] = {}
    items = list(lookup.items())
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        vecs = torch.nn.functional.normalize(weight[torch.tensor([i for _, i in part])], dim=-1)
        sims = vecs @ pool_vecs.T
        top = sims.topk(min(k + 1, len(pool_words)), dim=-1).indices
        for (w, _), row in zip(part, top.tolist()):
            out[w] = [pool_words[j] for j in row if pool_words[j] != w.lower()][:k]
    return out


def read_neighbours(path: str) -> dict[str, list[str]]:
    """A neighbour list: one line per word, ``word<TAB>neighbour neighbour ...`` (or ``word: a, b``)."""
    if not os.path.isfile(path):
        raise KDConfigError(f"--augment-neighbours {path!r} does not exist")
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            head, sep, rest = line.partition("\t") if "\t" in line else line.partition(":")
            if sep and head.strip():
                out[head.strip()] = [w for w in re.split(r"[,\s]+", rest.strip()) if w]
    if not out:
        raise KDConfigError(f"--augment-neighbours {path!r} holds no 'word<TAB>neighbours' line")
    return out


class WordReplacer:
    """TinyBERT's augmentation: ``copies`` variants of a sentence, each word replaced with probability
    ``prob`` by one of its ``k`` candidates (masked-LM predictions, or neighbours)."""

    def __init__(self, *, neighbours: dict[str, list[str]] | None = None, mlm: torch.nn.Module | None = None,
                 tokenizer=None, prob: float = 0.4, k: int = 15, copies: int = 1, seed: int = 0):
        if neighbours is None and mlm is None:
            raise KDConfigError("augmentation needs a masked LM or a neighbour list")
        if not 0 < prob <= 1:
            raise KDConfigError(f"--augment-prob must be in (0, 1], got {prob}")
        self.neighbours, self.mlm, self.tokenizer = neighbours, mlm, tokenizer
        self.prob, self.k, self.copies, self.seed = float(prob), int(k), int(copies), int(seed)

    def _mlm_candidates(self, words: list[str]) -> dict[int, list[str]]:
        """Top-k predictions for each single-token word masked in its sentence (one batch per sentence)."""
        tok = self.tokenizer
        vocab = tok.get_vocab()
        slots = [i for i, w in enumerate(words) if (m := WORD.match(w)) and m.group(2).lower() in vocab]
        if not slots:
            return {}
        texts = []
        for i in slots:
            m = WORD.match(words[i])
            texts.append(" ".join(words[:i] + [m.group(1) + tok.mask_token + m.group(3)] + words[i + 1:]))
        enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            logits = self.mlm(**enc).logits
        out = {}
        for row, i in enumerate(slots):
            where = (enc["input_ids"][row] == tok.mask_token_id).nonzero()
            if not len(where):
                continue
            top = logits[row, int(where[0])].topk(self.k + 1).indices.tolist()
            cands = [t for t in tok.convert_ids_to_tokens(top) if _is_whole_word(t)
                     and t != WORD.match(words[i]).group(2).lower()]
            out[i] = cands[:self.k]
        return out

    def augment(self, text: str, index: int) -> list[str]:
        """``copies`` variants of ``text``; the randomness depends on (seed, index) only."""
        words = text.split()
        rng = random.Random(f"{self.seed}-{index}")
        cands = self._mlm_candidates(words) if self.mlm is not None else {}
        variants = []
        for _ in range(self.copies):
            new = []
            for i, w in enumerate(words):
                m = WORD.match(w)
                options = cands.get(i) if self.mlm is not None else (self.neighbours.get(m.group(2)) if m else None)
                if m and options and rng.random() < self.prob:
                    new.append(m.group(1) + rng.choice(options[:self.k]) + m.group(3))
                else:
                    new.append(w)
            variants.append(" ".join(new))
        return variants

    def augment_all(self, texts: Sequence[str]) -> list[str]:
        return [v for i, t in enumerate(texts) for v in self.augment(t, i)]


def build_replacer(args: Any, teacher: torch.nn.Module, tokenizer, texts: Sequence[str]) -> tuple[WordReplacer, str]:
    """The augmenter the options ask for, and a description of its source (for the fingerprint and report)."""
    common = dict(prob=args.augment_prob, k=args.augment_k, copies=args.augment_copies, seed=args.seed)
    if args.augment_mlm:
        from transformers import AutoModelForMaskedLM

        from .extract import load_tokenizer, resolve_model_source

        source = resolve_model_source(args.augment_mlm, "--augment-mlm")
        try:
            mlm = AutoModelForMaskedLM.from_pretrained(source).eval()
        except (OSError, ValueError) as e:
            raise KDConfigError(f"--augment-mlm {args.augment_mlm!r} is not a masked LM ({str(e).splitlines()[0]})") from None
        mlm_tok = load_tokenizer(args.augment_mlm, "--augment-mlm", required=False) or tokenizer
        from ..shared.cache import teacher_fingerprint

        return WordReplacer(mlm=mlm, tokenizer=mlm_tok, **common), f"mlm:{teacher_fingerprint(mlm)}"
    if args.augment_neighbours:
        with open(args.augment_neighbours, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        return WordReplacer(neighbours=read_neighbours(args.augment_neighbours), **common), f"neighbours:{digest}"
    words = {m.group(2) for t in texts for w in t.split() if (m := WORD.match(w))}
    from ..shared.cache import teacher_fingerprint

    neighbours = embedding_neighbours(teacher, tokenizer, words, k=args.augment_k)
    return (WordReplacer(neighbours=neighbours, **common),
            f"teacher-embedding-neighbours:{teacher_fingerprint(teacher.get_input_embeddings())}")


class TransferSet:
    """Generated transfer texts stored beside a teacher cache, keyed by what produced them."""

    def __init__(self, cache_dir: str | None):
        self.path = None if not cache_dir else os.path.normpath(cache_dir) + ".transfer.json"

    def load(self, key: dict, rebuild: bool) -> list[str] | None:
        """The stored texts if their key matches; ``None`` if absent (or ``rebuild``); stale raises."""
        if self.path is None or rebuild or not os.path.isfile(self.path):
            return None
        from ..shared.cache import StaleCacheError

        try:
            saved = json.loads(open(self.path, encoding="utf-8").read())
            texts, digest = saved["texts"], saved["digest"]
        except (ValueError, KeyError, TypeError):
            raise StaleCacheError(f"transfer texts {self.path!r} are damaged",
                                  hint="rebuild them with --rebuild-cache") from None
        if digest != _digest(key):
            changed = [k for k in key if saved.get("key", {}).get(k) != key[k]]
            raise StaleCacheError(f"transfer texts {self.path!r} were made from other inputs ({', '.join(changed)} "
                                  "changed)", hint="rebuild them with --rebuild-cache or choose another cache directory")
        return list(texts)

    def save(self, key: dict, texts: list[str]) -> None:
        if self.path is None:
            return
        from ..shared.checkpoint import atomic_write_bytes

        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        record = {"key": key, "digest": _digest(key), "count": len(texts), "texts": texts}
        atomic_write_bytes(self.path, json.dumps(record).encode())


def transfer_texts(args: Any, teacher, tokenizer, labelled_texts: Sequence[str],
                   log: Callable[[str], None] = print) -> tuple[list[str], dict]:
    """Unlabelled texts (``--unlabeled-file``) plus augmented copies of the labelled ones, generated once.

    Returns the texts and a summary for the report: counts per source and the ratio to the labelled set.
    """
    unlabeled = read_texts(args.unlabeled_file, args.unlabeled_column) if args.unlabeled_file else []
    if unlabeled and args.unlabeled_ratio:
        cap = int(round(args.unlabeled_ratio * len(labelled_texts)))
        if cap < len(unlabeled):
            unlabeled = random.Random(args.seed).sample(unlabeled, cap)
    copies = int(args.augment_copies or 0)
    key = {"labelled": _digest(list(labelled_texts)) if copies else None, "unlabeled": _digest(unlabeled),
           "augment": {"copies": copies, "prob": args.augment_prob, "k": args.augment_k, "seed": args.seed,
                       "mlm": args.augment_mlm, "neighbours": args.augment_neighbours}}
    if copies:
        from ..shared.cache import teacher_fingerprint

        key["augmenter_teacher"] = None if (args.augment_mlm or args.augment_neighbours) else \
            teacher_fingerprint(teacher.get_input_embeddings())
    store = TransferSet(args.cache_teacher_logits)
    texts = store.load(key, args.rebuild_cache)
    source = "stored"
    if texts is None:
        augmented: list[str] = []
        source = "generated"
        if copies:
            replacer, source = build_replacer(args, teacher, tokenizer, list(labelled_texts))
            augmented = replacer.augment_all(list(labelled_texts))
        texts = unlabeled + augmented
        store.save(key, texts)
    n_aug = len(texts) - len(unlabeled)
    summary = {"labelled": len(labelled_texts), "unlabeled": len(unlabeled), "augmented": n_aug,
               "augment_copies": copies, "transfer_to_labelled_ratio": round(len(texts) / max(len(labelled_texts), 1), 3),
               "texts": source, "stored_at": store.path}
    log(f"[kd-tasks nlp] transfer data: {len(unlabeled)} unlabelled + {n_aug} augmented texts for "
        f"{len(labelled_texts)} labelled ({summary['transfer_to_labelled_ratio']}:1; {source})")
    return texts, summary
