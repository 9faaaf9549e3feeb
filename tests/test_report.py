"""The shared compression report: its numbers on tiny models, the figure of merit, the Pareto front, the plots."""

import io
import json

import pytest
import torch
from torch import nn

from kd_tasks.shared.report import (
    ModelEntry, build_report, count_flops, count_params, figure_of_merit, pareto_front, peak_forward_bytes,
    plot_loss_curves, size_on_disk,
)

torch.set_num_threads(1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    import matplotlib.image

    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and matplotlib.image.imread(str(path)).ndim == 3


def mlp(hidden=256):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def test_parameter_count_and_flops_of_known_layers():
    assert count_params(nn.Linear(3, 4)) == 16
    assert count_params(mlp()) == 64 * 256 + 256 + 256 * 10 + 10
    # a multiply-add counts 2: Linear(64, 256) + Linear(256, 10) per input
    assert count_flops(mlp(), torch.randn(7, 1, 8, 8)) == 2 * (64 * 256 + 256 * 10)
    conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)  # 4 output maps of 8x8, 9 MACs per output value
    assert count_flops(conv, torch.randn(3, 1, 8, 8)) == 2 * 4 * 64 * 9


def test_size_on_disk_is_the_saved_state_dict():
    m = mlp()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    assert size_on_disk(m) == len(buf.getvalue())
    weights = 4 * count_params(m)
    assert weights <= size_on_disk(m) < weights + 4096  # float32 weights plus a small container


def test_peak_memory_counts_the_live_activations():
    m = mlp().eval()
    # at batch 256 the first Linear's output and the ReLU's output (256 x 256 floats each) are alive at once
    assert peak_forward_bytes(m, torch.randn(256, 1, 8, 8)) == 2 * 256 * 256 * 4


def test_figure_of_merit_and_pareto_front():
    assert figure_of_merit(1.0, 1.0) == 0.0  # the teacher
    assert figure_of_merit(1.0, 2.0) == pytest.approx(1.0)
    assert figure_of_merit(0.95, 2.0) == pytest.approx(0.0)  # 5% of the metric pays for one doubling
    assert figure_of_merit(0.1, 1000.0) < -7  # useless, however fast
    assert pareto_front([0.9, 0.8, 0.85, 0.95], [10, 5, 20, 30]) == [True, True, False, True]
    assert pareto_front([0.3, 0.2], [1, 1], higher_is_better=False) == [False, True]


def test_report_rows_files_and_plot(tmp_path):
    torch.manual_seed(0)
    big, small = mlp(512), mlp(32)
    x = torch.randn(16, 1, 8, 8)
    rep = build_report([ModelEntry("teacher", big, "teacher", metric=0.9), ModelEntry("student", small, metric=0.81),
                        ModelEntry("alone", mlp(32), "baseline", metric=0.72)], x, batch_size=32, repeats=3)
    t, s, b = rep.rows
    assert s["retained"] == pytest.approx(0.9) and s["speedup"] == pytest.approx(t["flops"] / s["flops"])
    assert s["fom"] == pytest.approx(figure_of_merit(0.9, s["speedup"]))
    assert s["pareto_size"] and not b["pareto_size"]  # same size, lower accuracy: dominated
    assert rep.threads == 1 and rep.batch_size == 32 and t["latency_ms"] > 0 and t["throughput"] > 0
    paths = rep.write(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert [r["name"] for r in data["rows"]] == ["teacher", "student", "alone"]
    assert "| student | student |" in paths["markdown"].read_text()
    assert is_png(paths["png"])


class OutsideTorch(nn.Module):
    """A model torch's counters cannot see (like a dlib or onnxruntime teacher): numpy does the work."""

    def forward(self, x):
        w = torch.ones(64, 10).numpy()
        return torch.from_numpy(x.flatten(1).numpy() @ w)


def test_a_teacher_run_outside_torch_takes_figures_measured_elsewhere_and_latency_speed_ups(tmp_path):
    x = torch.randn(8, 1, 8, 8)
    rep = build_report([ModelEntry("teacher", OutsideTorch(), "teacher", metric=0.9,
                                   measured={"params": 640, "size_bytes": 12345, "peak_bytes": float("nan")}),
                        ModelEntry("student", mlp(32), metric=0.81)], x, batch_size=8, repeats=3)
    t, s = rep.rows
    assert t["params"] == 640 and t["size_bytes"] == 12345 and t["flops"] == 0
    assert s["speedup"] == pytest.approx(t["latency_ms"] / s["latency_ms"]) == pytest.approx(s["speedup_latency"])
    assert s["fom"] == pytest.approx(figure_of_merit(0.9, s["speedup_latency"]))
    assert any("latency ratio" in n for n in rep.notes)
    paths = rep.write(tmp_path)
    data = json.loads(paths["json"].read_text())  # strict JSON: the unmeasured peak is null, not NaN
    assert data["rows"][0]["peak_bytes"] is None
    assert "n/a" in paths["markdown"].read_text() and is_png(paths["png"])
    with pytest.raises(Exception, match="not report fields"):
        build_report([ModelEntry("teacher", mlp(), "teacher", metric=0.9, measured={"weights": 1})], x)


def test_timings_of_a_report_are_interleaved_round_by_round():
    from kd_tasks.shared.report import time_interleaved

    calls = []

    class Tag(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    x = torch.zeros(1, 3)
    times = time_interleaved([Tag("a"), Tag("b")], [x, x], warmup=1, repeats=3)
    assert calls == ["a", "b"] * 4 and len(times) == 2 and all(t >= 0 for t in times)


def test_report_needs_one_teacher():
    from kd_tasks.shared.errors import KDConfigError

    with pytest.raises(KDConfigError, match="exactly one teacher"):
        build_report([ModelEntry("a", mlp(), metric=0.5)], torch.randn(2, 1, 8, 8))


def test_loss_curves_from_log_jsonl(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "epoch": 0, "loss": 1 / (i + 1), "task": 0.5, "kd": 0.2, "lr": 0.1})
                           + "\n" for i in range(10)) + "not json\n")
    path = plot_loss_curves(log)
    assert path == tmp_path / "loss_curves.png" and is_png(path)
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_loss_curves(tmp_path / "empty.jsonl") is None
