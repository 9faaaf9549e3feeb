"""Cost of a distillation training iteration, per method, against what it must at least cost.

For each method of ``benchmarks/detection_trees.py`` (same configs, same recipes, same defaults), on one
training batch, in one process, with ``--threads`` threads (1 by default):

* ``student``: one training iteration of the student alone (``model.train_step``: preprocessing,
  forward with losses, backward, optimiser step), as MMEngine's loop runs it;
* ``teacher``: one inference forward of the trained teacher on the same batch (backbone, neck and head,
  ``mode='tensor'``, no gradients, no box post-processing); ``teacher+NMS`` (the full ``predict``) is
  shown for reference only;
* ``KD``: one training iteration of the ``DetectionDistiller`` that ``kd-tasks detect`` builds for the
  recipe (its own optimiser settings included).

After ``--warmup`` untimed rounds, the three are timed in turn (the order rotates every round) for
``--repeats`` rounds; the table gives the medians and ``KD / (student + teacher)``: 1.0 means the
distillation itself (taps, connectors, losses, their backward) costs nothing beyond running both
networks; the cost above 1 is the method's own. Distillation weights are read at iteration
``--student-iters // 2`` so scheduled terms are active.

Needs the teacher trained by the benchmark in the same ``--out`` with the same settings::

    .venv/bin/python benchmarks/detection_trees.py --out /tmp/kd_trees_gfl --teacher-only
    .venv/bin/python benchmarks/detection_kd_timing.py --out /tmp/kd_trees_gfl
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import detection_trees as dt  # noqa: E402  (same directory)


def main(argv=None) -> int:
    parser = dt.build_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (at least 10)")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if args.repeats < 10:
        parser.error("--repeats must be at least 10")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner

    import det_backbones  # noqa: F401  registers EfficientNetLite
    import kd_tasks.detection  # noqa: F401
    from kd_tasks.detection.train import build_config, build_parser as kd_parser
    from mmdet.registry import MODELS

    methods = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "alone"]
    specs = dict(dt.METHODS)
    for item in args.recipe:
        name, _, path = item.partition("=")
        specs[name] = path
    dt.finish_args(args)
    data = args.out / "data"
    dt.make_tiles(data, args.scale, args.tile, args.val_fraction)
    ckpt = args.out / "teacher" / f"iter_{args.teacher_iters}.pth"
    if not ckpt.is_file():
        sys.exit(f"no teacher checkpoint {ckpt}; train it first: .venv/bin/python benchmarks/detection_trees.py "
                 f"--out {args.out} --teacher-only (with the same settings)")
    own = args.out / "timing"
    own.mkdir(parents=True, exist_ok=True)
    seed = args.seeds[0]
    s_cfg = dt.write_config(own / "student.py", data, dt.student_model(args), args.tile, args.student_iters, seed,
                            args.student_lr, args.batch_size)
    t_cfg = dt.write_config(own / "teacher.py", data, dt.teacher_model(args), args.tile, args.teacher_iters,
                            args.teacher_seed, args.teacher_lr, args.batch_size, args.teacher_backbone_lr_mult)
    cfg = Config.fromfile(str(s_cfg))
    DefaultScope.get_instance("kd_timing", scope_name="mmdet")
    torch.manual_seed(seed)
    batch = next(iter(Runner.build_dataloader(cfg.train_dataloader, seed=seed)))

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    student = MODELS.build(cfg.model)
    student.init_weights()
    student.train()
    s_optim = build_optim_wrapper(student, cfg.optim_wrapper)

    rows, skipped = [], {}
    for method in methods:
        recipe, why = dt.resolve_recipe(method, specs.get(method))
        if why or recipe is None:
            skipped[method] = why or "no recipe"
            print(f"{method}: SKIPPED: {skipped[method]}", flush=True)
            continue
        kd_args = kd_parser().parse_args(["--teacher-config", str(t_cfg), "--teacher-checkpoint", str(ckpt),
                                          "--student-config", str(s_cfg), "--recipe", str(recipe),
                                          "--work-dir", str(own / method)])
        try:
            kd_cfg = build_config(kd_args)
            kd = MODELS.build(kd_cfg.model)
        except Exception as e:  # a recipe that does not fit these models: reported, the others still run
            skipped[method] = f"failed to build: {type(e).__name__}: {e}"
            print(f"{method}: FAILED: {skipped[method]}", flush=True)
            continue
        kd.init_weights()
        kd.train()
        kd.set_step(args.student_iters // 2)
        inactive = [name for name, w in kd.weights().items() if name != "task" and w == 0]
        kd_optim = build_optim_wrapper(kd, kd_cfg.optim_wrapper)
        teacher = kd.teacher
        prepared = kd.data_preprocessor(batch, True)
        t_inputs, t_samples = kd.teacher_inputs(prepared["inputs"]), prepared["data_samples"]

        @torch.no_grad()
        def teacher_forward():
            teacher(t_inputs, t_samples, mode="tensor")

        @torch.no_grad()
        def teacher_predict():
            teacher(t_inputs, t_samples, mode="predict")

        jobs = {"student": lambda: student.train_step(batch, s_optim), "teacher": teacher_forward,
                "KD": lambda: kd.train_step(batch, kd_optim), "teacher+NMS": teacher_predict}
        for _ in range(args.warmup):
            for fn in jobs.values():
                fn()
        times: dict[str, list[float]] = {k: [] for k in jobs}
        names = list(jobs)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(timed(jobs[name]))
        med = {k: statistics.median(v) for k, v in times.items()}
        per_round = [k / (s + t) for k, s, t in zip(times["KD"], times["student"], times["teacher"])]
        row = dict(method=method, recipe=str(recipe), student_ms=1e3 * med["student"], teacher_ms=1e3 * med["teacher"],
                   kd_ms=1e3 * med["KD"], teacher_nms_ms=1e3 * med["teacher+NMS"],
                   ratio=med["KD"] / (med["student"] + med["teacher"]), ratio_median_of_rounds=statistics.median(per_round),
                   inactive_terms=inactive, raw_s=times)
        rows.append(row)
        print(f"{method}: KD {row['kd_ms']:.1f} ms, student {row['student_ms']:.1f} ms, teacher {row['teacher_ms']:.1f} ms"
              f" -> {row['ratio']:.2f}" + (f" (terms with weight 0 at this step: {inactive})" if inactive else ""),
              flush=True)
        del kd, kd_optim, teacher

    lines = [f"KD iteration time / (student iteration + teacher inference forward); batch {args.batch_size} x "
             f"{args.tile}x{args.tile}, {torch.get_num_threads()} thread(s), medians of {args.repeats} rounds after "
             f"{args.warmup} warm-up rounds, one process",
             "", "| method | recipe | student iter (ms) | teacher forward (ms) | KD iter (ms) | KD / (student + teacher) "
             "| median of per-round ratios | teacher predict incl. NMS (ms) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {Path(r['recipe']).name} | {r['student_ms']:.1f} | {r['teacher_ms']:.1f} | "
                     f"{r['kd_ms']:.1f} | {r['ratio']:.2f} | {r['ratio_median_of_rounds']:.2f} | {r['teacher_nms_ms']:.1f} |")
    lines += ["", "The teacher forward is the whole network (backbone, FPN, head). A KD iteration runs the teacher only "
              "up to its last tapped module, so a method that taps only the FPN can come out below 1.0."]
    lines += [f"- {m}: not timed ({why})" for m, why in skipped.items()]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (own / "timing.md").write_text(text)
    (own / "timing.json").write_text(json.dumps({"threads": torch.get_num_threads(), "repeats": args.repeats,
                                                 "warmup": args.warmup, "rows": rows, "skipped": skipped}, indent=1))
    print(f"written: {own / 'timing.md'}, {own / 'timing.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
