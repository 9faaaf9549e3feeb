"""The training loop every scheme and task adapter shares, built on Hugging Face Accelerate.

    scheme = Distiller(student, teacher, terms=[...])          # or any scheme of kd_tasks.shared.schemes
    result = Trainer(scheme, train_set, TrainConfig(output_dir="runs/kd", epochs=30), eval_fn=accuracy).fit()
    result.model                                               # the exported student

What one loop gives every scheme:

- mixed precision (``mixed_precision="auto"``: bf16 on GPUs that support it, else fp16; none on
  CPU), gradient accumulation (``accelerator.accumulate``; the loss is divided by the number of
  micro-batches), gradient clipping (``accelerator.clip_grad_norm_``, norm 10 by default), LR
  warm-up + cosine / linear / constant schedules (``LambdaLR``, stepped once per optimiser step);
- per-term loss means logged every ``log_every`` steps to the console, to TensorBoard
  (``<output_dir>/tensorboard``) and to ``<output_dir>/log.jsonl``; a tqdm progress bar;
  ``eval_fn(model) -> {metric: value}`` every ``eval_every`` steps and at the end;
- atomic checkpoints every ``save_every`` steps and at the end (see :mod:`.checkpoint`): trained
  modules, optimisers, schedulers, AMP scaler, RNG states of every process, the data position,
  content hashes and the run's identity. ``resume=True`` continues from the newest intact one (a
  damaged newer one is named and skipped) and reaches the same weights as an uninterrupted run (same
  seed, same number of processes); a checkpoint of another run (other student, initial weights,
  teacher, recipe, data or training settings) is refused naming the part; more epochs / steps (a new
  end of the LR schedule) and the logging / evaluation / saving intervals may change and are listed;
- an ``output_dir`` holding another run is refused unless ``resume`` or ``overwrite``;
  ``log.jsonl`` is rewritten by every run (a resumed run keeps the entries up to its checkpoint);
- Ctrl-C finishes the current step, saves it, then raises :class:`TrainingInterrupted` (a
  ``KeyboardInterrupt``; the CLI prints ``saved step N; continue with --resume`` and exits 130);
  further Ctrl-C are deferred until the checkpoint is complete;
- several processes: ``accelerate launch --multi_gpu --num_processes N script.py`` (DDP; NCCL on
  GPUs; on a machine without GPUs the same command runs N CPU processes on gloo, as the tests do).
  Each process reads its own shard of every epoch (:mod:`.sampling`); ``batch_size`` is per process. Teachers are never given to DDP: schemes
  keep them outside their module tree, so ``accelerator.prepare`` only moves them to the device.
  Auxiliary parameters (a discriminator) are excluded from DDP too; their gradients are averaged
  across processes by the loop;
- a scheme's extra optimisation steps: for every ``name`` in ``scheme.auxiliary_parameters()`` an
  own optimiser steps on ``scheme.auxiliary_loss(name)`` right after the main step (in full
  precision, without loss scaling);
- cached teacher outputs: with ``teacher_cache=``, each forward receives
  ``teacher_outputs=cache.lookup(index)`` and the teacher never runs;
- a non-finite loss raises :class:`NonFiniteLossError` naming the term and the step.

At the end only the exported model (``scheme.export_model()``) is written, as
``<output_dir>/export/model.safetensors`` (plus ``connectors.safetensors`` with
``export_connectors=True``).
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import signal
import threading
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import (
    check_identity,
    digest,
    load_checkpoint,
    load_latest_intact,
    prepare_output_dir,
    preserved_rng,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_digest,
)
from .errors import KDConfigError, NonFiniteLossError, RunMismatchError, TrainingInterrupted
from .run_log import RunLog
from .sampling import EpochBatches, epoch_loader
from .train_config import LRLambda, TrainConfig, build_optimizer, resolve_mixed_precision

logger = logging.getLogger(__name__)

@dataclass
class TrainResult:
    model: nn.Module
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    export_dir: Path | None = None


def default_split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, target)`` of a batch: ``(x, y)`` / ``(x,)`` tuples, or dicts with ``inputs`` and
    ``target``/``labels`` (without ``inputs``, the other keys are the inputs); else ``(batch, None)``."""
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, Mapping):
        target = batch.get("target", batch.get("labels"))
        inputs = batch["inputs"] if "inputs" in batch else {k: v for k, v in batch.items() if k not in ("target", "labels")}
        return inputs, target
    return batch, None


def exported_model(scheme: nn.Module) -> nn.Module:
    """``scheme.export_model()``, else ``scheme.student``, else the scheme itself."""
    if hasattr(scheme, "export_model"):
        return scheme.export_model()
    return getattr(scheme, "student", scheme)


def exported_connectors(scheme: nn.Module) -> nn.Module | None:
    if hasattr(scheme, "export_connectors"):
        return scheme.export_connectors()
    return getattr(scheme, "connectors", None)


def _accepted(fn: Callable, *names: str) -> set[str]:
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return set(names)
    return {n for n in names if n in params}


def _allow_new_precision(mixed_precision: str, cpu: bool) -> None:
    """Let a later run in the same process use another precision or device.

    Accelerate keeps one process-wide ``AcceleratorState`` and refuses an ``Accelerator`` whose
    ``mixed_precision``/``cpu`` differ from the first one. When they differ, reset that state (as
    Accelerate's own tests do); the distributed state (``PartialState``) is kept.
    """
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    on_other_device = cpu and getattr(shared.get("device"), "type", "cpu") != "cpu"
    if shared.get("_mixed_precision", mixed_precision) != mixed_precision or on_other_device:
        AcceleratorState._reset_state()


# settings a resumed run must share with its checkpoint (else it is another run), and those it may change
RUN_SETTINGS = ("seed", "batch_size", "gradient_accumulation_steps", "shuffle", "drop_last", "seed_samples", "optimizer",
                "lr", "momentum", "nesterov", "betas", "weight_decay", "scheduler", "warmup_steps", "aux_optimizer",
                "aux_lr", "mixed_precision", "max_grad_norm")
CHANGEABLE_SETTINGS = ("epochs", "max_steps", "min_lr_ratio", "eval_every", "save_every", "keep_checkpoints",
                       "log_every", "num_workers")
DATA_PROBES = 8  # samples read to fingerprint a training set


class _Interrupt:
    """SIGINT sets a flag the loop reads at the next step boundary; further SIGINTs are deferred (the step
    in progress and its checkpoint are completed first, so the checkpoint stays exact)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            logger.warning("interrupt: still finishing the current step and saving it; stopping right after "
                           "(this Ctrl-C is deferred so the checkpoint stays exact)")
            return
        self.requested = True
        logger.warning("interrupt: finishing this step, saving a checkpoint, then stopping")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


class Trainer:
    """Trains one scheme on one map-style dataset (see the module docstring).

    Args:
        scheme: a :class:`~kd_tasks.shared.distiller.Distiller` or any scheme module.
        train_dataset: map-style dataset of samples the default collate (or ``collate_fn``) batches.
        config: a :class:`TrainConfig` or its dict.
        eval_fn: ``eval_fn(model) -> {name: number}``, called on the main process with the exported
            model in eval mode.
        collate_fn, split_batch: how samples become a batch and a batch ``(inputs, target)``.
        teacher_cache: a :class:`~kd_tasks.shared.cache.TeacherCache` over ``train_dataset``.
        accelerator: an existing ``accelerate.Accelerator`` (one is created from the config otherwise).
        identity: extra parts of the run's identity (``{"recipe": ..., "data": ...}``: JSON-able values
            or strings), recorded in every checkpoint and compared on resume with the parts the
            loop computes itself (student architecture and initial weights, teacher weights, a
            fingerprint of the data, the training settings).
    """

    def __init__(
        self,
        scheme: nn.Module,
        train_dataset: Any,
        config: TrainConfig | Mapping[str, Any],
        *,
        eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
        collate_fn: Callable | None = None,
        split_batch: Callable[[Any], tuple[Any, Any]] = default_split_batch,
        teacher_cache: Any = None,
        accelerator: Any = None,
        identity: Mapping[str, Any] | None = None,
    ):
        self.config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        self.extra_identity = {k: (v if isinstance(v, str) else digest(v)) for k, v in (identity or {}).items()}
        self.config.validate()
        self.scheme = scheme
        self.dataset = train_dataset
        self.eval_fn = eval_fn
        self.collate_fn = collate_fn
        self.split_batch = split_batch
        self.teacher_cache = teacher_cache
        if teacher_cache is not None and len(teacher_cache) != len(train_dataset):
            raise KDConfigError(
                f"teacher cache holds {len(teacher_cache)} samples, the training set {len(train_dataset)}: "
                "build the cache on the training set (its deterministic view)"
            )
        if teacher_cache is not None and hasattr(teacher_cache, "check_samples"):
            teacher_cache.check_samples(train_dataset)  # every row belongs to the training set's sample
        if len(train_dataset) == 0:
            raise KDConfigError("the training set is empty", hint="give a dataset with samples")
        self.accelerator = accelerator
        self.history: list[dict[str, float]] = []
        self.metrics: dict[str, float] = {}

    # ------------------------------------------------------------------------------------ setup
    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        cfg = self.config
        precision = resolve_mixed_precision(cfg.mixed_precision, cfg.cpu)
        _allow_new_precision(precision, cfg.cpu)
        return Accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            cpu=cfg.cpu,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)],
        )

    def _sampler(self, epoch: int, start_batch: int = 0) -> EpochBatches:
        cfg, acc = self.config, self.accelerator
        return EpochBatches(len(self.dataset), cfg.batch_size, cfg.seed, epoch, acc.process_index,
                            acc.num_processes, cfg.shuffle, cfg.drop_last, start_batch, cfg.seed_samples)

    def _loader(self, epoch: int, start_batch: int = 0):
        return epoch_loader(self.dataset, self._sampler(epoch, start_batch), self.collate_fn,
                            self.config.num_workers, pin_memory=self.accelerator.device.type == "cuda")

    def _batch(self, batch: Any, index: torch.Tensor) -> tuple[Any, Any, dict[str, Any]]:
        from accelerate.utils import send_to_device

        device = self.accelerator.device
        inputs, target = self.split_batch(send_to_device(batch, device))
        kwargs: dict[str, Any] = {}
        if "index" in self._forward_kwargs:
            kwargs["index"] = index.to(device)
        if self.teacher_cache is not None:
            kwargs["teacher_outputs"] = self.teacher_cache.lookup(index, device=device)
        return inputs, target, kwargs

    def _dry_run(self, scheme: nn.Module) -> None:
        """Build lazy layers from one batch, leaving every generator untouched."""
        with preserved_rng():
            batch, index = next(iter(self._loader(0)))
            inputs, target, kwargs = self._batch(batch, index)
            prepare = getattr(scheme, "prepare", None)
            if prepare is not None and (self.teacher_cache is None or "teacher_outputs" in _accepted(prepare, "teacher_outputs")):
                accepted = _accepted(prepare, "target", "index", "teacher_outputs")
                extra = {k: v for k, v in kwargs.items() if k in accepted}
                if "target" in accepted:
                    extra["target"] = target
                prepare(inputs, **extra)
            else:
                was_training = scheme.training
                scheme.eval()
                with torch.no_grad():
                    scheme(inputs, target, **kwargs)
                scheme.train(was_training)

    def _setup(self):
        from accelerate.utils import set_seed

        cfg = self.config
        if self.accelerator is None:
            self.accelerator = self._make_accelerator()
        acc = self.accelerator
        prepare_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite, remove=acc.is_main_process)
        acc.wait_for_everyone()
        set_seed(cfg.seed)
        scheme = self.scheme.to(acc.device)
        scheme.train()
        if acc.num_processes > 1 and hasattr(scheme, "check_finite"):
            scheme.check_finite = False  # one process raising alone would hang the others: _check is collective
        self._forward_kwargs = _accepted(scheme.forward, "index", "teacher_outputs")
        if self.teacher_cache is not None and "teacher_outputs" not in self._forward_kwargs:
            raise KDConfigError(f"{type(scheme).__name__}.forward takes no teacher_outputs=; it cannot use a teacher cache")
        per_epoch = self._sampler(0).batches_per_epoch()
        if per_epoch == 0:
            raise KDConfigError(
                f"an epoch has no full batch: {len(self.dataset)} samples over {acc.num_processes} process(es) with "
                f"batch_size {cfg.batch_size}; lower batch_size or set drop_last: false"
            )
        self.max_steps = cfg.max_steps or math.ceil(cfg.epochs * per_epoch / cfg.gradient_accumulation_steps)
        self._dry_run(scheme)
        self.identity = self._identity(scheme)

        aux_params = scheme.auxiliary_parameters() if hasattr(scheme, "auxiliary_parameters") else {}
        names = {id(p): n for n, p in scheme.named_parameters()}
        ignored = [names[id(p)] for ps in aux_params.values() for p in ps]
        if ignored:
            scheme._ddp_params_and_buffers_to_ignore = ignored
        trainable = (scheme.trainable_parameters() if hasattr(scheme, "trainable_parameters")
                     else [p for p in scheme.parameters() if p.requires_grad])
        aux_ids = {id(p) for ps in aux_params.values() for p in ps}
        if aux_ids & {id(p) for p in trainable}:
            raise KDConfigError(f"{type(scheme).__name__}: auxiliary parameters must not be in trainable_parameters()")
        optimizer = build_optimizer(cfg.optimizer, trainable, cfg, cfg.lr)
        lr_lambda = LRLambda(cfg.scheduler, self.max_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.aux = {}
        for name, params in aux_params.items():
            opt = build_optimizer(cfg.aux_optimizer or cfg.optimizer, list(params), cfg, cfg.aux_lr or cfg.lr)
            aux_lambda = LRLambda(cfg.scheduler, self.max_steps, cfg.warmup_steps, cfg.min_lr_ratio)
            self.aux[name] = (opt, torch.optim.lr_scheduler.LambdaLR(opt, aux_lambda))
        self.model, self.optimizer = acc.prepare(scheme, optimizer)
        self.unwrapped = acc.unwrap_model(self.model)
        self.trainable = trainable
        if acc.num_processes > 1:
            for ps in aux_params.values():
                for p in ps:
                    dist.broadcast(p.data, src=0)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0

    # ------------------------------------------------------------------------------------ identity
    def _settings(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        return {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]) for k in RUN_SETTINGS}

    def _data_fingerprint(self) -> str:
        """Length and the content of a few evenly spaced samples (read with fixed seeds, so random
        augmentation reads the same each time): a reordered or different training set differs."""
        from .cache import sample_fingerprint

        n = len(self.dataset)
        indices = sorted({round(i * (n - 1) / max(DATA_PROBES - 1, 1)) for i in range(min(DATA_PROBES, n))})
        parts = [f"len={n}"]
        with preserved_rng():
            for i in indices:
                random.seed(i)
                np_seed(i)
                torch.manual_seed(i)
                parts.append(sample_fingerprint(self.dataset[i]))
        return digest(parts)

    def _identity(self, scheme: nn.Module) -> dict[str, str]:
        """The parts that make this run this run (see :func:`~.checkpoint.check_identity`)."""
        state = scheme.state_dict()
        identity = {
            "student_architecture": digest([type(scheme).__name__, state_digest(state, with_values=False)]),
            "student_init": state_digest(state),
            "data": self._data_fingerprint(),
            "settings": digest(self._settings()),
            "processes": str(self.accelerator.num_processes),
        }
        teachers = _teacher_fingerprints(scheme)
        if self.teacher_cache is not None:
            teachers.append(getattr(getattr(self.teacher_cache, "key", None), "digest", None) or "cache")
        if teachers:
            identity["teacher"] = digest(teachers)
        identity.update(self.extra_identity)
        return identity

    def _check_resumed_identity(self, state: Mapping[str, Any], path: Path) -> None:
        saved_cfg = state.get("config", {}) or {}
        now_cfg = asdict(self.config)

        def norm(v):
            return list(v) if isinstance(v, tuple) else v

        changed = [f"{k} {saved_cfg[k]!r} -> {norm(now_cfg[k])!r}" for k in RUN_SETTINGS
                   if k in saved_cfg and saved_cfg[k] != norm(now_cfg[k])]
        details = {"settings": "changed: " + ", ".join(changed)} if changed else {}
        check_identity(state.get("identity"), self.identity, path, details)
        allowed = [f"{k} {saved_cfg[k]!r} -> {now_cfg[k]!r}" for k in CHANGEABLE_SETTINGS
                   if k in saved_cfg and saved_cfg[k] != now_cfg[k]]
        if allowed:
            logger.warning("resuming %s with changed settings (allowed): %s", path, "; ".join(allowed))
            if self.accelerator.is_main_process and self.config.console:
                print(f"resuming {path} with changed settings: {'; '.join(allowed)}", flush=True)

    # ------------------------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        acc = self.accelerator
        return {
            "model": self.unwrapped.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "aux": {n: {"optimizer": o.state_dict(), "scheduler": s.state_dict()} for n, (o, s) in self.aux.items()},
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "progress": {"step": self.step, "epoch": self.epoch, "batch": self.batch_in_epoch},
            "history": self.history,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()},
            "identity": dict(self.identity),
        }

    def save(self, rng: dict[str, Any] | None = None) -> Path:
        acc = self.accelerator
        path = save_checkpoint(self.config.output_dir, self.step, self._state, acc.process_index,
                               acc.is_main_process, acc.wait_for_everyone, self.config.keep_checkpoints, rng,
                               identity=self.identity)
        self._last_checkpoint = path
        return path

    def _mark_boundary(self) -> None:
        """Remember the position and generators after a completed step (for an abrupt interrupt)."""
        self._boundary = (self.step, self.epoch, self.batch_in_epoch, rng_state())
        self._dirty = False  # no module, optimiser or buffer has changed since this boundary

    def _save_at_boundary(self) -> bool:
        """Save after an abrupt KeyboardInterrupt: the last completed step's position and generators.

        Only when nothing has changed since that step (the interrupt came while the next batch was
        being read): a half-done step (BatchNorm statistics or weights already updated) is not saved,
        so every checkpoint resumes exactly. Returns whether it saved.
        """
        if self._dirty:
            logger.warning("interrupted inside step %d: not saving a half-done step; the latest checkpoint is %s",
                           self._boundary[0] + 1, self._last_checkpoint)
            return False
        self.step, self.epoch, self.batch_in_epoch, rng = self._boundary
        logger.warning("interrupted: saving a checkpoint at step %d", self.step)
        self.save(rng)
        return True

    def _resume(self) -> None:
        cfg, acc = self.config, self.accelerator
        if cfg.resume is True:
            found = load_latest_intact(cfg.output_dir, acc.process_index)
            if found is None:
                logger.warning("resume: no checkpoint in %s; starting from scratch", cfg.output_dir)
                return
            path, state, rng = found
        else:
            path = Path(cfg.resume)
            if not path.exists():
                raise KDConfigError(f"resume: checkpoint {str(path)!r} does not exist",
                                    hint="give a checkpoints/step-... directory, or resume=True for the latest")
            state, rng = load_checkpoint(path, acc.process_index)
        self._check_resumed_identity(state, path)
        try:
            self.unwrapped.load_state_dict(state["model"])
        except RuntimeError as e:  # an old checkpoint without identity, of another architecture
            raise RunMismatchError(f"checkpoint {str(path)!r} belongs to another run: student architecture differs "
                                   f"({str(e).splitlines()[0]})",
                                   hint="resume with the same student and recipe, or start a new run with "
                                        "--overwrite or another output directory") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name, (opt, sched) in self.aux.items():
            opt.load_state_dict(state["aux"][name]["optimizer"])
            sched.load_state_dict(state["aux"][name]["scheduler"])
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])
        progress = state["progress"]
        self.step, self.epoch, self.batch_in_epoch = progress["step"], progress["epoch"], progress["batch"]
        self.history = list(state.get("history", []))
        if rng is None:
            logger.warning("checkpoint %s has no RNG state for process %d (another process count?): the run "
                           "continues but will not match an uninterrupted one exactly", path, acc.process_index)
        else:
            set_rng_state(rng)
        self._last_checkpoint = path
        self._resumed_step = self.step
        logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        """Train until ``max_steps``; returns the exported model, history and last metrics."""
        self._setup()
        cfg, acc = self.config, self.accelerator
        self._last_checkpoint = None
        self._evaluated_step = None
        self._saved_on_interrupt = False
        self._resumed_step = None
        if cfg.resume:
            self._resume()
        self._mark_boundary()
        self.log = RunLog(cfg.output_dir, acc.is_main_process, console=cfg.console, tensorboard=cfg.tensorboard,
                          progress=cfg.progress, total=self.max_steps, initial=self.step,
                          resume_step=self._resumed_step)
        self._window: dict[str, list] = defaultdict(list)
        with _Interrupt() as interrupt:
            self._interrupt = interrupt
            try:
                while self.step < self.max_steps:
                    self._run_epoch()
            except TrainingInterrupted:
                self.log.close()
                raise
            except KeyboardInterrupt:
                self.log.close()
                if not self._saved_on_interrupt and acc.num_processes == 1 and self._save_at_boundary():
                    raise TrainingInterrupted(self.step, self._last_checkpoint) from None
                raise
            except BaseException:
                self.log.close()
                raise
            try:
                if self.eval_fn is not None and self._evaluated_step != self.step:
                    self._evaluate()
                if self._last_checkpoint is None or self._last_checkpoint.name != f"step-{self.step:08d}":
                    self.save()
            finally:
                self.log.close()
            if self.accelerator.is_main_process:
                self._plot_losses()
            export_dir = self._export() if cfg.export else None
            if interrupt.requested:  # Ctrl-C after the last step: everything is saved and exported
                raise TrainingInterrupted(self.step, self._last_checkpoint)
        return TrainResult(exported_model(self.unwrapped), self.step, self.history, self.metrics,
                           self._last_checkpoint, export_dir)

    def _plot_losses(self) -> None:
        """``<output_dir>/loss_curves.png``: one panel per logged term (matplotlib, when installed)."""
        try:
            from .report import plot_loss_curves
        except ImportError:
            return
        try:
            plot_loss_curves(Path(self.config.output_dir) / "log.jsonl")
        except ImportError:  # matplotlib missing: the numbers are in log.jsonl and TensorBoard
            pass

    def _run_epoch(self) -> None:
        acc = self.accelerator
        for batch, index in self._loader(self.epoch, self.batch_in_epoch):
            inputs, target, kwargs = self._batch(batch, index)
            self._dirty = True
            if hasattr(self.unwrapped, "set_step"):
                self.unwrapped.set_step(self.step)
            with acc.accumulate(self.model):
                out = self.model(inputs, target, **kwargs)
                self._check(out, "")
                acc.backward(out["loss"])
                if acc.sync_gradients and self.config.max_grad_norm:
                    out["grad_norm"] = acc.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
                self.optimizer.step()
                if acc.sync_gradients and not self.optimizer.step_was_skipped:
                    self.scheduler.step()
                self.optimizer.zero_grad()
            for name in self.aux:
                out.update(self._auxiliary_step(name))
            self.batch_in_epoch += 1
            self._record(out)
            if acc.sync_gradients:
                self.step += 1
                self.log.advance()
                self._after_step()
                self._mark_boundary()
                if self.step >= self.max_steps:
                    return
        if hasattr(self.unwrapped, "on_epoch_end"):
            self.unwrapped.on_epoch_end(self.epoch)
        self.epoch += 1
        self.batch_in_epoch = 0

    def _auxiliary_step(self, name: str) -> dict[str, Any]:
        """One micro-batch of an extra optimisation step (full precision, gradients averaged)."""
        acc, (opt, sched) = self.accelerator, self.aux[name]
        with torch.autocast(device_type=acc.device.type, enabled=False):
            out = self.unwrapped.auxiliary_loss(name)
        self._check(out, f"{name}/")
        (out["loss"] / self.config.gradient_accumulation_steps).backward()
        if acc.sync_gradients:
            params = [p for group in opt.param_groups for p in group["params"]]
            if acc.num_processes > 1:
                for p in params:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= acc.num_processes
            if self.config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
        return {f"{name}/{k}": v for k, v in out.items() if k != "loss"}

    def _check(self, out: Mapping[str, Any], prefix: str) -> None:
        """Raise NonFiniteLossError on every process if any process has a non-finite term."""
        acc = self.accelerator
        bad = [k for k, v in out.items() if isinstance(v, torch.Tensor) and v.dim() == 0
               and v.is_floating_point() and not bool(torch.isfinite(v.detach()))]
        flag = torch.tensor([float(bool(bad))], device=acc.device)
        if acc.num_processes > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            where = f"loss term {prefix}{bad[0]!r} is {out[bad[0]].item()}" if bad else "a loss term on another process is not finite"
            raise NonFiniteLossError(
                f"{where} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch}); lower the learning "
                "rate, keep gradient clipping on (max_grad_norm), or check the inputs"
            )

    def _record(self, out: Mapping[str, Any]) -> None:
        for k, v in out.items():
            if k == "student_output":
                continue
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                self._window[k].append(v.detach().float())
            elif isinstance(v, (int, float)):
                self._window[k].append(torch.tensor(float(v)))

    def _interrupted(self) -> bool:
        flag = torch.tensor([float(self._interrupt.requested)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def _after_step(self) -> None:
        cfg = self.config
        last = self.step >= self.max_steps
        if self.step % cfg.log_every == 0 or last:
            self._log()
        if self.eval_fn is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
            self._evaluate()
        if cfg.save_every and self.step % cfg.save_every == 0 and not last:
            self.save()
        if self._interrupted():
            if self._last_checkpoint is None or self._last_checkpoint.name != f"step-{self.step:08d}":
                self.save()
            self._saved_on_interrupt = True
            logger.warning("saved step %d to %s; continue with resume=True (CLI: --resume)", self.step,
                           self._last_checkpoint)
            raise TrainingInterrupted(self.step, self._last_checkpoint)

    # ------------------------------------------------------------------------------------ output
    def _log(self) -> None:
        entry = {"step": self.step, "epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"]}
        for k, values in self._window.items():
            entry[k] = torch.stack(values).mean().item()
        self._window.clear()
        self.history.append(entry)
        self.log.scalars("train", entry, self.step, jsonl=True)

    def _evaluate(self) -> None:
        acc = self.accelerator
        self._evaluated_step = self.step
        if acc.is_main_process:
            model = exported_model(self.unwrapped)
            was_training = model.training
            model.eval()
            with preserved_rng(), torch.no_grad():
                metrics = {k: float(v) for k, v in self.eval_fn(model).items()}
            model.train(was_training)
            self.unwrapped.train()
            self.metrics = metrics
            entry = {"step": self.step, **{f"eval/{k}": v for k, v in metrics.items()}}
            if self.history and self.history[-1].get("step") == self.step:
                self.history[-1].update(entry)
            else:
                self.history.append(entry)
            self.log.scalars("eval", metrics, self.step)
        acc.wait_for_everyone()

    def _export(self) -> Path | None:
        from safetensors.torch import save_model

        acc = self.accelerator
        out = Path(self.config.output_dir) / "export"
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            save_model(exported_model(self.unwrapped), str(out / "model.safetensors"))
            connectors = exported_connectors(self.unwrapped) if self.config.export_connectors else None
            if connectors is not None and any(True for _ in connectors.parameters()):
                save_model(connectors, str(out / "connectors.safetensors"))
        acc.wait_for_everyone()
        return out


def np_seed(seed: int) -> None:
    import numpy as np

    np.random.seed(seed % 2**32)


def _teacher_fingerprints(scheme: nn.Module) -> list[str]:
    """Fingerprints of the teachers a scheme holds (``teacher`` / ``teachers`` attributes, kept out of its
    module tree): each one's weights, or its cache's key for a cached teacher."""
    found: list[nn.Module] = []
    for attr in ("teacher", "teachers"):
        value = getattr(scheme, attr, None)
        if isinstance(value, nn.Module) and not isinstance(value, nn.ModuleList):
            found.append(value)
        elif isinstance(value, (list, tuple, nn.ModuleList)):
            found.extend(v for v in value if isinstance(v, nn.Module))
    out = []
    for t in found:
        cache = getattr(t, "cache", None)
        key = getattr(getattr(cache, "key", None), "digest", None)
        out.append(key if key else state_digest(t.state_dict()))
    return out


def train(scheme: nn.Module, train_dataset: Any, config: TrainConfig | Mapping[str, Any], **kwargs: Any) -> TrainResult:
    """``Trainer(scheme, train_dataset, config, **kwargs).fit()``."""
    return Trainer(scheme, train_dataset, config, **kwargs).fit()


__all__ = ["TrainConfig", "TrainResult", "Trainer", "train", "LRLambda", "build_optimizer",
           "resolve_mixed_precision", "default_split_batch", "exported_model", "TrainingInterrupted",
           "RUN_SETTINGS", "CHANGEABLE_SETTINGS"]
