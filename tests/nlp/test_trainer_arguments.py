"""The Trainer-native interface: every TrainingArguments flag (snake and kebab case) on the command line,
DistillationArguments as a TrainingArguments subclass, recipes as that dataclass in YAML, KD loss options."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import HfArgumentParser, TrainingArguments

from kd_tasks.nlp.arguments import DistillationArguments
from kd_tasks.nlp.distill import _training_arguments, main, parse_args
from kd_tasks.nlp.trainer import DistillationTrainer, KDArguments, KDTrainer
from kd_tasks.shared.losses.logit import KDLoss

BASE = ["--teacher", "t", "--output-dir", "/tmp/kd-args-unused"]


@pytest.mark.parametrize("spelling", ["snake", "kebab"])
def test_trainer_flags_reach_the_training_arguments(spelling):
    def flag(name):
        return "--" + (name if spelling == "snake" else name.replace("_", "-"))

    args = parse_args(BASE + [flag("lr_scheduler_type"), "cosine", flag("per_device_train_batch_size"), "8",
                              flag("num_train_epochs"), "4", flag("eval_steps"), "7", flag("label_smoothing_factor"),
                              "0.1", flag("dataloader_drop_last"), flag("student_layers"), "2",
                              flag("alpha_kd"), "0.7"])
    targs = _training_arguments(args)
    assert isinstance(targs, TrainingArguments)
    assert getattr(targs.lr_scheduler_type, "value", targs.lr_scheduler_type) == "cosine"
    assert targs.per_device_train_batch_size == 8
    assert targs.num_train_epochs == 4 and targs.eval_steps == 7 and targs.label_smoothing_factor == 0.1
    assert targs.dataloader_drop_last is True
    assert args.student_layers == 2 and args.alpha_kd == 0.7 and args.batch_size == 8 and args.epochs == 4


def test_kd_tasks_short_names_still_work_and_trainer_values_win_only_when_given():
    args = parse_args(BASE + ["--epochs", "2", "--batch-size", "4", "--cpu", "--save-strategy", "no"])
    targs = _training_arguments(args)
    assert targs.num_train_epochs == 2 and targs.per_device_train_batch_size == 4 and targs.use_cpu
    assert getattr(targs.save_strategy, "value", targs.save_strategy) == "no"
    assert targs.disable_tqdm is False  # the Trainer's progress bar is on by default


def test_a_wrong_trainer_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(BASE + ["--lr_scheduler_type", "sideways"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "lr_scheduler_type" in err and "Traceback" not in err and err.count("\n") == 1


def test_distillation_arguments_extend_training_arguments_and_read_a_yaml_recipe(tmp_path):
    assert issubclass(DistillationArguments, TrainingArguments)
    names = {f.name for f in dataclasses.fields(DistillationArguments)}
    assert {"teacher", "student_layers", "alpha_kd", "unlabeled_file", "stages", "kd_divergence"} <= names
    assert {"learning_rate", "num_train_epochs", "lr_scheduler_type"} <= names
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: out\nteacher: ./t\nstudent_layers: 3\nalpha_kd: 0.9\nnum_train_epochs: 5\n"
                      "lr_scheduler_type: constant\n")
    (parsed,) = HfArgumentParser(DistillationArguments).parse_yaml_file(str(recipe))
    assert parsed.student_layers == 3 and parsed.alpha_kd == 0.9 and parsed.num_train_epochs == 5
    (cli,) = HfArgumentParser(DistillationArguments).parse_args_into_dataclasses(
        ["--output_dir", "o", "--teacher", "t", "--student-layers", "2", "--per-device-train-batch-size", "4"])
    assert cli.student_layers == 2 and cli.per_device_train_batch_size == 4


def test_a_recipe_may_hold_trainer_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("student-layers: 2\nlr_scheduler_type: constant\nwarmup: 0\n")
    args = parse_args(["--config", str(recipe)] + BASE)
    scheduler = _training_arguments(args).lr_scheduler_type
    assert getattr(scheduler, "value", scheduler) == "constant"


def test_divergence_options_reach_the_kd_loss(tokenizer):
    import transformers
    from nlp_helpers import tiny_config

    model = transformers.BertForSequenceClassification(tiny_config(len(tokenizer), layers=1))
    targs = TrainingArguments(output_dir="/tmp/kd-args-unused", use_cpu=True, report_to=[])
    tr = DistillationTrainer(model=model, teacher=model, args=targs,
                             kd_args=KDArguments(kd_divergence="jsd", jsd_beta=0.3, logit_standardization=True))
    assert isinstance(tr.logit_loss, KDLoss)
    assert (tr.logit_loss.divergence, tr.logit_loss.beta, tr.logit_loss.standardize) == ("jsd", 0.3, True)
    assert KDTrainer is DistillationTrainer
    args = parse_args(BASE + ["--kd-divergence", "reverse_kl", "--logit-standardization"])
    assert args.kd_divergence == "reverse_kl" and args.logit_standardization is True


def test_lr_is_the_learning_rate_flag_and_shown_in_help():
    from kd_tasks.nlp.distill import build_parser

    for flag in ("--lr", "--learning-rate", "--learning_rate"):
        args = parse_args(BASE + [flag, "0.003"])
        assert args.learning_rate == 0.003
        assert _training_arguments(args).learning_rate == 0.003
    assert parse_args(BASE).learning_rate == 5e-5  # the default is unchanged
    assert "--lr LEARNING_RATE" in build_parser().format_help()


def test_recipe_is_the_config_flag_and_shown_in_help(tmp_path):
    from kd_tasks.nlp.distill import build_parser

    recipe = tmp_path / "r.yaml"
    recipe.write_text("student-layers: 2\nalpha_kd: 0.8\nlr: 0.002\n")  # lr: a recipe key may be any spelling
    by_recipe = parse_args(["--recipe", str(recipe)] + BASE)
    by_config = parse_args(["--config", str(recipe)] + BASE)
    assert (by_recipe.student_layers, by_recipe.alpha_kd, by_recipe.learning_rate) == (2, 0.8, 0.002)
    assert vars(by_recipe) == vars(by_config)
    assert parse_args(["--recipe", str(recipe), "--lr", "0.01"] + BASE).learning_rate == 0.01  # the command line wins
    assert "--config CONFIG, --recipe CONFIG" in build_parser().format_help()
