"""Where a training run reports: console, TensorBoard, ``log.jsonl`` and a progress bar.

Only the main process writes; on the others every method is a no-op (messages still reach the
``logging`` logger). Layout under ``output_dir``: ``tensorboard/`` (event files, scalars named
``train/<term>`` and ``eval/<metric>``) and ``log.jsonl`` (one JSON object per logged step).
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
    ):
        self.output_dir = Path(output_dir)
        self.is_main = is_main
        self.console = console and is_main
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
        return SummaryWriter(str(self.output_dir / "tensorboard"))

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
