"""The shared training loop: exact resume, accumulation, clipping, schedules, checkpoints, export,
logging and two CPU processes on gloo."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_tasks.shared.checkpoint import latest_checkpoint, list_checkpoints
from kd_tasks.shared.distiller import Distiller
from kd_tasks.shared.errors import KDConfigError, NonFiniteLossError
from kd_tasks.shared.schemes import build_scheme
from kd_tasks.shared.training import LRLambda, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[2]
C = 5
SETUP = 8 + 8  # reads before the first step: the dry-run batch, then the training-set fingerprint's probes


def net(hidden: int = 16, seed: int = 0, dropout: float = 0.0, bn: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(12, hidden)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, C)]
    return nn.Sequential(*layers)


class Blobs(torch.utils.data.Dataset):
    """Labelled Gaussian blobs; ``noise`` adds random augmentation (global torch RNG) on every read;
    ``on_read(count)`` is called before each read (to simulate crashes and Ctrl-C)."""

    def __init__(self, n=48, noise=0.0, on_read=None):
        g = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, C, (n,), generator=g)
        self.x = torch.randn(n, 12, generator=g) + F.one_hot(self.y, 12).float() * 3
        self.noise, self.on_read, self.reads = noise, on_read, 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        if self.on_read is not None:
            self.on_read(self.reads)
        x = self.x[i] + self.noise * torch.randn(12) if self.noise else self.x[i]
        return x, self.y[i]


def make_scheme(kind: str):
    if kind == "offline":  # dropout, batch norm, a lazily built connector
        return Distiller(
            net(16, seed=1, dropout=0.2, bn=True), net(32, seed=2),
            terms=[{"name": "kd", "loss": {"type": "kd", "temperature": 2}},
                   {"name": "hint", "loss": "mse", "student": "2", "teacher": "1", "connector": "linear", "weight": 0.1}],
            task_loss=nn.CrossEntropyLoss(),
        )
    if kind == "self":  # per-sample buffers rolled over at epoch ends
        return build_scheme({"type": "self", "num_classes": C, "shallow_taps": ["0"], "previous_weight": 0.5,
                             "num_samples": 48}, model=net(16, seed=1, dropout=0.2))
    if kind == "gan":  # a second optimiser
        return build_scheme({"type": "gan", "adv_weight": 0.2}, student=net(16, seed=1, dropout=0.2), teacher=net(32, seed=2))
    raise ValueError(kind)


def config(out, **kw):
    base = dict(output_dir=str(out), max_steps=10, batch_size=8, gradient_accumulation_steps=2, lr=0.05,
                log_every=3, progress=False, console=False, tensorboard=False, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def full_state(trainer):
    state = {f"model.{k}": v for k, v in trainer.unwrapped.state_dict().items()}
    for k, v in trainer.optimizer.state_dict()["state"].items():
        for name, t in v.items():
            state[f"opt.{k}.{name}"] = t
    for aux, (opt, _) in trainer.aux.items():
        for k, v in opt.state_dict()["state"].items():
            for name, t in v.items():
                state[f"{aux}.{k}.{name}"] = t
    return state


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", ["offline", "self", "gan"])
def test_resume_after_crash_equals_uninterrupted(tmp_path, kind):
    def crash(reads):  # SETUP reads before training, then 16 per step: dies inside step 6
        if reads == SETUP + 16 * 5 + 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(make_scheme(kind), Blobs(noise=0.3, on_read=crash), config(tmp_path / "a", save_every=4)).fit()
    assert latest_checkpoint(tmp_path / "a").name == "step-00000004"
    resumed = Trainer(make_scheme(kind), Blobs(noise=0.3), config(tmp_path / "a", save_every=4, resume=True))
    result = resumed.fit()
    assert result.step == 10
    straight = Trainer(make_scheme(kind), Blobs(noise=0.3), config(tmp_path / "b"))
    straight.fit()
    assert_same(full_state(straight), full_state(resumed))


def test_ctrl_c_saves_then_resume_equals_uninterrupted(tmp_path):
    def interrupt(reads):
        if reads == SETUP + 16 * 2 + 3:  # during step 3
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        Trainer(make_scheme("offline"), Blobs(noise=0.3, on_read=interrupt), config(tmp_path / "a")).fit()
    assert latest_checkpoint(tmp_path / "a").name == "step-00000003"  # the step was finished first
    resumed = Trainer(make_scheme("offline"), Blobs(noise=0.3), config(tmp_path / "a", resume=True))
    resumed.fit()
    straight = Trainer(make_scheme("offline"), Blobs(noise=0.3), config(tmp_path / "b"))
    straight.fit()
    assert_same(full_state(straight), full_state(resumed))


def test_abrupt_keyboard_interrupt_saves_the_last_completed_step(tmp_path):
    def interrupt(reads):
        if reads == SETUP + 16 * 4 + 1:  # first read of step 5: no forward of that step has run yet
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(make_scheme("self"), Blobs(noise=0.3, on_read=interrupt), config(tmp_path / "a")).fit()
    assert latest_checkpoint(tmp_path / "a").name == "step-00000004"
    resumed = Trainer(make_scheme("self"), Blobs(noise=0.3), config(tmp_path / "a", resume=True))
    resumed.fit()
    straight = Trainer(make_scheme("self"), Blobs(noise=0.3), config(tmp_path / "b"))
    straight.fit()
    assert_same(full_state(straight), full_state(resumed))


def test_checkpoints_are_atomic_and_load_with_weights_only(tmp_path, monkeypatch):
    cfg = config(tmp_path, max_steps=6, save_every=2, keep_checkpoints=2)
    Trainer(make_scheme("gan"), Blobs(), cfg).fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000006"]  # older ones pruned, no temporary directories
    state = torch.load(tmp_path / "checkpoints/step-00000006/state.pt", weights_only=True)
    assert state["progress"]["step"] == 6 and "discriminator" in state["aux"]
    rng = torch.load(tmp_path / "checkpoints/step-00000006/rng-0.pt", weights_only=True)
    assert set(rng) >= {"python", "numpy", "torch"}

    # a crash while writing leaves the previous checkpoint as the latest, and no half-written one
    import kd_tasks.shared.checkpoint as ckpt

    real_write = ckpt.write_bytes_durably

    def failing_write(path, data):
        if str(path).endswith("state.pt"):
            raise OSError("disk full")
        return real_write(path, data)

    monkeypatch.setattr(ckpt, "write_bytes_durably", failing_write)
    with pytest.raises(OSError, match="disk full"):
        Trainer(make_scheme("gan"), Blobs(), config(tmp_path, max_steps=8, save_every=2, resume=True)).fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000006"]


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    def run(out, batch, accum):
        scheme = build_scheme({"type": "dml", "temperature": 2.0}, peers=[net(16, seed=1), net(8, seed=2)])
        cfg = config(out, max_steps=6, batch_size=batch, gradient_accumulation_steps=accum, max_grad_norm=1.0)
        return Trainer(scheme, Blobs(), cfg).fit()

    big, small = run(tmp_path / "a", 16, 1), run(tmp_path / "b", 8, 2)
    for (k, a), b in zip(big.model.state_dict().items(), small.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_clipping_bounds_the_step(tmp_path):
    """With plain SGD (no momentum/decay) and clipping at c, the first update has norm lr * c."""
    scheme = build_scheme({"type": "dml"}, peers=[net(16, seed=1), net(8, seed=2)])
    before = torch.cat([p.detach().flatten().clone() for p in scheme.parameters()])
    cfg = config(tmp_path, max_steps=1, gradient_accumulation_steps=1, momentum=0.0, weight_decay=0.0,
                 lr=0.1, max_grad_norm=0.01, scheduler="constant")
    Trainer(scheme, Blobs(), cfg).fit()
    after = torch.cat([p.detach().flatten() for p in scheme.parameters()])
    assert (after - before).norm().item() == pytest.approx(0.1 * 0.01, rel=1e-4)


@pytest.mark.parametrize("kind", ["offline", "gan"])
def test_bf16_autocast_runs_on_cpu(tmp_path, kind):
    trainer = Trainer(make_scheme(kind), Blobs(), config(tmp_path, max_steps=2, mixed_precision="bf16"))
    result = trainer.fit()
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.accelerator.native_amp
    assert all(math.isfinite(v) for k, v in result.history[-1].items() if k not in ("step", "epoch"))


def test_lr_schedules():
    cos = LRLambda("cosine", total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert [cos(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    lin = LRLambda("linear", total_steps=100)
    assert lin(25) == pytest.approx(0.75) and LRLambda("constant", 100)(70) == 1.0


def test_logging_tensorboard_export_and_eval(tmp_path):
    scheme = make_scheme("offline")
    calls = []

    def eval_fn(model):
        calls.append(model.training)
        return {"accuracy": 0.5}

    cfg = config(tmp_path, max_steps=6, log_every=2, eval_every=3, tensorboard=True, export_connectors=True)
    result = Trainer(scheme, Blobs(), cfg, eval_fn=eval_fn).fit()
    assert calls == [False, False]  # steps 3 and 6, model in eval mode
    lines = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [2, 4, 6]
    assert {"loss", "task", "kd", "hint", "lr", "grad_norm"} <= set(lines[0])
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    assert result.metrics == {"accuracy": 0.5} and result.history[-1]["eval/accuracy"] == 0.5

    from safetensors.torch import load_file

    exported = load_file(tmp_path / "export/model.safetensors")
    assert exported.keys() == scheme.student.state_dict().keys()
    for k, v in scheme.student.state_dict().items():
        assert torch.equal(exported[k], v)
    connectors = load_file(tmp_path / "export/connectors.safetensors")
    assert any("hint" in k for k in connectors)
    assert not any("teacher" in k for k in exported)


def test_non_finite_loss_names_term_and_step(tmp_path):
    class NaNAfter(Blobs):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return (x * float("nan"), y) if self.reads > SETUP + 16 * 2 else (x, y)

    scheme = build_scheme({"type": "dml"}, peers=[net(16, seed=1), net(8, seed=2)])
    with pytest.raises(NonFiniteLossError, match=r"'task'.*step [23]"):
        Trainer(scheme, NaNAfter(), config(tmp_path)).fit()


def test_config_errors(tmp_path):
    with pytest.raises(KDConfigError, match="max_steps or epochs"):
        Trainer(make_scheme("gan"), Blobs(), {"output_dir": str(tmp_path)})
    with pytest.raises(KDConfigError, match="lerning_rate"):
        TrainConfig.from_dict({"lerning_rate": 0.1})
    with pytest.raises(KDConfigError, match="no full batch"):
        Trainer(make_scheme("gan"), Blobs(n=4), config(tmp_path, epochs=1, max_steps=None)).fit()
    with pytest.raises(KDConfigError, match="optimizer"):
        Trainer(make_scheme("gan"), Blobs(), config(tmp_path, optimizer="lamb"))


def test_epochs_set_the_number_of_steps(tmp_path):
    result = Trainer(make_scheme("gan"), Blobs(), config(tmp_path, epochs=2, max_steps=None)).fit()
    assert result.step == 6  # 48 samples / 8 per batch = 6 batches = 3 steps (2 per step) per epoch


SCRIPT = """
import sys, torch, torch.nn.functional as F
from torch import nn
sys.path.insert(0, {root!r})
from kd_tasks.shared.schemes import build_scheme
from kd_tasks.shared.training import Trainer, TrainConfig

def net(hidden, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, 5))

class Blobs(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, 5, (48,), generator=g)
        self.x = torch.randn(48, 12, generator=g) + F.one_hot(self.y, 12).float() * 3
    def __len__(self): return 48
    def __getitem__(self, i): return self.x[i], self.y[i]

out, batch = sys.argv[1], int(sys.argv[2])
scheme = build_scheme({{"type": "gan", "adv_weight": 0.5}}, student=net(16, 1), teacher=net(32, 2))
cfg = TrainConfig(output_dir=out, max_steps=4, batch_size=batch, lr=0.05, cpu=True, progress=False,
                  console=False, tensorboard=False, seed=3, save_every=2)
trainer = Trainer(scheme, Blobs(), cfg)
result = trainer.fit()
rank = trainer.accelerator.process_index
state = dict(result.model.state_dict())
state.update({{"D." + k: v for k, v in scheme.discriminator.state_dict().items()}})
state["world"] = torch.tensor(trainer.accelerator.num_processes)
state["ddp"] = torch.tensor(int(type(trainer.model).__name__ == "DistributedDataParallel"))
if torch.distributed.is_initialized():
    state["gloo"] = torch.tensor(int(torch.distributed.get_backend() == "gloo"))
torch.save(state, f"{{out}}/final-{{rank}}.pt")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_on_gloo_match_one_process_with_the_combined_batch(tmp_path):
    """`accelerate launch` with 2 CPU processes (DDP on gloo), adversarial scheme (main + auxiliary
    optimiser): both processes end equal, and equal to one process whose batch is their union."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), str(tmp_path / "two"), "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "8"], env=env,
                            capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"two/final-{r}.pt", weights_only=True) for r in (0, 1))
    one = torch.load(tmp_path / "one/final-0.pt", weights_only=True)
    assert r0["world"].item() == 2 and r0["ddp"].item() == 1 and r0["gloo"].item() == 1
    assert one["world"].item() == 1
    for k in one:
        if k in ("world", "ddp", "gloo"):
            continue
        assert torch.equal(r0[k], r1[k]), k  # the processes agree exactly
        assert torch.allclose(r0[k], one[k], atol=1e-5), k  # and equal one process with the whole batch
    assert latest_checkpoint(tmp_path / "two").name == "step-00000004"
    assert {p.name for p in (tmp_path / "two/checkpoints/step-00000004").iterdir()} == {"state.pt", "rng-0.pt", "rng-1.pt", "manifest.json"}


# ------------------------------------------------------------------ runs that must not mix


def test_double_ctrl_c_still_saves_the_finished_step_and_resumes_exactly(tmp_path):
    """A second Ctrl-C during the step is deferred: the checkpoint holds exactly step 3 (BatchNorm
    statistics included), and resuming from it equals an uninterrupted run."""
    from kd_tasks.shared.errors import TrainingInterrupted

    def interrupt(reads):
        if reads in (SETUP + 16 * 2 + 3, SETUP + 16 * 2 + 11):  # twice inside step 3, across both micro-batches
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as e:
        Trainer(make_scheme("offline"), Blobs(noise=0.3, on_read=interrupt), config(tmp_path / "a")).fit()
    assert e.value.step == 3 and latest_checkpoint(tmp_path / "a").name == "step-00000003"
    resumed = Trainer(make_scheme("offline"), Blobs(noise=0.3), config(tmp_path / "a", resume=True))
    resumed.fit()
    straight = Trainer(make_scheme("offline"), Blobs(noise=0.3), config(tmp_path / "b"))
    straight.fit()
    assert_same(full_state(straight), full_state(resumed))


def test_abrupt_interrupt_inside_a_step_saves_nothing_half_done(tmp_path):
    def interrupt(reads):
        if reads == SETUP + 16 * 4 + 9:  # second micro-batch of step 5: the first one already changed BatchNorm
            raise KeyboardInterrupt

    cfg = config(tmp_path / "a", save_every=2)
    with pytest.raises(KeyboardInterrupt) as e:
        Trainer(make_scheme("offline"), Blobs(noise=0.3, on_read=interrupt), cfg).fit()
    assert type(e.value) is KeyboardInterrupt  # not TrainingInterrupted: nothing was saved for step 4/5
    assert latest_checkpoint(tmp_path / "a").name == "step-00000004"  # the periodic one, untouched


def _corrupt(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["truncated state", "garbage rng", "missing manifest file"])
def test_a_corrupt_newest_checkpoint_is_named_and_resume_falls_back(tmp_path, caplog, damage):
    with pytest.raises(RuntimeError):
        def crash(reads):
            if reads == SETUP + 16 * 7 + 1:
                raise RuntimeError("killed")
        Trainer(make_scheme("offline"), Blobs(noise=0.3, on_read=crash), config(tmp_path / "a", save_every=2,
                                                                                 keep_checkpoints=3)).fit()
    newest = tmp_path / "a/checkpoints/step-00000006"
    assert [p.name for p in list_checkpoints(tmp_path / "a")][-1] == newest.name
    if damage == "truncated state":
        _corrupt(newest / "state.pt")
        bad = "state.pt"
    elif damage == "garbage rng":
        (newest / "rng-0.pt").write_bytes(b"garbage" * 100)
        bad = "rng-0.pt"
    else:
        (newest / "state.pt").unlink()
        (newest / "state.pt").write_bytes(b"")
        bad = "state.pt"
    resumed = Trainer(make_scheme("offline"), Blobs(noise=0.3), config(tmp_path / "a", save_every=2, keep_checkpoints=3,
                                                                       resume=True))
    resumed.fit()
    assert f"{newest / bad}" in caplog.text and "falling back" in caplog.text
    straight = Trainer(make_scheme("offline"), Blobs(noise=0.3), config(tmp_path / "b"))
    straight.fit()
    assert_same(full_state(straight), full_state(resumed))  # from step 4, the newest intact one


def test_an_explicit_damaged_checkpoint_is_named(tmp_path):
    from kd_tasks.shared.errors import CheckpointError

    Trainer(make_scheme("gan"), Blobs(), config(tmp_path, max_steps=2)).fit()
    path = tmp_path / "checkpoints/step-00000002"
    _corrupt(path / "state.pt")
    with pytest.raises(CheckpointError, match=r"step-00000002/state.pt.*damaged"):
        Trainer(make_scheme("gan"), Blobs(), config(tmp_path, max_steps=4, resume=str(path))).fit()
    with pytest.raises(CheckpointError, match="every checkpoint"):
        Trainer(make_scheme("gan"), Blobs(), config(tmp_path, max_steps=4, resume=True)).fit()


def test_a_used_output_directory_is_refused_unless_resume_or_overwrite(tmp_path):
    from kd_tasks.shared.errors import OutputDirInUseError

    Trainer(make_scheme("gan"), Blobs(), config(tmp_path, max_steps=2)).fit()
    first_log = (tmp_path / "log.jsonl").read_text()
    exported = (tmp_path / "export/model.safetensors").read_bytes()
    with pytest.raises(OutputDirInUseError, match=r"already holds a run.*step-00000002.*--resume.*--overwrite"):
        Trainer(make_scheme("gan"), Blobs(), config(tmp_path, max_steps=3, seed=9)).fit()
    assert (tmp_path / "export/model.safetensors").read_bytes() == exported  # nothing touched
    assert (tmp_path / "log.jsonl").read_text() == first_log
    (tmp_path / "notes.txt").write_text("mine")
    Trainer(make_scheme("gan"), Blobs(), config(tmp_path, max_steps=3, seed=9, overwrite=True)).fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003"]  # the old run's are gone
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [3]  # a new log, not appended to the old one
    assert (tmp_path / "notes.txt").read_text() == "mine"  # files not of the run are left alone
    with pytest.raises(KDConfigError, match="resume and overwrite"):
        config(tmp_path, resume=True, overwrite=True).validate()


@pytest.mark.parametrize("change, part", [
    (lambda: dict(scheme=Distiller(net(16, seed=1, dropout=0.2, bn=True), net(32, seed=5),
                                   terms=[{"name": "kd", "loss": {"type": "kd", "temperature": 2}},
                                          {"name": "hint", "loss": "mse", "student": "2", "teacher": "1",
                                           "connector": "linear", "weight": 0.1}],
                                   task_loss=nn.CrossEntropyLoss())), "teacher weights"),
    (lambda: dict(scheme=Distiller(net(24, seed=1, bn=True), net(32, seed=2),
                                   terms=[{"name": "kd", "loss": {"type": "kd", "temperature": 2}}],
                                   task_loss=nn.CrossEntropyLoss())), "student architecture"),
    (lambda: dict(scheme=Distiller(net(16, seed=3, dropout=0.2, bn=True), net(32, seed=2),
                                   terms=[{"name": "kd", "loss": {"type": "kd", "temperature": 2}},
                                          {"name": "hint", "loss": "mse", "student": "2", "teacher": "1",
                                           "connector": "linear", "weight": 0.1}],
                                   task_loss=nn.CrossEntropyLoss())), "student initial weights"),
    (lambda: dict(lr=0.1), "training settings (changed: lr 0.05 -> 0.1)"),
    (lambda: dict(data=Blobs(n=48, noise=0.3, on_read=None).__class__(n=40)), "training data"),
    (lambda: dict(identity={"recipe": {"kd": 3}}), "recipe"),
])
def test_resume_refuses_another_run_naming_the_part(tmp_path, change, part):
    from kd_tasks.shared.errors import RunMismatchError

    Trainer(make_scheme("offline"), Blobs(noise=0.3), config(tmp_path, max_steps=2), identity={"recipe": {"kd": 2}}).fit()
    c = change()
    scheme = c.pop("scheme", None) or make_scheme("offline")
    data = c.pop("data", None) or Blobs(noise=0.3)
    identity = c.pop("identity", {"recipe": {"kd": 2}})
    with pytest.raises(RunMismatchError) as e:
        Trainer(scheme, data, config(tmp_path, max_steps=4, resume=True, **c), identity=identity).fit()
    assert part in str(e.value) and "step-00000002" in str(e.value) and "--overwrite" in str(e.value)


def test_resume_lists_the_settings_it_may_change(tmp_path, caplog):
    Trainer(make_scheme("gan"), Blobs(), config(tmp_path, max_steps=2)).fit()
    result = Trainer(make_scheme("gan"), Blobs(), config(tmp_path, max_steps=4, log_every=1, resume=True)).fit()
    assert result.step == 4
    assert "changed settings (allowed)" in caplog.text and "max_steps 2 -> 4" in caplog.text
    assert "log_every 3 -> 1" in caplog.text


def test_a_reordered_training_set_is_another_run(tmp_path):
    from kd_tasks.shared.errors import RunMismatchError

    Trainer(make_scheme("gan"), Blobs(), config(tmp_path, max_steps=2)).fit()
    shuffled = Blobs()
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(3))
    shuffled.x, shuffled.y = shuffled.x[perm], shuffled.y[perm]
    with pytest.raises(RunMismatchError, match="training data"):
        Trainer(make_scheme("gan"), shuffled, config(tmp_path, max_steps=4, resume=True)).fit()


def test_saves_replace_an_existing_step_without_deleting_it_first(tmp_path, monkeypatch):
    """A kill between moving the old step-N aside and renaming the new one in leaves the old one, restored."""
    import kd_tasks.shared.checkpoint as ckpt

    Trainer(make_scheme("gan"), Blobs(), config(tmp_path, max_steps=2)).fit()
    before = (tmp_path / "checkpoints/step-00000002/state.pt").read_bytes()
    real_replace = os.replace

    def killed(src, dst):
        if Path(src).name.startswith(".tmp-step"):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, lambda: {"progress": {}}, 0, True, lambda: None)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]  # restored from the side name
    assert (tmp_path / "checkpoints/step-00000002/state.pt").read_bytes() == before
    ckpt.verify_checkpoint(tmp_path / "checkpoints/step-00000002")


def test_every_run_ends_with_a_loss_curve_plot(tmp_path):
    pytest.importorskip("matplotlib")
    Trainer(make_scheme("offline"), Blobs(noise=0.3), config(tmp_path / "run")).fit()
    png = tmp_path / "run" / "loss_curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
