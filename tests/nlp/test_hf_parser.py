"""``DistillationArguments`` is the source of truth of ``kd-tasks nlp``: an explicit ``TrainingArguments``
dataclass, read by ``HfArgumentParser`` exactly as the command line reads it."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys

import pytest
from transformers import HfArgumentParser, TrainingArguments

from kd_tasks.nlp import arguments
from kd_tasks.nlp.arguments import DistillationArguments
from kd_tasks.nlp.distill import _training_arguments, arguments_namespace, build_parser, main, parse_args, run_arguments
from kd_tasks.shared.errors import KDConfigError

OUT = "/tmp/kd-hf-parser-unused"
BASE = ["--teacher", "t", "--output-dir", OUT]

# every kd-tasks option, by the name the run reads (the aliased Trainer fields by kd-tasks' short name)
KD_OPTIONS = {
    "teacher", "teacher_tokenizer", "student", "student_layers", "student_layer_ids", "student_shape",
    "student_hidden_size", "student_heads", "student_intermediate_size",
    "task", "task_type", "train_file", "validation_file", "text_column", "text_pair_column", "label_column",
    "max_length", "doc_stride", "max_train_samples", "max_eval_samples", "unlabeled_file", "unlabeled_column",
    "unlabeled_ratio", "augment_copies", "augment_prob", "augment_k", "augment_mlm", "augment_neighbours",
    "temperature", "alpha_task", "alpha_kd", "kd_divergence", "jsd_beta", "logit_standardization", "hidden_loss",
    "alpha_hidden", "attention_loss", "alpha_attention", "alpha_value_relation", "alpha_qkv_relation",
    "relation_heads", "layer_map", "teacher_inputs", "cache_teacher_logits", "cache_top_k", "rebuild_cache", "stages",
    "output_dir", "epochs", "max_steps", "batch_size", "eval_batch_size", "gradient_accumulation_steps",
    "learning_rate", "weight_decay", "warmup", "max_grad_norm", "seed", "fp16", "bf16", "cpu", "logging_steps",
    "save_steps", "save_total_limit", "save_strategy", "threads", "disable_tqdm", "resume", "overwrite", "report_to",
    "latency_batch_size", "no_report", "export", "quantize",
}

SAME_OPTIONS = [
    BASE,
    # Trainer flags in both spellings, kd-tasks' short names of Trainer fields, kd options in both spellings
    BASE + ["--lr_scheduler_type", "cosine", "--per-device-train-batch-size", "8", "--num_train_epochs", "4",
            "--eval-steps", "7", "--label_smoothing_factor", "0.1", "--dataloader-drop-last", "--warmup_steps", "5",
            "--use-cpu", "--eval_batch_size", "3", "--student_layers", "2", "--alpha-kd", "0.7", "--report_to",
            "tensorboard", "--kd_divergence", "jsd", "--logit-standardization"],
    BASE + ["--epochs", "2", "--batch-size", "4", "--cpu", "--warmup", "0", "--lr", "0.003", "--save-steps", "10",
            "--resume", "--optim", "adafactor", "--no-dataloader-pin-memory", "--max_steps", "9"],
    BASE + ["--student-shape", "tinybert-4l-312", "--save_strategy", "no", "--quantize", "--export", "onnx",
            "--adam-beta1", "0.8", "--weight_decay", "0", "--seed", "3", "--cache-top-k", "5"],
]


def trainer_settings(args) -> dict:
    out = _training_arguments(args).to_dict()
    out.pop("logging_dir", None)  # a time stamp
    return out


@pytest.mark.parametrize("argv", SAME_OPTIONS, ids=range(len(SAME_OPTIONS)))
def test_hf_argument_parser_and_the_command_line_give_the_same_run(argv):
    (dargs,) = HfArgumentParser(DistillationArguments).parse_args_into_dataclasses(list(argv))
    assert isinstance(dargs, TrainingArguments)
    from_dataclass, from_cli = arguments_namespace(dargs), parse_args(list(argv))
    assert vars(from_dataclass) == vars(from_cli)
    assert trainer_settings(from_dataclass) == trainer_settings(from_cli)


def test_the_values_reach_the_run_under_kd_tasks_names():
    (dargs,) = HfArgumentParser(DistillationArguments).parse_args_into_dataclasses(SAME_OPTIONS[1])
    args = arguments_namespace(dargs)
    assert (args.batch_size, args.epochs, args.warmup, args.cpu, args.eval_batch_size) == (8, 4.0, 5.0, True, 3)
    assert (args.lr_scheduler_type, args.report_to, args.kd_divergence, args.student_layers) == (
        "cosine", "tensorboard", "jsd", 2)
    assert args.dataloader_drop_last is True and args.logit_standardization is True
    assert not hasattr(args, "per_device_train_batch_size") and not hasattr(args, "eval_strategy")
    # the Trainer's view of the same object: kd-tasks' "every epoch unless --save-steps", its enums
    assert dargs.save_strategy == "epoch" and args.save_strategy is None and args.save_steps is None
    assert dargs.report_to == ["tensorboard"]


def test_every_kd_option_is_an_explicit_field_of_the_dataclass():
    fields = {f.name: f for f in dataclasses.fields(DistillationArguments)}
    assert set(arguments.kd_option_names()) == KD_OPTIONS
    for _, group in arguments.GROUPS:  # declared in the class bodies of the four option groups
        for field in dataclasses.fields(group):
            assert field.name in group.__annotations__ and field.metadata["help"]
            assert fields[field.name] is field
    names = {arguments.ALIASES.get(n, n) for n in KD_OPTIONS}
    assert names <= set(fields) and {f.name for f in dataclasses.fields(TrainingArguments)} <= set(fields)
    assert fields["per_device_train_batch_size"].default == 32 and fields["kd_divergence"].metadata["choices"]


def test_every_kd_option_is_read_in_both_spellings_and_the_short_names_are_the_trainers():
    parser = build_parser()
    table = parser._option_string_actions
    for name in KD_OPTIONS:
        field = arguments.ALIASES.get(name, name)
        spellings = {f"--{name}", f"--{name.replace('_', '-')}", f"--{field}", f"--{field.replace('_', '-')}"}
        assert {table[s] for s in spellings} == {table[f"--{field}"]}, name
        assert table[f"--{field}"].dest == field
    assert table["--lr"] is table["--learning_rate"]


def test_python_defaults_are_the_command_line_defaults():
    dargs = DistillationArguments(output_dir=OUT, teacher="t")
    from_dataclass, from_cli = arguments_namespace(dargs), parse_args(BASE)
    assert {k: getattr(from_dataclass, k) for k in KD_OPTIONS} == {k: getattr(from_cli, k) for k in KD_OPTIONS}
    assert trainer_settings(from_dataclass) == trainer_settings(from_cli)
    assert (dargs.per_device_train_batch_size, dargs.weight_decay, dargs.logging_steps) == (32, 0.01, 50)


def test_changes_after_construction_reach_the_run():
    dargs = DistillationArguments(output_dir=OUT, teacher="t", lr_scheduler_type="cosine")
    dargs.alpha_kd, dargs.lr_scheduler_type, dargs.per_device_train_batch_size = 0.9, "constant", 7
    args = arguments_namespace(dargs)
    assert (args.alpha_kd, args.lr_scheduler_type, args.batch_size) == (0.9, "constant", 7)
    copy = pickle.loads(pickle.dumps(dargs))
    assert type(copy) is DistillationArguments and copy.alpha_kd == 0.9


def test_a_dataclass_without_teacher_or_with_a_bad_value_is_refused():
    with pytest.raises(KDConfigError, match="missing teacher"):
        run_arguments(DistillationArguments(output_dir=OUT))
    with pytest.raises(KDConfigError, match="--kd-divergence must be one of"):
        arguments_namespace(DistillationArguments(output_dir=OUT, teacher="t", kd_divergence="l2"))
    with pytest.raises(KDConfigError, match="--cpu must be true or false"):
        arguments_namespace(DistillationArguments(output_dir=OUT, teacher="t", use_cpu="often"))


def test_help_lists_kd_groups_first_with_defaults_then_the_trainers_short():
    text = build_parser().format_help()
    order = [text.index(f"\n{title}:\n") for title in ("models", "data", "distillation", "training")]
    assert order == sorted(order) and order[-1] < text.index(arguments.TRAINER_GROUP)
    assert "--batch-size BATCH_SIZE, --batch_size BATCH_SIZE, --per-device-train-batch-size" in text
    assert "training batch per device (default: 32)" in " ".join(text.split())
    assert "--cpu, --use-cpu, --use_cpu" in text  # a true/false option shows no metavar
    trainer_part = text[text.index(arguments.TRAINER_GROUP):]
    assert "--lr_scheduler_type" in trainer_part and "--per_device_train_batch_size" not in trainer_part
    assert "…" in trainer_part and "(default: linear)" in " ".join(trainer_part.split())


def test_recipe_keys_in_any_spelling_and_a_flag_that_is_not_true_or_false(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("batch_size: 16\nnum-train-epochs: 2\nuse_cpu: true\nwarmup_steps: 0\nadam_beta1: 0.85\n")
    args = parse_args(["--config", str(recipe)] + BASE + ["--epochs", "5"])
    assert (args.batch_size, args.epochs, args.cpu, args.warmup, args.adam_beta1) == (16, 5.0, True, 0.0, 0.85)
    recipe.write_text("batch-sise: 16\n")
    with pytest.raises(KDConfigError, match="did you mean 'batch-size'"):
        parse_args(["--config", str(recipe)] + BASE)
    recipe.write_text("fp16: 'no'\n")  # argparse would read the text 'no' as a true/false word
    with pytest.raises(KDConfigError, match="--fp16 .*must be true or false, got 'no'"):
        parse_args(["--config", str(recipe)] + BASE)


@pytest.mark.parametrize("extra, named", [(["--fp16", "maybe"], "--fp16"), (["--epoch", "3"], "--epoch"),
                                          (["--batch-size", "many"], "--batch-size")])
def test_bad_options_are_one_line(extra, named, capsys):
    with pytest.raises(SystemExit) as stop:
        main(BASE + extra)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kd-tasks nlp: error:") and named in err and err.count("\n") == 1


def test_importing_the_package_does_not_import_transformers():
    code = ("import sys, kd_tasks.nlp, kd_tasks.nlp.arguments, kd_tasks.nlp.distill; "
            "assert 'transformers' not in sys.modules; "
            "from kd_tasks.nlp import DistillationArguments as a; from kd_tasks.nlp.arguments import "
            "DistillationArguments as b; import transformers; assert a is b and issubclass(a, "
            "transformers.TrainingArguments)")
    subprocess.run([sys.executable, "-c", code], check=True)
