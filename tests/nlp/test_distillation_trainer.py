"""DistillationTrainer: gradient accumulation, the frozen teacher, columns, logging, terms, checkpoints."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import transformers
from nlp_helpers import tiny_config
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from kd_tasks.nlp.data import KDCollator, add_teacher_inputs, load_raw, task_spec, tokenize
from kd_tasks.nlp.extract import extract_student, load_model, narrow_student
from kd_tasks.nlp.trainer import CONNECTORS_FILE, DistillationTrainer, KDArguments
from kd_tasks.shared.errors import KDConfigError

ALL_TERMS = dict(alpha_task=1.0, alpha_kd=1.0, alpha_hidden=1.0, alpha_attention=1.0, alpha_qkv_relation=1.0,
                 relation_heads=2)


def training_args(path, **overrides):
    values = dict(
        output_dir=str(path), per_device_train_batch_size=4, learning_rate=0.1, optim="sgd", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant", report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, max_steps=1,
    )
    values.update(overrides)
    return TrainingArguments(**values)


@pytest.fixture(scope="module")
def sentiment(sentiment_csv, tokenizer):
    raw = load_raw(train_file=sentiment_csv["train"], validation_file=sentiment_csv["validation"])
    spec = task_spec(raw, "classification")
    return raw, spec, tokenize(raw["train"], tokenizer, spec, max_length=16)


@pytest.fixture()
def teacher(teacher_dir):
    return load_model(teacher_dir, "classification", "teacher")


def narrow(teacher, seed=0):
    torch.manual_seed(seed)
    return narrow_student(teacher, {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 4,
                                    "intermediate_size": 32})


def make_trainer(student, teacher, data, tokenizer, kd, args, task="classification", **kw):
    torch.manual_seed(123)  # the projections' initialisation
    return DistillationTrainer(model=student, teacher=teacher, kd_args=kd, args=args, train_dataset=data,
                               processing_class=tokenizer, data_collator=KDCollator(tokenizer, task), **kw)


def token_setup(ner_json, tokenizer):
    raw = load_raw(train_file=ner_json, validation_fraction=0.2)
    spec = task_spec(raw, "token")
    torch.manual_seed(1)
    teacher = transformers.BertForTokenClassification(tiny_config(len(tokenizer), num_labels=spec.num_labels)).eval()
    return teacher, tokenize(raw["train"], tokenizer, spec, max_length=16)


@pytest.mark.parametrize("task", ["classification", "token"])
def test_gradient_accumulation_gives_the_large_batch_update(task, tmp_path, teacher, sentiment, tokenizer, ner_json):
    if task == "token":
        teacher, data = token_setup(ner_json, tokenizer)
    else:
        data = sentiment[2]
    data = data.select(range(7))  # micro-batches of 4 and 3 examples with different token counts
    student = narrow(teacher)
    kd = KDArguments(task_type=task, **ALL_TERMS)
    results = []
    for batch, accumulation in ((7, 1), (4, 2)):
        args = training_args(tmp_path / f"b{batch}", per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation)
        trainer = make_trainer(copy.deepcopy(student), teacher, data, tokenizer, kd, args, task)
        trainer.train()
        params = dict(trainer.model.named_parameters())
        params.update({f"connector.{k}": v for k, v in trainer.connectors.named_parameters()})
        results.append({k: v.detach().clone() for k, v in params.items()})
    big, accumulated = results
    assert "connector.hidden.proj.weight" in big  # the projection is trained too
    moved = max((big[k] - v).abs().max().item() for k, v in student.named_parameters())
    assert moved > 1e-4
    for name, value in big.items():
        torch.testing.assert_close(accumulated[name], value, atol=2e-6, rtol=1e-5, msg=name)


def test_teacher_is_frozen_in_eval_mode_and_outside_the_optimizer(tmp_path, teacher, sentiment, tokenizer):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()  # the trainer must put it in eval mode itself
    trainer = make_trainer(extract_student(teacher, 2), teacher, sentiment[2].select(range(8)), tokenizer,
                           KDArguments(**ALL_TERMS), training_args(tmp_path, max_steps=2))
    trainer.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert trainer.teacher is teacher and all(m is not teacher for m in trainer.model_wrapped.modules())
    assert next(teacher.parameters()).device == trainer.args.device


def test_teacher_runs_under_the_trainers_mixed_precision(tmp_path, teacher, sentiment, tokenizer):
    dtypes = []
    handle = teacher.classifier.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    try:
        trainer = make_trainer(extract_student(teacher, 2), teacher, sentiment[2].select(range(8)), tokenizer,
                               KDArguments(), training_args(tmp_path, bf16=True))
        trainer.train()
    finally:
        handle.remove()
    assert dtypes == [torch.bfloat16]  # autocast on the teacher's forward, as on the student's
    assert next(teacher.parameters()).dtype == torch.float32


def test_teacher_columns_survive_remove_unused_columns(tmp_path, teacher, sentiment, tokenizer):
    raw, spec, data = sentiment
    data = add_teacher_inputs(data, raw["train"], tokenizer, spec).select(range(8))
    kd = KDArguments(teacher_inputs="separate", alpha_task=0.0, alpha_kd=1.0)
    args = training_args(tmp_path, remove_unused_columns=True)
    trainer = DistillationTrainer(model=narrow(teacher), teacher=teacher, kd_args=kd, args=args,
                                  train_dataset=data, processing_class=tokenizer,
                                  data_collator=KDCollator(tokenizer, teacher_tokenizer=tokenizer))
    kept = trainer._remove_unused_columns(data).column_names
    assert {"teacher_input_ids", "teacher_attention_mask", "kd_index", "input_ids", "labels"} <= set(kept)
    trainer.train()  # would raise "no teacher_input_ids" if the column had been dropped
    assert trainer.state.log_history[0]["loss_kd"] > 0
    with pytest.raises(KDConfigError, match="sequence-level"):
        DistillationTrainer(model=extract_student(teacher, 2), teacher=teacher, args=args,
                            kd_args=KDArguments(teacher_inputs="separate", alpha_hidden=1.0))


def test_each_term_is_logged_separately(tmp_path, teacher, sentiment, tokenizer):
    trainer = make_trainer(narrow(teacher), teacher, sentiment[2].select(range(8)), tokenizer,
                           KDArguments(**ALL_TERMS), training_args(tmp_path, max_steps=2))
    trainer.train()
    logged = trainer.state.log_history[0]
    for term in ("loss_task", "loss_kd", "loss_hidden", "loss_attention", "loss_qkv_relation"):
        assert term in logged and logged[term] > 0, term
    weighted = sum(logged[t] for t in ("loss_task", "loss_kd", "loss_hidden", "loss_attention", "loss_qkv_relation"))
    assert logged["loss"] == pytest.approx(weighted, rel=1e-3)


def kl_rows(p_t, p_s, mask):
    """mean over heads and real query tokens of KL(p_t || p_s), padded keys having probability 0."""
    kl = (p_t * (p_t.clamp_min(1e-30).log() - p_s.clamp_min(1e-30).log())).sum(-1)  # (B, H, L)
    keep = mask[:, None, :].expand_as(kl)
    return kl[keep].mean()


def test_intermediate_terms_equal_their_formulas_on_model_outputs(tmp_path, teacher, sentiment, tokenizer):
    """Hidden MSE through the projection, and MiniLM attention KL against HF's own attention probabilities."""
    teacher.set_attn_implementation("eager")
    student = narrow(teacher)
    student.set_attn_implementation("eager")
    batch = KDCollator(tokenizer)([sentiment[2][i] for i in range(6)])
    inputs = {k: v for k, v in batch.items() if k not in ("kd_index",)}
    mask = inputs["attention_mask"].bool()

    kd = KDArguments(alpha_task=0.0, alpha_kd=0.0, alpha_hidden=1.0, layer_map="uniform")
    trainer = make_trainer(student, teacher, None, tokenizer, kd, training_args(tmp_path))
    student.train()
    got = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        s_h = student(**inputs, output_hidden_states=True).hidden_states
        t_h = teacher(**inputs, output_hidden_states=True).hidden_states
    pairs = [(0, 0), (1, 2), (2, 4)]
    expected = 0.0
    for s, t in pairs:
        proj = trainer.connectors["embeddings" if s == 0 else "hidden"]
        diff = (proj(s_h[s]) - t_h[t])[mask]  # (real tokens, 32)
        expected += diff.pow(2).mean() / len(pairs)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)

    kd = KDArguments(alpha_task=0.0, alpha_kd=0.0, alpha_attention=1.0, attention_loss="kl", layer_map="last")
    trainer = make_trainer(student, teacher, None, tokenizer, kd, training_args(tmp_path))
    got = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        a_s = student(**inputs, output_attentions=True).attentions[-1]
        a_t = teacher(**inputs, output_attentions=True).attentions[-1]
    assert got.item() == pytest.approx(kl_rows(a_t, a_s, mask).item(), rel=1e-4)


def test_distillation_weight_zero_is_plain_training(tmp_path, teacher, sentiment, tokenizer):
    data = sentiment[2].select(range(8))
    student = extract_student(teacher, 2)
    calls = []
    handle = teacher.register_forward_hook(lambda *a: calls.append(1))
    kd = KDArguments(alpha_task=1.0, alpha_kd=0.0)
    distilled = make_trainer(copy.deepcopy(student), teacher, data, tokenizer, kd, training_args(tmp_path / "a", max_steps=2))
    distilled.train()
    handle.remove()
    plain = Trainer(model=copy.deepcopy(student), args=training_args(tmp_path / "b", max_steps=2), train_dataset=data,
                    processing_class=tokenizer, data_collator=KDCollator(tokenizer))
    plain.train()
    assert not calls
    for (name, a), b in zip(distilled.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_checkpoints_keep_projections_resume_and_save_model_writes_the_student(tmp_path, teacher, sentiment, tokenizer):
    data = sentiment[2].select(range(8))
    kd = KDArguments(alpha_task=1.0, alpha_kd=1.0, alpha_hidden=1.0)
    student = narrow(teacher)

    straight = make_trainer(copy.deepcopy(student), teacher, data, tokenizer, kd,
                            training_args(tmp_path / "straight", per_device_train_batch_size=8, max_steps=2))
    straight.train()

    first = make_trainer(copy.deepcopy(student), teacher, data, tokenizer, kd,
                         training_args(tmp_path / "resumed", per_device_train_batch_size=8, max_steps=2,
                                       save_strategy="steps", save_steps=1))
    first.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-1"
    assert (checkpoint / CONNECTORS_FILE).is_file()
    second = make_trainer(copy.deepcopy(student), teacher, data, tokenizer, kd,
                          training_args(tmp_path / "resumed", per_device_train_batch_size=8, max_steps=2))
    second.train(resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(straight.model.named_parameters(), second.model.parameters()):
        torch.testing.assert_close(b, a, msg=name)
    torch.testing.assert_close(second.connectors["hidden"].proj.weight, straight.connectors["hidden"].proj.weight)

    out = tmp_path / "student"
    second.save_model(str(out))
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files and CONNECTORS_FILE not in files
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = KDCollator(tokenizer)([data[i] for i in range(4)])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    second.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, second.model(**inputs).logits)
    assert reloaded.config.num_hidden_layers == 2 and reloaded.config.hidden_size == 16


def test_attention_terms_need_matching_heads(tmp_path, teacher):
    student = narrow_student(teacher, {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2})
    with pytest.raises(KDConfigError, match="qkv-relation"):
        DistillationTrainer(model=student, teacher=teacher, args=training_args(tmp_path),
                            kd_args=KDArguments(alpha_attention=1.0))
    with pytest.raises(KDConfigError, match="relation-heads 3"):
        DistillationTrainer(model=student, teacher=teacher, args=training_args(tmp_path),
                            kd_args=KDArguments(alpha_qkv_relation=1.0, relation_heads=3))


@pytest.mark.parametrize("task", ["regression", "multilabel"])
def test_regression_and_multilabel_use_their_kd_losses(task, tmp_path, tokenizer):
    """Regression: MSE to the teacher's prediction; multi-label: T² · BCE to sigmoid(teacher / T)."""
    import json

    path = tmp_path / "d.jsonl"
    with open(path, "w") as f:
        for i, word in enumerate(["good", "bad", "fine", "awful", "nice", "sad"]):
            label = float(i % 3) if task == "regression" else [["a"], ["b"], ["a", "c"]][i % 3]
            f.write(json.dumps({"sentence": f"the film was {word}", "label": label}) + "\n")
    raw = load_raw(train_file=str(path), validation_file=str(path))
    spec = task_spec(raw, task)
    data = tokenize(raw["train"], tokenizer, spec)
    torch.manual_seed(0)
    config = tiny_config(len(tokenizer), num_labels=spec.num_labels)
    config.problem_type = "regression" if task == "regression" else "multi_label_classification"
    teacher = transformers.BertForSequenceClassification(config).eval()
    student = narrow(teacher)
    kd = KDArguments(task_type=task, alpha_task=0.0, alpha_kd=1.0, temperature=2.0)
    trainer = make_trainer(student, teacher, data, tokenizer, kd, training_args(tmp_path))
    batch = KDCollator(tokenizer)([data[i] for i in range(6)])
    student.train()
    got = trainer.compute_loss(student, dict(batch))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        s, t = student(**inputs).logits.double(), teacher(**inputs).logits.double()
    if task == "regression":
        expected = ((s - t) ** 2).mean()
    else:
        q_s, q_t = torch.sigmoid(s / 2), torch.sigmoid(t / 2)
        expected = 4 * -(q_t * q_s.log() + (1 - q_t) * (1 - q_s).log()).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert batch["labels"].dtype == torch.float32
