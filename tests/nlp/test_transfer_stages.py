"""Transfer data (unlabelled + augmented text through the teacher cache), two-stage recipes, the layer map of
an extracted student, label names, the recorded recipe and the model card."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
import transformers
from nlp_helpers import NEGATIVE, NEUTRAL, POSITIVE, sentences, tiny_config

from kd_tasks.nlp.augment import TransferSet, WordReplacer, embedding_neighbours, read_texts
from kd_tasks.nlp.distill import main, parse_args, resolve_layer_map
from kd_tasks.nlp.layer_map import evenly_spaced_layers, extraction_map
from kd_tasks.nlp.trainer import DistillationTrainer, KDArguments
from kd_tasks.shared.cache import TeacherCache


def common(out, **extra):
    argv = ["--output-dir", str(out), "--cpu", "--max-length", "16", "--eval-batch-size", "32",
            "--latency-batch-size", "4", "--seed", "0", "--disable-tqdm"]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return argv


@pytest.fixture(scope="module")
def unlabeled_txt(tmp_path_factory):
    path = tmp_path_factory.mktemp("transfer") / "transfer.txt"
    path.write_text("\n".join(" ".join(w) for w, _, _ in sentences(40, seed=11)) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- layer map follows the extraction


def test_extraction_map_pairs_each_layer_with_the_teacher_layer_it_was_copied_from():
    assert evenly_spaced_layers(3, 6) == [0, 3, 5]
    assert extraction_map([0, 3, 5], 6) == ((0, 0), (1, 1), (2, 4), (3, 6))
    # the README's 6-of-12 example: layers 0, 2, 4, 7, 9, 11 are copied
    assert extraction_map(evenly_spaced_layers(6, 12), 12) == ((0, 0), (1, 1), (2, 3), (3, 5), (4, 8), (5, 10), (6, 12))
    assert resolve_layer_map("auto", [0, 3, 5], 3, 6) == ((0, 0), (1, 1), (2, 4), (3, 6))
    assert resolve_layer_map("auto", None, 3, 6) == ((0, 0), (1, 2), (2, 4), (3, 6))  # not extracted: uniform
    assert resolve_layer_map("uniform", [0, 3, 5], 3, 6) == ((0, 0), (1, 2), (2, 4), (3, 6))


def test_extraction_map_matches_the_copied_weights(teacher_dir):
    """Student hidden state m equals the teacher's hidden state map[m] when the student runs the copied layers
    on the teacher's own input to that layer (checked for the first kept layer after the embeddings)."""
    from kd_tasks.nlp.extract import extract_student

    teacher = transformers.AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    student = extract_student(teacher, [0, 2, 3]).eval()
    ids = torch.tensor([[2, 6, 7, 8, 3]])
    with torch.no_grad():
        t = teacher(input_ids=ids, output_hidden_states=True).hidden_states
        s = student(input_ids=ids, output_hidden_states=True).hidden_states
    pairs = extraction_map([0, 2, 3], 4)
    torch.testing.assert_close(s[0], t[pairs[0][1]])
    torch.testing.assert_close(s[1], t[pairs[1][1]])  # layer 0 copied, same input: same output


# ----------------------------------------------------------------------------- augmentation


def test_word_replacer_uses_only_the_candidates_and_is_deterministic():
    neighbours = {"good": ["great", "fine"], "movie": ["film"]}
    rep = WordReplacer(neighbours=neighbours, prob=1.0, copies=3, seed=5)
    out = rep.augment("a good movie, really", 0)
    assert len(out) == 3
    for text in out:
        words = text.split()
        assert words[0] == "a" and words[1] in ("great", "fine") and words[2] == "film," and words[3] == "really"
    assert rep.augment("a good movie, really", 0) == out  # same seed and index: same copies
    assert WordReplacer(neighbours=neighbours, prob=1.0, copies=3, seed=6).augment("good " * 8, 0) != \
        rep.augment("good " * 8, 0)
    # prob 0.5 replaces about half of the words that have candidates
    many = WordReplacer(neighbours={"good": ["fine"]}, prob=0.5, copies=1, seed=0).augment("good " * 400, 1)[0]
    assert 150 < many.split().count("fine") < 250


def test_embedding_neighbours_are_the_nearest_by_cosine(tokenizer):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(tiny_config(len(tokenizer)))
    got = embedding_neighbours(model, tokenizer, ["good", "movie"], k=3)
    weight = torch.nn.functional.normalize(model.get_input_embeddings().weight.detach(), dim=-1)
    vocab = tokenizer.get_vocab()
    pool = [w for w in vocab if w.isalpha() and len(w) > 1 and not w.startswith("##")]
    for word in ("good", "movie"):
        sims = {w: float(weight[vocab[word]] @ weight[vocab[w]]) for w in pool if w != word}
        assert got[word] == sorted(sims, key=sims.get, reverse=True)[:3]


def test_masked_lm_candidates_are_its_top_predictions(tokenizer):
    torch.manual_seed(0)
    config = tiny_config(len(tokenizer))
    mlm = transformers.BertForMaskedLM(config).eval()
    rep = WordReplacer(mlm=mlm, tokenizer=tokenizer, prob=1.0, k=2, copies=1, seed=0)
    cands = rep._mlm_candidates("the good movie".split())
    enc = tokenizer(["the [MASK] movie"], return_tensors="pt")
    with torch.no_grad():
        logits = mlm(**enc).logits[0, 2]
    ranked = [t for t in tokenizer.convert_ids_to_tokens(logits.argsort(descending=True).tolist())
              if t.isalpha() and t != "good"]
    assert cands[1] == ranked[:2]
    assert rep.augment("the good movie", 0)[0].split()[1] in ranked[:2]


def test_read_texts_txt_and_csv_column(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("one\n\n two \n")
    assert read_texts(str(txt)) == ["one", "two"]
    table = tmp_path / "a.csv"
    table.write_text("review,stars\nfine film,5\nbad plot,1\n")
    assert read_texts(str(table), "review") == ["fine film", "bad plot"]
    with pytest.raises(Exception, match="no column 'text'"):
        read_texts(str(table))


# ----------------------------------------------------------------------------- the task loss ignores transfer rows


def test_transfer_rows_get_no_task_loss_and_gradients_reach_the_student_only(tokenizer):
    torch.manual_seed(0)
    student = transformers.BertForSequenceClassification(tiny_config(len(tokenizer), layers=2))
    teacher = transformers.BertForSequenceClassification(tiny_config(len(tokenizer)))
    args = transformers.TrainingArguments(output_dir="/tmp/unused-kd", use_cpu=True, report_to=[], save_strategy="no")
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args,
                                  kd_args=KDArguments(alpha_task=1.0, alpha_kd=0.0))
    enc = tokenizer(["good movie", "bad plot", "the film"], padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0, -100])
    student.train()
    loss = trainer.compute_loss(student, {**enc, "labels": labels})
    logits = student(**enc).logits
    expected = torch.nn.functional.cross_entropy(logits[:2], labels[:2])
    torch.testing.assert_close(loss, expected)
    # an all-transfer batch: no task term, a finite zero loss instead of nan
    only = trainer.compute_loss(student, {**enc, "labels": torch.full((3,), -100)})
    assert torch.isfinite(only) and only.item() == 0.0
    # with KD, the transfer row contributes through the teacher's soft labels; the teacher gets no gradient
    trainer.kd_args = KDArguments(alpha_task=0.5, alpha_kd=0.5)
    trainer._setup_terms()
    loss = trainer.compute_loss(student, {**enc, "labels": labels})
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.classifier.weight.grad is not None


# ----------------------------------------------------------------------------- end to end through the cache


def test_unlabelled_and_augmented_text_flow_through_the_cache(tmp_path, teacher_dir, sentiment_csv, unlabeled_txt,
                                                             capsys):
    cache = tmp_path / "cache"
    base = ["--teacher", teacher_dir, "--train-file", sentiment_csv["train"], "--validation-file",
            sentiment_csv["validation"], "--unlabeled-file", unlabeled_txt, "--augment-copies", "2",
            "--cache-teacher-logits", str(cache)]
    argv = base + common(tmp_path / "a", student_layers=2, epochs=1, batch_size=32, no_report=True,
                         save_strategy="no")
    assert main(argv) == 0
    stored = json.loads(open(str(cache) + ".transfer.json").read())
    assert stored["count"] == 40 + 2 * 96  # 40 unlabelled + 2 copies of the 96 labelled sentences
    teacher = transformers.AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    opened = TeacherCache.open(cache)
    assert len(opened) == 96 + 40 + 192
    # rows of the transfer texts hold the teacher's logits on exactly those texts
    tok = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    text = stored["texts"][0]
    enc = tok([text], truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        expected = teacher(**enc).logits[0].numpy()
    np.testing.assert_allclose(opened.lookup([96])["output"][0].numpy(), expected, rtol=1e-4, atol=1e-5)
    # second run: texts and logits reused (a hit), not regenerated
    capsys.readouterr()
    assert main(base + common(tmp_path / "b", student_layers=2, epochs=1, batch_size=32, no_report=True,
                              save_strategy="no")) == 0
    assert "stored" in capsys.readouterr().out
    # other augmentation settings: the stored texts are stale, refused in one line; --rebuild-cache rebuilds
    argv = base + ["--augment-prob", "0.9"] + common(tmp_path / "c", student_layers=2, epochs=1, no_report=True,
                                                     save_strategy="no")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "made from other inputs" in err and "--rebuild-cache" in err and "Traceback" not in err
    assert main(argv + ["--rebuild-cache", "--overwrite"]) == 0


# ----------------------------------------------------------------------------- two stages, resumable


def test_two_stage_recipe_runs_records_and_resumes_each_stage(tmp_path, teacher_dir, sentiment_csv, capsys):
    recipe = tmp_path / "two.yaml"
    recipe.write_text(
        "student-layers: 2\n"
        "stages:\n"
        "  - {name: intermediate, epochs: 1, alpha-task: 0, alpha-kd: 0, alpha-hidden: 1, alpha-attention: 1,"
        " attention-loss: kl}\n"
        "  - {name: logits, epochs: 1, alpha-task: 0.5, alpha-kd: 0.5}\n")
    out = tmp_path / "run"
    argv = ["--config", str(recipe), "--teacher", teacher_dir, "--train-file", sentiment_csv["train"],
            "--validation-file", sentiment_csv["validation"]] + common(out, batch_size=32, logging_steps=1)
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "teacher layers [0, 3] kept" in first and "stage 1/2 'intermediate'" in first
    assert (out / "stage1-intermediate" / "kd_stage_done.json").is_file()
    assert (out / "stage2-logits" / "kd_stage_done.json").is_file()
    report = json.loads((out / "kd_report.json").read_text())
    stages = report["recipe"]["stages"]
    assert [s["name"] for s in stages] == ["intermediate", "logits"]
    assert stages[0]["layer_map"] == [[0, 0], [1, 1], [2, 4]]  # copied from teacher layers 0 and 3
    assert report["recipe"]["kept_teacher_layers"] == [0, 3] and report["recipe"]["seed"] == 0
    card = (out / "README.md").read_text()
    assert "intermediate" in card and "accuracy" in card and teacher_dir in card
    history = json.loads(next((out / "stage1-intermediate").glob("checkpoint-*/trainer_state.json")).read_text())
    assert "loss_hidden" in history["log_history"][0] and "loss_kd" not in history["log_history"][0]
    final = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    stage2 = transformers.AutoModelForSequenceClassification.from_pretrained(out / "stage2-logits")
    for a, b in zip(final.state_dict().values(), stage2.state_dict().values()):
        torch.testing.assert_close(a, b)

    # an interrupted second stage: stage 1 is reused, stage 2 resumes from its own checkpoint
    os.remove(out / "stage2-logits" / "kd_stage_done.json")
    assert main(argv + ["--resume"]) == 0
    again = capsys.readouterr().out
    assert "stage 1/2 'intermediate' already done" in again and "stage 2/2 'logits'" in again
    # without --resume, the used directory (with its stage folders) is refused in one line
    assert main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_a_bad_stage_key_is_named(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("stages:\n  - {name: a, alpha-hiden: 1}\n")
    with pytest.raises(Exception, match="alpha-hidden"):
        parse_args(["--config", str(recipe), "--teacher", "t", "--output-dir", str(tmp_path / "o")])


# ----------------------------------------------------------------------------- labels and recipe precedence


def test_student_keeps_the_teacher_label_names_with_integer_labels(tmp_path, teacher_dir, sentiment_csv):
    named = tmp_path / "teacher_named"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    model.save_pretrained(named)
    transformers.AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(named)
    ids_csv = tmp_path / "ids.csv"
    with open(sentiment_csv["train"]) as src, open(ids_csv, "w", newline="") as dst:
        writer = csv.writer(dst)
        for i, row in enumerate(csv.reader(src)):
            writer.writerow(row if i == 0 else [row[0], {"negative": 0, "positive": 1}[row[1]]])
    out = tmp_path / "out"
    assert main(["--teacher", str(named), "--train-file", str(ids_csv)]
                + common(out, student_layers=2, max_steps=1, no_report=True, save_strategy="no")) == 0
    student = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert student.config.id2label == {0: "negative", 1: "positive"}
    tok = transformers.AutoTokenizer.from_pretrained(out)
    answer = transformers.pipeline("text-classification", model=student, tokenizer=tok)("good movie")[0]["label"]
    assert answer in ("negative", "positive")


def test_local_files_on_the_command_line_win_over_a_recipe_task(tmp_path, sentiment_csv):
    recipe = tmp_path / "glue.yaml"
    recipe.write_text("task: sst2\nstudent-layers: 2\n")
    args = parse_args(["--config", str(recipe), "--teacher", "t", "--output-dir", str(tmp_path / "o"),
                       "--train-file", sentiment_csv["train"]])
    assert args.task is None and args.train_file == sentiment_csv["train"]
    assert parse_args(["--config", str(recipe), "--teacher", "t", "--output-dir", str(tmp_path / "o")]).task == "sst2"


def test_transfer_store_refuses_other_inputs(tmp_path):
    store = TransferSet(str(tmp_path / "c"))
    store.save({"a": 1}, ["x", "y"])
    assert store.load({"a": 1}, rebuild=False) == ["x", "y"]
    assert store.load({"a": 1}, rebuild=True) is None
    with pytest.raises(Exception, match="other inputs"):
        store.load({"a": 2}, rebuild=False)


assert POSITIVE and NEGATIVE and NEUTRAL  # the vocabulary the tiny tokenizer knows
