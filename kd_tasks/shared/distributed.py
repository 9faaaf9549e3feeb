"""Ending a multi-process (``torchrun``) run cleanly."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def process_group_teardown() -> Iterator[None]:
    """Around a whole run: when the body finishes, wait for every rank, then destroy the process group.

    Without this, a rank that finishes early (rank 1, while rank 0 still evaluates and writes the report)
    exits with gloo threads still serving the group and aborts (``terminate called without an active
    exception``, SIGABRT), failing the launch. After an error there is no barrier (a failed rank may never
    arrive); the group is still destroyed. A single process without a group is untouched. Every subcommand
    runs inside it through :func:`kd_tasks.shared.errors.run_cli`.
    """
    finished = False
    try:
        yield
        finished = True
    finally:
        dist = sys.modules.get("torch.distributed")  # never imported: no group to end (and no torch import here)
        if dist is not None and dist.is_available() and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()
