"""``RunLog`` (kd_tasks/shared/run_log.py): log.jsonl belongs to one run; a resumed run keeps the entries up to
its checkpoint; only the main process writes."""

from __future__ import annotations

import json

from kd_tasks.shared.run_log import RunLog


def steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def log(out, resume_step=None, is_main=True):
    return RunLog(out, is_main, console=False, tensorboard=False, progress=False, resume_step=resume_step)


def test_a_new_run_starts_the_log_empty_and_a_resumed_one_keeps_entries_up_to_its_step(tmp_path):
    first = log(tmp_path)
    for step in range(1, 6):
        first.scalars("train", {"step": step, "loss": 1.0 / step}, step, jsonl=True)
    first.close()
    path = tmp_path / "log.jsonl"
    assert steps(path) == [1, 2, 3, 4, 5]
    with path.open("a") as f:
        f.write('{"step": 6, "loss"')  # a line cut by a crash

    resumed = log(tmp_path, resume_step=3)  # the checkpoint was at step 3: steps 4-5 are logged again
    assert steps(path) == [1, 2, 3]
    resumed.scalars("train", {"step": 4, "loss": 0.2}, 4, jsonl=True)
    assert steps(path) == [1, 2, 3, 4]
    resumed.close()

    fresh = log(tmp_path)  # a new run (the caller refused or cleared a used directory first)
    assert path.read_text() == ""
    fresh.close()


def test_other_processes_write_nothing(tmp_path):
    other = log(tmp_path, is_main=False)
    other.scalars("train", {"step": 1, "loss": 0.5}, 1, jsonl=True)
    other.close()
    assert not (tmp_path / "log.jsonl").exists()
