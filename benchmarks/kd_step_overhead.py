"""What the Distiller adds to a KD step, measured as ratios in one run.

floor = student train step (forward + backward + SGD) + teacher forward under ``torch.no_grad``,
each timed alone on the same batch. Then, per variant, the median time of a full Distiller step over
the floor:

* ``hand-written``  the same KD step written by hand in plain PyTorch (the reference);
* ``kd``            Hinton KD on logits (+ CE) through the Distiller;
* ``kd+at``         plus an attention-transfer term on a tapped layer (forward hooks);
* ``at only``       a feature term alone: the teacher forward stops after its last tapped module;
* ``cached``        Hinton KD with the teacher's logits given precomputed (teacher-output cache).

Run:  .venv/bin/python benchmarks/kd_step_overhead.py [--teacher resnet50 --student resnet18 --batch 32 --size 96]
      [--device cuda --dtype bf16]   (mixed precision: student and teacher under autocast; CUDA is synchronised
      around every timed call)
Timings are medians over interleaved repetitions; the machine's other load adds noise, so compare
ratios from one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

from kd_tasks.shared import Distiller


SYNC = {"fn": lambda: None}


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        SYNC["fn"]()
        t0 = time.perf_counter()
        fn()
        SYNC["fn"]()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--student", default="resnet18")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="bf16/fp16: every step under autocast (fp16 on CUDA only)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    device = torch.device(a.device)
    if device.type == "cuda":
        SYNC["fn"] = torch.cuda.synchronize
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    amp = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    teacher = getattr(torchvision.models, a.teacher)(num_classes=10).eval().requires_grad_(False).to(device)
    student = getattr(torchvision.models, a.student)(num_classes=10).to(device)
    x = torch.randn(a.batch, 3, a.size, a.size, device=device)
    y = torch.randint(0, 10, (a.batch,), device=device)
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)

    def student_step():
        student.train()
        with amp():
            loss = F.cross_entropy(student(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def teacher_fwd():
        with torch.no_grad(), amp():
            teacher(x)

    with torch.no_grad(), amp():
        cached = {"output": teacher(x)}

    variants = {
        "distiller: kd": Distiller(student, teacher, terms=[{"name": "kd", "loss": {"type": "kd", "temperature": 4}}],
                        task_loss=torch.nn.CrossEntropyLoss()),
        "distiller: kd+at": Distiller(student, teacher, terms=[{"name": "kd", "loss": {"type": "kd", "temperature": 4}},
                                                    {"name": "at", "loss": "at", "student": "layer3", "teacher": "layer3"}],
                           task_loss=torch.nn.CrossEntropyLoss()),
        "distiller: at only (stops at layer2)": Distiller(
            student, teacher, terms=[{"name": "at", "loss": "at", "student": "layer2", "teacher": "layer2"}],
            task_loss=torch.nn.CrossEntropyLoss()),
        "distiller: kd, cached teacher": Distiller(student, None, terms=[{"name": "kd", "loss": {"type": "kd", "temperature": 4}}],
                                               task_loss=torch.nn.CrossEntropyLoss()),
    }

    def kd_step(d, **kw):
        def step():
            d.train()
            with amp():
                loss = d(x, y, **kw)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def hand_written_kd():
        """The same KD step written by hand: the reference a framework should not exceed."""
        student.train()
        with amp():
            s_logits = student(x)
            with torch.no_grad():
                t_logits = teacher(x)
        T = 4.0
        s_logits, t_logits = s_logits.float(), t_logits.float()
        kd = F.kl_div(F.log_softmax(s_logits / T, 1), F.softmax(t_logits / T, 1), reduction="batchmean") * T * T
        loss = F.cross_entropy(s_logits, y) + kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    steps = {"hand-written kd (reference)": hand_written_kd}
    steps.update({name: kd_step(d, **({"teacher_outputs": cached} if "cached" in name else {}))
                  for name, d in variants.items()})
    # warm-up
    for fn in (student_step, teacher_fwd, *steps.values()):
        fn()
    samples: dict[str, list[float]] = {"student step": [], "teacher forward": [], **{k: [] for k in steps}}
    for _ in range(a.reps):  # interleave so drifting load hits every variant alike
        samples["student step"] += timed(student_step, 1)
        samples["teacher forward"] += timed(teacher_fwd, 1)
        for name, fn in steps.items():
            samples[name] += timed(fn, 1)
    med = {k: statistics.median(v) for k, v in samples.items()}
    floor = med["student step"] + med["teacher forward"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {a.threads} threads"
    print(f"{a.teacher} -> {a.student}, batch {a.batch} of {a.size}x{a.size}, {where}, {a.dtype}, "
          f"medians of {a.reps}")
    print(f"{'':40}{'seconds':>9}{'/ floor':>9}")
    print(f"{'student step':40}{med['student step']:9.3f}")
    print(f"{'teacher forward (no_grad)':40}{med['teacher forward']:9.3f}")
    print(f"{'floor = student step + teacher forward':40}{floor:9.3f}{1.0:9.3f}")
    for name in steps:
        print(f"{name:40}{med[name]:9.3f}{med[name] / floor:9.3f}")


if __name__ == "__main__":
    main()
