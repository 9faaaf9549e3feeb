"""``kd-tasks classify``: distil an image classifier with any scheme recipe, in one command.

Any recipe of ``configs/shared`` runs: offline (``distill`` section), mutual (DML / ONE / OKDDip),
self (BYOT, previous epoch), multi-teacher, adversarial, and TAKD, whose chain
``teacher -> assistant(s) -> student`` is trained stage after stage by this one command.

Data: a torchvision ``ImageFolder`` tree with ``train/`` and ``val/`` sub-folders (``--data DIR``;
classes are the sub-folder names in sorted order; images resized to ``--image-size``, random
horizontal flips for training, ImageNet mean/std), or scikit-learn's bundled 8x8 digits
(``--dataset digits``, no download; 70/30 stratified split, standardised).

Models: any torchvision classification model by name (``resnet18``, ``mobilenet_v3_small``, ...;
built with ``num_classes``, randomly initialised), or the built-in small CNN ``cnn:W`` (stages
``layer1..layer4`` of widths W, 2W, 4W, 8W, then ``avgpool`` and ``fc``, named like a ResNet so the
shipped recipes' taps apply) or ``cnn:A-B-C`` (explicit stage widths).

The teacher comes from ``--teacher-weights`` (a state_dict read with ``torch.load(weights_only=True)``,
or a ``.safetensors`` file such as an exported student), or is trained first for
``--train-teacher-epochs`` epochs. Before distilling, each teacher is scored on a spread of
validation images; a score near chance is reported loudly (weights not loaded, other class order,
other preprocessing).

Outputs under ``--output-dir``: one sub-directory per trained model (``teacher``, ``assistant1``,
..., ``student``, ``baseline``) with checkpoints, logs and ``loss_curves.png`` (one panel per logged
term); the student's weights in ``student/export/model.safetensors`` (``--export onnx``: also
``student/export/model.onnx``, checked against PyTorch with onnxruntime); accuracies in
``results.json``; the compression report (:mod:`kd_tasks.shared.report`) in ``report.md``,
``report.json`` and ``report.png``.

The plain baseline: unless ``--no-baseline``, the student's architecture is also trained alone
(cross-entropy only) in ``baseline/``, from the same initial weights and with the same batch order as
the distilled student, so the report compares them on equal terms (paired).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .shared.checkpoint import prepare_output_dir
from .shared.config import check_keys, load_config
from .shared.distiller import Distiller
from .shared.errors import ArgumentParser, KDConfigError, run_cli, suggest
from .shared.registry import SCHEMES
from .shared.schemes import RECIPE_KEYS, AssistantChain, MutualLearning, SelfDistillation, scheme_from_recipe
from .shared.training import TrainConfig, Trainer
from .shared.validate import AT_LEAST_2, NON_NEG_INT, NON_NEGATIVE, POS_INT, POSITIVE, check_recipe_numbers, check_rules

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples kept as written; every option's default shown (unless None/False, i.e. "not given")."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CHECK_IMAGES = 256  # validation images scored by the teacher check


# ----------------------------------------------------------------------------- data


class Pairs(torch.utils.data.Dataset):
    """``(x[i], y[i])`` samples of two tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def digits(image_size: int | None = None, channels: int = 1) -> tuple[Pairs, Pairs, str]:
    """scikit-learn's bundled digits (1,797 8x8 grey images, 10 classes), split 70/30 stratified
    (seed 0), standardised with the training mean/std; optionally resized (bilinear) and repeated to
    ``channels`` channels. Returns ``(train, test, description)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=0.3, stratify=d.target, random_state=0)
    tr, te = torch.tensor(tr), torch.tensor(te)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    size = 8
    if image_size and image_size != 8:
        x = nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        size = image_size
    if channels != 1:
        x = x.expand(-1, channels, -1, -1).contiguous()
    return Pairs(x[tr], y[tr]), Pairs(x[te], y[te]), f"sklearn digits: {len(tr)} train / {len(te)} test, {size}x{size}"


def _torchvision():
    try:
        import torchvision
    except ImportError as e:
        raise KDConfigError("torchvision models and ImageFolder data need torchvision: pip install torchvision") from e
    return torchvision


def image_folder(root: str | Path, image_size: int) -> tuple[Any, Any, list[str]]:
    """``root/train`` and ``root/val`` as torchvision ``ImageFolder`` datasets (RGB, resized to
    ``image_size``; training images flipped at random). Returns ``(train, val, class_names)``."""
    tv = _torchvision()
    from torchvision import transforms as T

    root = Path(root)
    if not root.is_dir():
        raise KDConfigError(f"--data {str(root)!r} is not a directory",
                            hint=f"give a folder with train/<class>/*.png and val/<class>/*.png")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise KDConfigError(f"--data {str(root)!r}: no {split}/ sub-folder; expected {root}/train/<class>/*.png "
                                f"and {root}/val/<class>/*.png")
        check_class_folders(root / split)
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    resize = T.Resize((image_size, image_size))
    train = tv.datasets.ImageFolder(str(root / "train"), T.Compose([resize, T.RandomHorizontalFlip(), *norm]))
    val = tv.datasets.ImageFolder(str(root / "val"), T.Compose([resize, *norm]))
    if train.classes != val.classes:
        raise KDConfigError(f"--data {str(root)!r}: train/ has classes {train.classes}, val/ has {val.classes}")
    return train, val, train.classes


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def check_class_folders(split: Path) -> None:
    """At least two class folders, each holding at least one image file, every image readable by PIL.

    Opening (not decoding) every image costs a file header read each; it turns a non-image file
    into one clear error naming it instead of a crash in the middle of training."""
    from PIL import Image, UnidentifiedImageError

    classes = sorted(d for d in split.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise KDConfigError(f"--data: {str(split)!r} has {len(classes)} class folder(s); classification needs at least 2",
                            hint=f"put each class's images in its own folder: {split}/<class>/*.png")
    for folder in classes:
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise KDConfigError(f"--data: class folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})",
                                hint="add images or remove the folder")
        for f in files:
            try:
                with Image.open(f) as img:
                    img.verify()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise KDConfigError(f"--data: {str(f)!r} is not a readable image ({type(e).__name__})",
                                    hint="remove the file or replace it with a valid image") from None


# ----------------------------------------------------------------------------- models


def block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Net(nn.Module):
    """A small CNN named like a ResNet: conv stages ``layer1..layerN`` (3x3 conv, BN, ReLU), ``avgpool``, ``fc``.

    Strides: ``layer1`` 2 for images larger than 16 px (else 1), ``layer2`` 2, ``layer3`` 2 above
    32 px, ``layer4`` 2 above 64 px, and so on (else 1).
    """

    def __init__(self, widths: Sequence[int], size: int, classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.depth = len(widths)
        cin = in_channels
        for i, w in enumerate(widths):
            stride = 2 if i == 1 or size > 16 * 2 ** max(i - 1, 0) else 1
            setattr(self, f"layer{i + 1}", block(cin, w, stride))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.depth):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def is_builtin(name: str) -> bool:
    return name.split(":")[0] == "cnn"


def cnn_widths(name: str) -> tuple[int, ...]:
    """``cnn:W`` -> (W, 2W, 4W, 8W); ``cnn:A-B-C`` -> (A, B, C)."""
    spec = name.partition(":")[2]
    try:
        widths = tuple(int(w) for w in spec.split("-"))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise KDConfigError(f"model {name!r}: write the built-in CNN as cnn:WIDTH (e.g. cnn:16) or cnn:A-B-C (stage widths)")
    return tuple(widths[0] * 2 ** i for i in range(4)) if len(widths) == 1 else widths


def check_model_name(name: str) -> None:
    """Refuse an unknown model name (before any training), with the closest known names."""
    if is_builtin(name):
        cnn_widths(name)
        return
    tv = _torchvision()
    known = tv.models.list_models(module=tv.models)
    if name not in known:
        raise KDConfigError(f"model: {suggest(name, known + ['cnn:WIDTH'], 'model')}")


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """A randomly initialised classifier: ``cnn:...`` (built in) or a torchvision model name."""
    if is_builtin(name):
        return Net(cnn_widths(name), image_size, num_classes, in_channels)
    tv = _torchvision()
    known = tv.models.list_models(module=tv.models)
    if name not in known:
        raise KDConfigError(f"model: {suggest(name, known + ['cnn:WIDTH'], 'model')}")
    if in_channels != 3:
        raise KDConfigError(f"model {name!r}: torchvision models take 3-channel images, the data has {in_channels}")
    return tv.models.get_model(name, weights=None, num_classes=num_classes)


def load_weights(model: nn.Module, path: str | Path, name: str = "model") -> nn.Module:
    """Load a state_dict file into ``model`` (``torch.load(weights_only=True)``, or safetensors).

    A ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper and a DDP ``module.`` prefix are
    unwrapped. Missing file, unreadable file, missing / unexpected keys or other shapes raise
    :class:`KDConfigError` naming the file and the first differences.
    """
    path = Path(path)
    if not path.is_file():
        raise KDConfigError(f"weights file {str(path)!r} for {name} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any reading failure becomes one clear message
        raise KDConfigError(f"cannot read weights file {str(path)!r} for {name}: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise KDConfigError(f"weights file {str(path)!r} holds a {type(state).__name__}, not a state_dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", shapes)) if keys]
        raise KDConfigError(f"weights file {str(path)!r} does not fit {name}: {'; '.join(parts)}. Were they saved from "
                            "this architecture with this number of classes (--num-classes)?")
    model.load_state_dict(state)
    return model


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Any, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``dataset`` (``(x, y)`` samples), in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def spread(dataset: Any, n: int) -> Any:
    """``n`` evenly spaced samples of ``dataset`` (ImageFolder sorts by class: the first ones are one class)."""
    if len(dataset) <= n:
        return dataset
    return torch.utils.data.Subset(dataset, torch.linspace(0, len(dataset) - 1, n).long().tolist())


def near_chance(acc: float, num_classes: int, n: int) -> bool:
    """Whether ``acc`` on ``n`` images is within 3 standard errors (+2 points) of chance, ``1/num_classes``."""
    chance = 1.0 / num_classes
    return acc < chance + 3 * math.sqrt(chance * (1 - chance) / max(n, 1)) + 0.02


def check_teacher(model: nn.Module, val: Any, num_classes: int, label: str, images: int = CHECK_IMAGES) -> float:
    """Score ``model`` on a spread of validation images; print a loud warning if it is near chance."""
    subset = spread(val, images)
    acc = accuracy(model, subset)
    if near_chance(acc, num_classes, len(subset)):
        bar = "!" * 78
        print(f"{bar}\nWARNING: {label} scores {100 * acc:.1f}% on {len(subset)} validation images; chance is "
              f"{100 / num_classes:.1f}%.\nIt teaches noise. Were its weights loaded (--teacher-weights)? Is the class "
              "order the one it was trained with (ImageFolder: sorted folder names)? Same preprocessing "
              f"(--image-size, normalisation)?\n{bar}", file=sys.stderr, flush=True)
    return acc


# ----------------------------------------------------------------------------- the run


def scheme_kind(recipe: Mapping[str, Any]) -> Any:
    """The scheme class a recipe builds (``Distiller`` for a ``distill`` section)."""
    check_keys(recipe, RECIPE_KEYS, "recipe")
    if "distill" in recipe:
        return Distiller
    if "scheme" not in recipe:
        raise KDConfigError("recipe has neither a 'scheme' nor a 'distill' section")
    cfg = recipe["scheme"]
    return SCHEMES.get(cfg if isinstance(cfg, str) else cfg.get("type", ""))


def train_config(args: argparse.Namespace, recipe: Mapping[str, Any], output_dir: Path, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe's ``train`` section, then the options given on the command line."""
    cfg: dict[str, Any] = {"epochs": 10, "batch_size": 64, "lr": 0.05, "seed_samples": args.data is not None}
    train = recipe.get("train") or {}
    if not isinstance(train, Mapping):
        raise KDConfigError(f"recipe {str(args.recipe)!r}: 'train' must be a mapping of settings, got {train!r}")
    cfg.update(train)
    cfg.update({k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "seed") if getattr(args, k) is not None})
    if args.quiet:
        cfg.update(progress=False, console=False, tensorboard=False)
    cfg.update(output_dir=str(output_dir), resume=args.resume, overwrite=args.overwrite, **overrides)
    if overrides.get("epochs") is not None:
        cfg.pop("max_steps", None)
    config = TrainConfig.from_dict(cfg)
    config.validate()
    return config


OPTION_RULES = {
    "epochs": POSITIVE, "batch_size": POS_INT, "lr": POSITIVE, "seed": NON_NEG_INT, "image_size": POS_INT,
    "num_classes": AT_LEAST_2, "train_teacher_epochs": NON_NEGATIVE,
}


def check_options(args: argparse.Namespace, recipe: Mapping[str, Any]) -> None:
    """Every number of the command line and of the recipe, before any data is read or model built."""
    check_rules(vars(args), OPTION_RULES)
    if args.image_size is not None and args.image_size < 8:
        raise KDConfigError(f"--image-size must be at least 8, got {args.image_size}", hint="give --image-size 8 or more")
    check_recipe_numbers({k: v for k, v in recipe.items() if k != "train"}, str(args.recipe))
    # the recipe's train section and the options together, as each stage will use them
    train_config(args, recipe, Path(args.output_dir) / "student")


def stage_dirs(out: Path) -> list[Path]:
    """The run's stage sub-directories already present in ``out`` (teacher, assistant1, student...)."""
    from .shared.checkpoint import run_outputs

    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_dir() and run_outputs(p))


def check_output_dir(args: argparse.Namespace) -> None:
    """Refuse an --output-dir holding another run (any stage, or results.json) unless --resume / --overwrite."""
    out = Path(args.output_dir)
    from .shared.checkpoint import check_writable_dir, run_outputs

    check_writable_dir(out, "--output-dir")
    used = [f"{p.name}/ ({', '.join(run_outputs(p))})" for p in stage_dirs(out)]
    if (out / "results.json").exists():
        used.append("results.json")
    if used and not (args.resume or args.overwrite):
        from .shared.errors import OutputDirInUseError

        raise OutputDirInUseError(f"--output-dir {str(out)!r} already holds a run ({'; '.join(used)})",
                                  hint="pass --resume to continue it, --overwrite to replace it, or choose another "
                                       "--output-dir")
    if args.overwrite:
        for stage in stage_dirs(out):
            prepare_output_dir(stage, False, True, "--output-dir")
        if (out / "results.json").exists():
            (out / "results.json").unlink()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything ``kd-tasks classify`` does; returns the results written to ``results.json``."""
    if args.resume and args.overwrite:
        raise KDConfigError("--resume and --overwrite both given", hint="give --resume to continue the run in "
                            "--output-dir, or --overwrite to replace it")
    recipe = load_config(args.recipe)
    if not isinstance(recipe, Mapping):
        raise KDConfigError(f"recipe {str(args.recipe)!r} must be a mapping (distill: / scheme: / train:), got "
                            f"{type(recipe).__name__}")
    kind = scheme_kind(recipe)
    check_options(args, recipe)
    for name in [*(args.teacher or []), *(args.assistant or []), args.student]:
        check_model_name(name)
    check_output_dir(args)
    needs_teacher = kind not in (MutualLearning, SelfDistillation)
    if kind is AssistantChain and not args.assistant:
        raise KDConfigError("the TAKD recipe needs at least one --assistant NAME (mid-sized model, largest first)")
    if kind is not AssistantChain and args.assistant:
        raise KDConfigError(f"--assistant is for the TAKD recipe; {args.recipe} does not use assistants")
    teachers = args.teacher or []
    if needs_teacher and not teachers:
        raise KDConfigError(f"{args.recipe} distils from a teacher: give --teacher NAME")
    if not needs_teacher and (teachers or args.teacher_weights):
        print(f"note: {args.recipe} trains without a teacher; --teacher is not used", file=sys.stderr)
        teachers = []
    weights = args.teacher_weights or []
    if weights and len(weights) != len(teachers):
        raise KDConfigError(f"give one --teacher-weights per --teacher ({len(teachers)} teachers, {len(weights)} files)")
    if teachers and not weights and not args.train_teacher_epochs:
        raise KDConfigError("the teacher has no weights: give --teacher-weights PATH, or --train-teacher-epochs N "
                            "to train it first")

    # data
    if args.data is not None:
        size = args.image_size or 224
        train_set, val_set, classes = image_folder(args.data, size)
        num_classes, channels, note = len(classes), 3, f"{args.data}: {len(train_set)} train / {len(val_set)} val, {size}x{size}"
    else:
        names = [*teachers, *(args.assistant or []), args.student]
        channels = 1 if all(is_builtin(n) for n in names) else 3
        train_set, val_set, note = digits(args.image_size, channels)
        size, num_classes = train_set.x.shape[-1], 10
    if num_classes < 2:
        raise KDConfigError(f"--data has {num_classes} class; classification needs at least 2")
    if args.num_classes is not None and args.num_classes != num_classes:
        raise KDConfigError(f"--num-classes {args.num_classes}, but the data has {num_classes} classes")
    scheme_cfg = recipe.get("scheme")
    if isinstance(scheme_cfg, Mapping) and "num_classes" in scheme_cfg:
        recipe = {**recipe, "scheme": {**scheme_cfg, "num_classes": num_classes}}
    print(f"data: {note}, {num_classes} classes", flush=True)

    out = Path(args.output_dir)
    seed = args.seed if args.seed is not None else 0

    def model(name: str, offset: int) -> nn.Module:
        torch.manual_seed(seed * 1000 + offset)
        return build_model(name, num_classes, channels, size)

    identity = {"recipe": recipe, "data": note}

    def fit(scheme: nn.Module, stage: str, **overrides: Any) -> Any:
        cfg = train_config(args, recipe, out / stage, **overrides)
        return Trainer(scheme, train_set, cfg, eval_fn=lambda m: {"accuracy": accuracy(m, val_set)},
                       identity=identity).fit()

    # teachers: loaded or trained, then checked
    teacher_models = []
    for i, name in enumerate(teachers):
        label = f"teacher {name!r}" if len(teachers) == 1 else f"teacher {i} {name!r}"
        t = model(name, 100 + i)
        if weights:
            load_weights(t, weights[i], label)
        else:
            stage = "teacher" if len(teachers) == 1 else f"teacher{i}"
            print(f"training {label} for {args.train_teacher_epochs} epochs", flush=True)
            fit(Distiller(t, None, terms=[], task_loss=nn.CrossEntropyLoss()), stage, epochs=args.train_teacher_epochs)
        acc = check_teacher(t, val_set, num_classes, label)
        print(f"{label}: {100 * acc:.2f}% on a check of {min(CHECK_IMAGES, len(val_set))} validation images", flush=True)
        teacher_models.append(t)

    counter = iter(range(1000))
    make_student = lambda: model(args.student, 300 + next(counter))  # noqa: E731 -- peers get distinct inits
    assistants = [model(n, 200 + i) for i, n in enumerate(args.assistant or [])]
    scheme = scheme_from_recipe(recipe, make_student, teacher=teacher_models[0] if teacher_models else None,
                                teachers=teacher_models[1:], assistants=assistants, num_samples=len(train_set))
    if kind is AssistantChain:
        student = scheme.run(lambda stage_scheme, stage: fit(stage_scheme, stage))
    else:
        student = fit(scheme, "student").model

    for stage in stage_dirs(out):
        _loss_curves(stage)
    baseline = None
    if args.report and args.baseline:
        # the student's architecture trained alone: same initial weights (offset 300), same batch order (seed)
        baseline = model(args.student, 300)
        print(f"training the plain baseline {args.student!r} alone (same initial weights and batch order)", flush=True)
        fit(Distiller(baseline, None, terms=[], task_loss=nn.CrossEntropyLoss()), "baseline")
        _loss_curves(out / "baseline")

    results = {
        "recipe": str(args.recipe),
        "data": note,
        "teachers": {(name if teachers.count(name) == 1 else f"{name} #{i}"): accuracy(t, val_set)
                     for i, (name, t) in enumerate(zip(teachers, teacher_models))},
        "assistants": {f"{n} ({stage})": accuracy(a, val_set)
                       for n, a, stage in zip(args.assistant or [], assistants, getattr(scheme, "names", []))},
        "student": {args.student: accuracy(student, val_set)},
        "student_weights": str(out / "student" / "export" / "model.safetensors"),
    }
    if baseline is not None:
        results["baseline"] = {args.student: accuracy(baseline, val_set)}
    # what `kd-tasks report --run DIR` needs to rebuild every model and the evaluation data
    results["data_spec"] = {"data": str(args.data) if args.data is not None else None, "dataset": args.dataset,
                            "image_size": size, "channels": channels, "num_classes": num_classes}
    specs = []
    for i, name in enumerate(teachers):
        stage = "teacher" if len(teachers) == 1 else f"teacher{i}"
        specs.append({"name": f"teacher {name}", "arch": name, "role": "teacher" if i == 0 else "assistant",
                      "weights": str(weights[i]) if weights else str(out / stage / "export" / "model.safetensors")})
    for name, stage in zip(args.assistant or [], getattr(scheme, "names", [])):
        specs.append({"name": f"assistant {name}", "arch": name, "role": "assistant",
                      "weights": str(out / stage / "export" / "model.safetensors")})
    specs.append({"name": f"student {args.student} (distilled)", "arch": args.student, "role": "student",
                  "weights": results["student_weights"]})
    if baseline is not None:
        specs.append({"name": f"student {args.student} alone", "arch": args.student, "role": "baseline",
                      "weights": str(out / "baseline" / "export" / "model.safetensors")})
    results["models"] = specs
    example = next(iter(torch.utils.data.DataLoader(spread(val_set, 64), batch_size=64)))[0]
    if args.export:
        from .shared.export import check_onnx, export_onnx

        path = export_onnx(student, example, out / "student" / "export" / "model.onnx")
        diff = check_onnx(student, example, path)
        results["student_onnx"] = str(path)
        print(f"student ONNX: {path} (onnxruntime vs PyTorch on {len(example)} validation images: max |diff| "
              f"{diff:.2e})", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("validation accuracy:")
    for role in ("teachers", "assistants", "student", "baseline"):
        for name, acc in results.get(role, {}).items():
            print(f"  {role.rstrip('s'):<10} {name:<28} {100 * acc:6.2f} %")
    print(f"student weights: {results['student_weights']}")
    if args.report:
        entries = [(f"teacher {n}", t, "teacher") for n, t in zip(teachers, teacher_models)][:1]
        entries += [(f"teacher {n} #{i}", t, "assistant") for i, (n, t) in enumerate(zip(teachers, teacher_models)) if i]
        entries += [(f"assistant {n}", a, "assistant") for n, a in zip(args.assistant or [], assistants)]
        entries.append((f"student {args.student} (distilled)", student, "student"))
        if baseline is not None:
            entries.append((f"student {args.student} alone", baseline, "baseline"))
        if not teacher_models:  # mutual / self schemes: the reference is the plain baseline, else the student
            ref = baseline if baseline is not None else student
            entries.insert(0, (f"reference {args.student} {'alone' if baseline is not None else ''}".strip(), ref, "teacher"))
        rep, paths = report_models(entries, val_set, example, out, quantize=args.quantize, metric_name="val accuracy")
        print(rep.to_text())
        print(f"report: {paths['markdown']}  {paths['json']}  plot: {paths['png']}", flush=True)
        results["report"] = str(paths["json"])
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _loss_curves(stage_dir: Path) -> None:
    from .shared.report import plot_loss_curves

    plot_loss_curves(stage_dir / "log.jsonl")


def report_models(entries: Sequence[tuple[str, nn.Module, str]], eval_set: Any, example: torch.Tensor, out: Path, *,
                  quantize: bool = False, metric_name: str = "accuracy", batch_size: int = 256, stem: str = "report"):
    """Compression report of ``(name, model, role)`` entries (one role ``teacher``) on ``eval_set`` (top-1
    accuracy); ``quantize`` adds an int8 dynamic copy of every student/baseline with Linear layers
    (CPU). Writes ``<stem>.md/.json/.png`` to ``out``; returns ``(report, paths)``."""
    from .shared.export import has_quantizable_layers, quantize_dynamic_int8
    from .shared.report import ModelEntry, build_report

    rows = [ModelEntry(name, m, role) for name, m, role in entries]
    if quantize:
        for name, m, role in entries:
            if role in ("student", "baseline") and has_quantizable_layers(m):
                rows.append(ModelEntry(f"{name} int8", quantize_dynamic_int8(m), "quantized", flops_from=name,
                                       note="torch.ao dynamic int8 (Linear layers)"))
    device = next(iter(entries[0][1].parameters())).device
    rep = build_report(rows, example.to(device), metric_name=metric_name,
                       metric_fn=lambda m: accuracy(m, eval_set), batch_size=batch_size)
    return rep, rep.write(out, stem)


EXAMPLES = """examples:
  # no download: teacher trained first on scikit-learn's digits, then Hinton KD into a small CNN
  kd-tasks classify --recipe configs/shared/offline_hinton.yaml --dataset digits \\
      --teacher cnn:32 --train-teacher-epochs 10 --student cnn:4 --epochs 10
  # TAKD in one command: teacher -> assistant -> student
  kd-tasks classify --recipe configs/shared/scheme_takd.yaml --dataset digits \\
      --teacher cnn:32 --train-teacher-epochs 10 --assistant cnn:12 --student cnn:4
  # torchvision models on an ImageFolder tree (DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg)
  kd-tasks classify --recipe configs/shared/offline_resnet_fitnet_at.yaml --data DIR \\
      --teacher resnet50 --teacher-weights teacher.pth --student resnet18 --epochs 30 --output-dir out/
  # online mutual learning (no teacher)
  kd-tasks classify --recipe configs/shared/scheme_dml.yaml --data DIR --student mobilenet_v3_small
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="kd-tasks classify",
        description="Distil an image classifier with any scheme recipe of configs/shared "
                    "(offline, mutual, self, multi-teacher, adversarial, TAKD chain).",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--recipe", "--config", dest="recipe", required=True, type=Path,
                   help="a recipe file, e.g. configs/shared/offline_hinton.yaml")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", type=Path, metavar="DIR", help="ImageFolder tree with train/ and val/ sub-folders")
    data.add_argument("--dataset", choices=("digits",), help="digits: scikit-learn's bundled 8x8 digits (no download)")
    p.add_argument("--teacher", action="append", metavar="NAME",
                   help="torchvision model name (resnet18, ...) or cnn:WIDTH / cnn:A-B-C; repeat for multi-teacher")
    p.add_argument("--teacher-weights", action="append", type=Path, metavar="PATH",
                   help="teacher state_dict (.pth/.pt via torch.load(weights_only=True), or .safetensors); one per --teacher")
    p.add_argument("--train-teacher-epochs", type=float, default=0, metavar="N",
                   help="without --teacher-weights: train the teacher(s) for N epochs first")
    p.add_argument("--student", required=True, metavar="NAME", help="student model name (as --teacher)")
    p.add_argument("--assistant", action="append", metavar="NAME",
                   help="TAKD assistant model, largest first; repeat for a longer chain")
    p.add_argument("--num-classes", type=int, help="checked against the data (ImageFolder: number of class folders)")
    p.add_argument("--image-size", type=int, help="images are resized to SIZE x SIZE (default 224 for --data, 8 for digits)")
    p.add_argument("--epochs", type=float, help="epochs of each stage (default: the recipe's train section, else 10)")
    p.add_argument("--batch-size", type=int, help="per process (default: recipe, else 64)")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=float, help="SGD learning rate (default: recipe, else 0.05)")
    p.add_argument("--output-dir", default="runs/classify", help="checkpoints, logs, exported student, results.json")
    p.add_argument("--resume", action="store_true", help="continue every stage from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output-dir (its checkpoints, logs, exports, results.json)")
    p.add_argument("--seed", type=int, help="seed of model initialisation and data order (default: the recipe's "
                   "train.seed, else 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, console log or TensorBoard")
    p.add_argument("--export", choices=("onnx",), help="also export the student to student/export/model.onnx, checked "
                   "against PyTorch with onnxruntime")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip the compression report (report.md/.json/.png) and the plain baseline")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="do not train the student's architecture alone for the report")
    p.add_argument("--quantize", action="store_true",
                   help="add int8 dynamic quantised copies (torch.ao, Linear layers) of the students to the report")
    return p


def _main(argv: list[str]) -> int:
    run(build_parser().parse_args(argv))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``kd-tasks classify``: one line and exit code 2 for any input error (see :func:`run_cli`)."""
    return run_cli("classify", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
