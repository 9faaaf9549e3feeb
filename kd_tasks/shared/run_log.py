"""Where a training run reports: console, TensorBoard, ``log.jsonl`` and a progress bar.

Only the main process writes; on the others every method is a no-op (messages still reach the
``logging`` logger). Layout under ``output_dir``: ``tensorboard/`` (event files, scalars named
``train/<term>`` and ``eval/<metric>``) and ``log.jsonl`` (one JSON object per logged step).

``log.jsonl`` belongs to one run: a new run starts it empty; a run resumed from the checkpoint of
step S keeps the entries up to S (those after it were logged by the interrupted attempt and are
logged again) and TensorBoard drops its events after S.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger("kd_tasks.shared.training")

_NOT_SCALARS = ("step", "epoch")


class RunLog:
    def __init__(
        self,
        output_dir: str | Path,
        is_main: bool,
        *,
        console: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
        total: int = 0,
        initial: int = 0,
        resume_step: int | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.is_main = is_main
        self.console = console and is_main
        self.resume_step = resume_step
        if is_main:
            self._start_jsonl(resume_step)
        self.writer = self._writer() if tensorboard and is_main else None
        self.bar = None
        if progress and is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def _writer(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            logger.warning("tensorboard is not installed; logging to the console and log.jsonl only")
            return None
        purge = None if self.resume_step is None else self.resume_step + 1
        return SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=purge)

    def _start_jsonl(self, resume_step: int | None) -> None:
        """Start ``log.jsonl`` empty, or (resuming at ``resume_step``) keep only the entries up to it."""
        from .checkpoint import atomic_write_bytes

        path = self.output_dir / "log.jsonl"
        kept: list[str] = []
        if resume_step is not None and path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if isinstance(entry, dict) and isinstance(entry.get("step"), (int, float)) and entry["step"] <= resume_step:
                    kept.append(line)
        if kept or path.exists():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())

    def message(self, text: str) -> None:
        if self.console:
            from tqdm.auto import tqdm

            tqdm.write(text)
        logger.info(text)

    def scalars(self, group: str, entry: Mapping[str, Any], step: int, jsonl: bool = False) -> None:
        """Log ``entry``'s numbers under ``group/`` (TensorBoard, console; ``log.jsonl`` if asked)."""
        values = {k: v for k, v in entry.items() if k not in _NOT_SCALARS}
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{group}/{k}", v, step)
        self.message(f"step {step} {group}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
        if jsonl and self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with (self.output_dir / "log.jsonl").open("a") as f:
                f.write(json.dumps(dict(entry)) + "\n")

    def advance(self, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


__all__ = ["RunLog"]
