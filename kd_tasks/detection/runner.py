"""``KDRunner``: MMEngine's ``Runner`` with atomic checkpoint files.

MMEngine 0.10.7 writes a checkpoint straight to its final name, so a kill during the write leaves a
truncated ``iter_N.pth`` that ``last_checkpoint`` points to. Here the file is written under a temporary
name in the same directory, fsynced, renamed over the final name and the directory fsynced: a checkpoint
file is either complete or absent. (:func:`kd_tasks.detection.train.latest_intact_checkpoint` also skips a
damaged file when resuming, for files written by anything else.) ``kd-tasks detect`` runs with this runner;
in a config of your own, ``runner_type = "KDRunner"`` selects it.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmengine.dist import is_main_process
from mmengine.runner import Runner

from mmdet.registry import RUNNERS

from kd_tasks.shared.checkpoint import fsync_dir

__all__ = ["KDRunner"]


@RUNNERS.register_module()
class KDRunner(Runner):
    """A ``Runner`` whose ``save_checkpoint`` writes each file atomically (local directories)."""

    def save_checkpoint(self, out_dir, filename, *args, **kwargs):
        local = "://" not in str(out_dir) and not kwargs.get("backend_args") and not kwargs.get("file_client_args")
        if not local or not is_main_process():  # MMEngine writes on the main process only
            return super().save_checkpoint(out_dir, filename, *args, **kwargs)
        final = Path(out_dir) / filename
        tmp_name = f".{filename}.tmp-{os.getpid()}"
        tmp = Path(out_dir) / tmp_name
        try:
            super().save_checkpoint(out_dir, tmp_name, *args, **kwargs)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fsync_dir(final.parent)
        finally:
            if tmp.exists():
                tmp.unlink()
