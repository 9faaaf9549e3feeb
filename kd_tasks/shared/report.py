"""What distillation bought: one compression report for every task (torch only; matplotlib lazily).

For each model of a run -- the teacher, each student, a plain baseline trained alone, optionally an
int8 copy -- :func:`build_report` measures on the task's evaluation data:

- ``params``: number of parameters (``numel`` summed over ``model.parameters()``);
- ``flops``: floating-point operations of one forward pass per input, counted by torch's own
  ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts 2) at the throughput batch size
  and divided by it;
- ``size_bytes``: size on disk of the ``state_dict`` written by ``torch.save`` (what a checkpoint of
  the model costs; works for dynamically quantised models too);
- ``latency_ms``: batch-1 forward time in ``torch.inference_mode``, median of ``repeats`` timed calls
  after ``warmup`` untimed ones (CUDA: synchronised around each call); the models of one report are timed
  in interleaved rounds (each model once per round), so their ratios see the same machine load;
- ``throughput``: inputs per second at ``batch_size`` (same protocol);
- ``peak_bytes``: weights + the largest total size of the tensors alive at once during a forward
  pass at ``batch_size`` (tracked per operation with a ``TorchDispatchMode``; the input excluded) --
  the same count on every device, independent of allocator caching;
- the task metric (given, or computed by ``metric_fn(model)``) and ``retained``, the share of the
  teacher's metric kept (``metric / teacher_metric``; for a lower-is-better metric,
  ``teacher_metric / metric``);
- ``speedup``: teacher FLOPs / model FLOPs, and ``speedup_latency``: teacher latency / model latency;
- ``fom``: the figure of merit (:func:`figure_of_merit`), the same formula for every student,
  distilled or plain;
- ``pareto_size`` / ``pareto_latency``: whether no other model has a metric at least as good at a
  size (latency) at most as large, one of them strictly better.

The thread count (``torch.get_num_threads()``) and device of the timings are recorded. Outputs:
``report.md`` (a Markdown table), ``report.json`` and ``report.png`` (metric against size and against
latency, the Pareto front drawn and its members ringed), see :meth:`Report.write`.

:func:`plot_loss_curves` draws one panel per logged term of a run's ``log.jsonl``; adapters call it
at the end of a run.
"""

from __future__ import annotations

import io
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .distiller import call_model

ROLES = ("teacher", "student", "baseline", "assistant", "quantized")


# ----------------------------------------------------------------------------- measurements


def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` (dynamically quantised layers: their packed weights and biases)."""
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():  # torch.ao dynamic quantised Linear keeps its weights outside parameters()
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(m, "weight") and callable(m.weight):
            n += m.weight().numel() + (m.bias().numel() if m.bias() is not None else 0)
    return n


def _each(inputs: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor of a batch: a tensor, a tuple/list of them or a mapping of them."""
    if isinstance(inputs, Mapping):
        return {k: fn(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(fn(v) for v in inputs)
    return fn(inputs)


def _batch_of(inputs: Any) -> int:
    t = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    return int(t.shape[0])


def _slice(inputs: Any, n: int) -> Any:
    return _each(inputs, lambda t: t[:n])


def _to(inputs: Any, device: torch.device) -> Any:
    return _each(inputs, lambda t: t.to(device))


def repeat_to(inputs: Any, n: int) -> Any:
    """``inputs`` (a batch) repeated along dim 0 and cut to exactly ``n`` samples."""
    def rep(t: torch.Tensor) -> torch.Tensor:
        times = math.ceil(n / t.shape[0])
        return t.repeat(times, *([1] * (t.dim() - 1)))[:n]

    return _each(inputs, rep)


def _cpu_attention_flops() -> dict:
    """torch's counter has formulas for the CUDA kernels of ``scaled_dot_product_attention`` but not for the
    CPU one (what e.g. Hugging Face encoders call on the CPU); the same formula (two batched matmuls) for it."""
    from torch.utils.flop_counter import sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return {}
    return {op: lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}


def count_flops(model: nn.Module, inputs: Any) -> float:
    """FLOPs of one forward pass per input (``FlopCounterMode`` total / batch size; attention run by
    the CPU kernel of ``scaled_dot_product_attention`` counted like its CUDA kernels); 0 for ops torch
    does not count (e.g. quantised kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
    with torch.inference_mode(), counter:
        call_model(model, inputs)
    model.train(was)
    return counter.get_total_flops() / _batch_of(inputs)


def size_on_disk(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model: nn.Module, inputs: Any, *, warmup: int = 5, repeats: int = 30) -> float:
    """Median seconds of one forward pass on ``inputs`` (``warmup`` untimed calls first)."""
    device = _device_of(model)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            call_model(model, inputs)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_forward_bytes(model: nn.Module, inputs: Any) -> int:
    """The largest total size of tensors alive at once during a forward pass (inputs and weights
    excluded), tracked operation by operation. Storages shared by views count once."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def ptr(t: torch.Tensor) -> int | None:
        try:
            return t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return None

    # storages that exist before the forward (inputs, weights) are not counted, nor are views of them
    outside = {ptr(t) for t in [*tree_leaves(inputs), *model.parameters(), *model.buffers()] if isinstance(t, torch.Tensor)}

    class Tracker(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live: dict[int, tuple[Any, int]] = {}
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    try:
                        st = t.untyped_storage()
                    except (RuntimeError, NotImplementedError):  # quantised / opaque tensors
                        continue
                    if st.data_ptr() not in self.live and st.data_ptr() not in outside:
                        self.live[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
            self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
            self.peak = max(self.peak, sum(v[1] for v in self.live.values()))
            return out

    tracker = Tracker()
    with torch.inference_mode(), tracker:
        call_model(model, inputs)
    return tracker.peak


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers (dynamically quantised layers: their int8 weights and float biases)."""
    n = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for m in model.modules():
        if getattr(m, "_packed_params", None) is not None and hasattr(m, "weight") and callable(m.weight):
            w, b = m.weight(), m.bias()
            n += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
    return n


def _device_of(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


def _inputs(model: nn.Module, example: Any, batch_size: int) -> tuple[Any, Any]:
    """``example`` repeated to ``batch_size`` on the model's device, and its first sample (batch 1)."""
    big = _to(repeat_to(example, batch_size), _device_of(model))
    return big, _slice(big, 1)


def _static(model: nn.Module, big: Any) -> dict:
    """The figures that do not depend on time: parameters, FLOPs per input, size on disk, peak memory."""
    return {"params": count_params(model), "flops": count_flops(model, big), "size_bytes": size_on_disk(model),
            "peak_bytes": weight_bytes(model) + peak_forward_bytes(model, big)}


def time_interleaved(models: Sequence[nn.Module], inputs: Sequence[Any], *, warmup: int = 5,
                     repeats: int = 30) -> list[float]:
    """Median seconds of one forward pass of each model on its inputs, timed in rounds -- every round calls
    each model once, in turn -- so a change in the machine's load hits all of them alike (timing one model
    after the other would put a busy minute on one side of the ratio). ``warmup`` untimed rounds first."""
    times: list[list[float]] = [[] for _ in models]
    for i in range(warmup + repeats):
        for k, (model, x) in enumerate(zip(models, inputs)):
            t = time_forward(model, x, warmup=0, repeats=1)
            if i >= warmup:
                times[k].append(t)
    return [statistics.median(t) for t in times]


def measure(model: nn.Module, example: Any, *, batch_size: int = 256, warmup: int = 5, repeats: int = 30) -> dict:
    """Parameters, FLOPs per input, size on disk, batch-1 latency, throughput at ``batch_size`` and peak
    memory of ``model`` on ``example`` inputs (a batch; repeated to ``batch_size``), in eval mode on the
    model's device."""
    return measure_all([model], [example], batch_size=batch_size, warmup=warmup, repeats=repeats)[0]


def measure_all(models: Sequence[nn.Module], examples: Sequence[Any], *, batch_size: int = 256, warmup: int = 5,
                repeats: int = 30) -> list[dict]:
    """:func:`measure` for several models at once, their timings interleaved (:func:`time_interleaved`), so
    the latency and throughput ratios between them are measured under the same load."""
    was = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        pairs = [_inputs(m, x, batch_size) for m, x in zip(models, examples)]
        out = [_static(m, big) for m, (big, _) in zip(models, pairs)]
        latency = time_interleaved(models, [one for _, one in pairs], warmup=warmup, repeats=repeats)
        batch = time_interleaved(models, [big for big, _ in pairs], warmup=max(1, warmup // 2),
                                 repeats=max(3, repeats // 3))
    finally:
        for m, w in zip(models, was):
            m.train(w)
    for row, lat, bt in zip(out, latency, batch):
        row.update(latency_ms=1000 * lat, throughput=batch_size / bt)
    return out


# ----------------------------------------------------------------------------- scores


FOM_EXCHANGE = 0.05  # one doubling of speed is worth this share of the teacher's metric


def figure_of_merit(retained: float, speedup: float, exchange: float = FOM_EXCHANGE) -> float:
    """Net doublings of speed: ``log2(speedup) - (1 - retained) / exchange``.

    Why this form. Compression is multiplicative (a 2x and then another 2x speed-up is 4x), so speed
    is counted on a log scale: every halving of the compute is worth the same, one unit. Quality is
    counted linearly in the share of the teacher's metric kept, since a point of accuracy lost costs
    the same wherever it is lost. ``exchange`` is the rate between the two: by default one doubling
    of speed pays for losing 5% of the teacher's metric (a student at 2x that keeps 95% scores 0, like
    the teacher itself; one at 2x keeping 100% scores 1; a useless student at 1000x keeping 10% scores
    log2(1000) - 18 = -8, where a product of ratios would rate it well). A student better than its
    teacher (retained > 1) gains. The formula is applied the same way to distilled and plain
    students, so their difference in it is the distillation's gain at equal cost. ``speedup`` is the
    teacher-to-model ratio of FLOPs per input by default (reproducible and device-independent; the
    report prints measured latency speed-ups next to it).
    """
    if speedup <= 0 or not math.isfinite(speedup):
        return float("nan")
    return math.log2(speedup) - (1.0 - retained) / exchange


def pareto_front(metric: Sequence[float], cost: Sequence[float], higher_is_better: bool = True) -> list[bool]:
    """For each point, whether no other point has a metric at least as good at a cost at most as high
    with at least one of the two strictly better."""
    sign = 1 if higher_is_better else -1
    out = []
    for i, (m, c) in enumerate(zip(metric, cost)):
        dominated = any(
            sign * m2 >= sign * m and c2 <= c and (sign * m2 > sign * m or c2 < c)
            for j, (m2, c2) in enumerate(zip(metric, cost)) if j != i
        )
        out.append(not dominated)
    return out


# ----------------------------------------------------------------------------- the report


@dataclass
class ModelEntry:
    """One row: a model and its role; ``metric`` given (e.g. a mean over seeds) or computed by the report."""

    name: str
    model: nn.Module
    role: str = "student"
    metric: float | None = None
    metric_std: float | None = None
    per_seed: list[float] | None = None
    note: str = ""
    flops_from: str | None = None  # quantised copies: FLOPs of the float model they come from
    example: Any = None  # this model's own inputs when they differ from the report's (e.g. another tokenizer)
    # figures measured outside torch, replacing torch's (e.g. a dlib or onnxruntime teacher, whose weights and
    # operations torch cannot see: {"params": ..., "size_bytes": file size, "flops": nan, "peak_bytes": nan})
    measured: dict[str, float] | None = None


@dataclass
class Report:
    metric_name: str
    higher_is_better: bool
    rows: list[dict[str, Any]]
    device: str
    threads: int
    batch_size: int
    exchange: float = FOM_EXCHANGE
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """The report as plain data; a figure that could not be measured (NaN) is ``None`` (JSON ``null``)."""
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return clean(asdict(self))

    def to_markdown(self) -> str:
        head = ["model", "role", "params", "MFLOPs/input", "size", "latency b1", f"throughput b{self.batch_size}",
                "peak mem", self.metric_name, "kept", "speed-up", "FoM", "Pareto"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            metric = _pct(r["metric"], r.get("metric_std"))
            pareto = "/".join(k for k, flag in (("size", r["pareto_size"]), ("latency", r["pareto_latency"])) if flag) or "-"
            lines.append("| " + " | ".join([
                r["name"], r["role"], _count(r['params']), _mflops(r["flops"]), _bytes(r["size_bytes"]),
                f"{r['latency_ms']:.3f} ms", f"{r['throughput']:,.0f}/s", _bytes(r["peak_bytes"]), metric,
                f"{100 * r['retained']:.1f}%", f"{r['speedup']:.1f}x ({r['speedup_latency']:.1f}x)",
                f"{r['fom']:+.2f}", pareto]) + " |")
        lines.append("")
        lines.append(f"Timings on {self.device}, {self.threads} thread(s): latency = median of repeated batch-1 "
                     f"forward passes after warm-up; throughput at batch {self.batch_size}. Speed-up = teacher FLOPs / "
                     "model FLOPs (measured batch-1 latency ratio in brackets). FoM = log2(speed-up) - (1 - kept) / "
                     f"{self.exchange:g}: net doublings of speed, {100 * self.exchange:g}% of the teacher's metric "
                     "worth one doubling. Pareto: on the front of metric vs size / vs latency.")
        lines.extend(self.notes)
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        """A compact fixed-width table for the console."""
        w = max(24, *(len(r["name"]) + 2 for r in self.rows))
        head = f"{'model':<{w}}{'params':>9}{'MFLOPs':>9}{'size':>10}{'lat b1':>10}{'peak':>10}  {self.metric_name:>16}{'kept':>8}{'speed-up':>10}{'FoM':>7}  Pareto"
        out = [head]
        for r in self.rows:
            pareto = "/".join(k for k, flag in (("size", r["pareto_size"]), ("lat", r["pareto_latency"])) if flag) or "-"
            out.append(f"{r['name']:<{w}}{_count(r['params']):>9}{_mflops(r['flops']):>9}{_bytes(r['size_bytes']):>10}"
                       f"{r['latency_ms']:>8.3f}ms{_bytes(r['peak_bytes']):>10}  {_pct(r['metric'], r.get('metric_std')):>16}"
                       f"{100 * r['retained']:>7.1f}%{r['speedup']:>9.1f}x{r['fom']:>+7.2f}  {pareto}")
        out.append(f"(timings: {self.device}, {self.threads} thread(s), median of repeats after warm-up; speed-up = "
                   f"teacher FLOPs / model FLOPs; FoM = log2(speed-up) - (1 - kept) / {self.exchange:g})")
        return "\n".join(out)

    def write(self, output_dir: str | Path, stem: str = "report", plot: bool = True) -> dict[str, Path]:
        """``<stem>.md``, ``<stem>.json`` and (``plot``) ``<stem>.png`` in ``output_dir``; returns their paths."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": out / f"{stem}.md", "json": out / f"{stem}.json"}
        paths["markdown"].write_text(self.to_markdown())
        paths["json"].write_text(json.dumps(self.to_json(), indent=2) + "\n")
        if plot:
            paths["png"] = plot_pareto(self, out / f"{stem}.png")
        return paths


def _pct(metric: float, std: float | None) -> str:
    text = f"{100 * metric:.2f}"
    return f"{text} ± {100 * std:.2f} %" if std is not None else f"{text} %"


def _mflops(n: float) -> str:
    return f"{n / 1e6:.3f}" if math.isfinite(n) else "n/a"


def _count(n: float) -> str:
    return f"{int(n):,}" if math.isfinite(n) else "n/a"


def _bytes(n: float) -> str:
    if not math.isfinite(n):
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def build_report(entries: Sequence[ModelEntry], example: Any, *, metric_name: str = "accuracy",
                 metric_fn: Callable[[nn.Module], float] | None = None, higher_is_better: bool = True,
                 batch_size: int = 256, warmup: int = 5, repeats: int = 30, exchange: float = FOM_EXCHANGE,
                 notes: Sequence[str] = ()) -> Report:
    """Measure every entry (see the module docstring). Exactly one entry has ``role="teacher"``; it is the
    reference of ``retained``, ``speedup`` and the figure of merit. ``example`` is a batch of real
    evaluation inputs (repeated to ``batch_size`` for throughput and memory): a tensor, a tuple of them
    (positional arguments) or a mapping of them (keyword arguments, e.g. a tokenised batch for a Hugging
    Face model); an entry with its own ``example`` is measured on that instead."""
    from .errors import KDConfigError

    teachers = [e for e in entries if e.role == "teacher"]
    if len(teachers) != 1:
        raise KDConfigError(f"a report needs exactly one teacher entry, got {len(teachers)}")
    for e in entries:
        if e.role not in ROLES:
            raise KDConfigError(f"report entry {e.name!r}: role {e.role!r} is not one of {ROLES}")
        if e.metric is None and metric_fn is None:
            raise KDConfigError(f"report entry {e.name!r} has no metric and no metric_fn was given")
    rows = []
    by_name: dict[str, dict] = {}
    measured = measure_all([e.model for e in entries], [e.example if e.example is not None else example
                                                        for e in entries],
                           batch_size=batch_size, warmup=warmup, repeats=repeats)
    for e, figures in zip(entries, measured):
        row = {"name": e.name, "role": e.role, "note": e.note, **figures}
        if e.flops_from is not None and e.flops_from in by_name:
            row["flops"] = by_name[e.flops_from]["flops"]
        if e.measured:
            unknown = set(e.measured) - set(row)
            if unknown:
                raise KDConfigError(f"report entry {e.name!r}: measured figures {sorted(unknown)} are not report fields")
            row.update({k: float(v) for k, v in e.measured.items()})
        row["metric"] = float(e.metric) if e.metric is not None else float(metric_fn(e.model))
        row["metric_std"] = e.metric_std
        row["per_seed"] = e.per_seed
        rows.append(row)
        by_name[e.name] = row
    t = by_name[teachers[0].name]
    by_flops = bool(t["flops"]) and math.isfinite(t["flops"])
    notes = list(notes)
    if not by_flops:  # e.g. a teacher run by dlib or onnxruntime: torch counts none of its operations
        notes.append(f"The teacher's FLOPs are unknown ({t['name']} runs outside torch's counter): speed-up and FoM "
                     "use the measured batch-1 latency ratio instead.")
    for r in rows:
        if higher_is_better:
            r["retained"] = r["metric"] / t["metric"] if t["metric"] else float("nan")
        else:
            r["retained"] = t["metric"] / r["metric"] if r["metric"] else float("nan")
        r["speedup_latency"] = t["latency_ms"] / r["latency_ms"]
        r["speedup"] = (t["flops"] / r["flops"] if r["flops"] else float("nan")) if by_flops else r["speedup_latency"]
        r["fom"] = figure_of_merit(r["retained"], r["speedup"], exchange)
    metric = [r["metric"] for r in rows]
    for key, cost in (("pareto_size", "size_bytes"), ("pareto_latency", "latency_ms")):
        for r, flag in zip(rows, pareto_front(metric, [r[cost] for r in rows], higher_is_better)):
            r[key] = flag
    device = str(_device_of(teachers[0].model))
    if device.startswith("cuda"):
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return Report(metric_name, higher_is_better, rows, device, torch.get_num_threads(), batch_size, exchange,
                  list(notes))


# ----------------------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        from .errors import KDConfigError

        raise KDConfigError("plots need matplotlib, which is not installed", hint="pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


ROLE_STYLE = {"teacher": ("tab:red", "s"), "student": ("tab:blue", "o"), "baseline": ("tab:gray", "^"),
              "assistant": ("tab:purple", "D"), "quantized": ("tab:green", "v")}


def _plain_log_ticks(axis) -> None:
    """Log-axis labels at 1, 2 and 5 times the powers of ten, written plainly (``20``, not ``2 x 10^1``), so
    an axis spanning less than a decade still has readable labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(plain)


def plot_pareto(report: Report, path: str | Path) -> Path:
    """Two panels, metric against size on disk and against batch-1 latency (log x), every model marked by
    role, the Pareto front drawn as a step line and its members ringed. Written as PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, cost, label, key in ((axes[0], "size_bytes", "size on disk (KB)", "pareto_size"),
                                 (axes[1], "latency_ms", f"latency at batch 1 (ms, {report.threads} thread(s))",
                                  "pareto_latency")):
        scale = 1 / 1024 if cost == "size_bytes" else 1.0
        for r in report.rows:
            color, marker = ROLE_STYLE.get(r["role"], ("k", "o"))
            x, y = r[cost] * scale, 100 * r["metric"]
            ax.scatter([x], [y], c=color, marker=marker, s=45, zorder=3)
            if r[key]:
                ax.scatter([x], [y], facecolors="none", edgecolors="k", s=160, linewidths=1.2, zorder=4)
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        front = sorted((r[cost] * scale, 100 * r["metric"]) for r in report.rows if r[key])
        if front:
            xs, ys = zip(*front)
            ax.step(xs, ys, where="post", color="k", lw=1, ls="--", label="Pareto front", zorder=2)
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{report.metric_name} (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    for role, (color, marker) in ROLE_STYLE.items():
        if any(r["role"] == role for r in report.rows):
            axes[0].scatter([], [], c=color, marker=marker, label=role)
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(f"{report.metric_name} vs size and latency ({report.device})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


NOT_TERMS = ("step", "epoch", "lr", "time")


def plot_loss_curves(log_jsonl: str | Path, path: str | Path | None = None) -> Path | None:
    """One panel per logged term of a training run's ``log.jsonl`` (loss, task, kd, ... against the
    step; ``eval/...`` metrics in their own panels). Writes ``path`` (default ``loss_curves.png`` next to
    the log); returns it, or ``None`` when the log has no numeric entries."""
    log_jsonl = Path(log_jsonl)
    series: dict[str, list[tuple[float, float]]] = {}
    if log_jsonl.is_file():
        for line in log_jsonl.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("step"), (int, float)):
                continue
            for k, v in entry.items():
                if k not in NOT_TERMS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    series.setdefault(k, []).append((entry["step"], float(v)))
    if not series:
        return None
    plt = _pyplot()
    names = sorted(series, key=lambda k: (k != "loss", k))
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        xs, ys = zip(*series[name])
        ax.plot(xs, ys, lw=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path) if path is not None else log_jsonl.with_name("loss_curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["ModelEntry", "Report", "build_report", "measure", "count_params", "count_flops", "size_on_disk",
           "time_forward", "peak_forward_bytes", "figure_of_merit", "pareto_front", "plot_pareto",
           "plot_loss_curves", "FOM_EXCHANGE"]
