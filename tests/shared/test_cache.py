"""Teacher-output cache: miss, hit, stale, rebuild, atomic builds, augmentation refusal, and training
from the cache equal to training with the live teacher."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_tasks.shared.cache import (
    CachedTeacher,
    StaleCacheError,
    TeacherCache,
    dataset_fingerprint,
    make_key,
    teacher_fingerprint,
)
from kd_tasks.shared.distiller import Distiller
from kd_tasks.shared.errors import KDConfigError
from kd_tasks.shared.schemes import MultiTeacher
from kd_tasks.shared.training import TrainConfig, Trainer

C = 5


def net(hidden=16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, C))


class Blobs(torch.utils.data.Dataset):
    def __init__(self, n=40, shift=0.0, noise=0.0):
        g = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, C, (n,), generator=g)
        self.x = torch.randn(n, 12, generator=g) + F.one_hot(self.y, 12).float() * 3 + shift
        self.noise = noise

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i] + self.noise * torch.randn(12) if self.noise else self.x[i]
        return x, self.y[i]


def test_miss_then_hit_stores_the_teachers_outputs(tmp_path):
    teacher, data = net(32, seed=1), Blobs()
    built = TeacherCache.load_or_build(teacher, data, tmp_path / "c", taps=["1"], preprocessing="none", batch_size=7)
    assert built.status == "built" and len(built) == 40
    hit = TeacherCache.load_or_build(teacher, data, tmp_path / "c", taps=["1"], preprocessing="none")
    assert hit.status == "hit"
    with torch.no_grad():  # independent: one sample at a time
        logits = np.stack([teacher(data[i][0][None])[0].numpy() for i in range(40)])
        hidden = np.stack([torch.relu(teacher[0](data[i][0][None]))[0].numpy() for i in range(40)])
    rows = hit.lookup(torch.tensor([3, 0, 39]))
    assert set(rows) == {"output", "1"}
    np.testing.assert_allclose(rows["output"].numpy(), logits[[3, 0, 39]], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rows["1"].numpy(), hidden[[3, 0, 39]], rtol=1e-6, atol=1e-6)
    assert isinstance(hit.arrays["output"], np.memmap)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directory left


def test_stale_cache_is_refused_naming_what_changed(tmp_path):
    teacher, data = net(32, seed=1), Blobs()
    TeacherCache.load_or_build(teacher, data, tmp_path / "c", preprocessing="v1")
    other = net(32, seed=1)
    with torch.no_grad():
        other[2].bias[0] += 1e-3  # one number of the weights
    with pytest.raises(StaleCacheError, match=r"teacher weights changed.*rebuild=True.*--rebuild-cache"):
        TeacherCache.load_or_build(other, data, tmp_path / "c", preprocessing="v1")
    edited = Blobs()
    edited.x[17, 4] += 0.5  # one value of one sample
    with pytest.raises(StaleCacheError, match="dataset changed") as e:
        TeacherCache.load_or_build(teacher, edited, tmp_path / "c", preprocessing="v1")
    assert "teacher" not in str(e.value).split("stale:")[1]
    with pytest.raises(StaleCacheError, match="preprocessing changed.*cached: v1, now: v2"):
        TeacherCache.load_or_build(teacher, data, tmp_path / "c", preprocessing="v2")
    with pytest.raises(StaleCacheError, match="stored outputs changed"):
        TeacherCache.load_or_build(teacher, data, tmp_path / "c", preprocessing="v1", dtype="float16")
    rebuilt = TeacherCache.load_or_build(other, data, tmp_path / "c", preprocessing="v1", rebuild=True)
    assert rebuilt.status == "rebuilt"
    with torch.no_grad():
        assert torch.allclose(rebuilt.lookup([0])["output"], other(data[0][0][None]), atol=1e-6)
    assert TeacherCache.load_or_build(other, data, tmp_path / "c", preprocessing="v1").status == "hit"


def test_random_augmentation_is_refused_with_the_deterministic_view_named(tmp_path):
    with pytest.raises(KDConfigError, match="random augmentation.*deterministic view"):
        TeacherCache.load_or_build(net(), Blobs(noise=0.1), tmp_path / "c", preprocessing="aug")
    assert not (tmp_path / "c").exists()


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.calls = net(), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("teacher crashed")
            return self.inner(x)

    with pytest.raises(RuntimeError, match="teacher crashed"):
        TeacherCache.load_or_build(Flaky(), Blobs(), tmp_path / "c", preprocessing="x", batch_size=8)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        TeacherCache.open(tmp_path / "c")


def test_fingerprints():
    a, b = net(seed=1), net(seed=1)
    assert teacher_fingerprint(a) == teacher_fingerprint(b)
    with torch.no_grad():
        b[0].weight[3, 2] = b[0].weight[3, 2].item() + 1e-6
    assert teacher_fingerprint(a) != teacher_fingerprint(b)
    assert teacher_fingerprint(a) != teacher_fingerprint(a.double())
    with pytest.raises(KDConfigError, match="teacher_id"):
        teacher_fingerprint(nn.ReLU())
    d = Blobs()
    assert dataset_fingerprint(d) == dataset_fingerprint(Blobs())
    assert dataset_fingerprint(d) != dataset_fingerprint(Blobs(n=39))
    key = make_key(nn.ReLU(), d, teacher_id="dlib-v1", dataset_id="orl-v2", preprocessing="align 112")
    assert (key.teacher, key.dataset, key.preprocessing) == ("dlib-v1", "orl-v2", "align 112")


def test_float16_storage_and_features_only(tmp_path):
    teacher, data = net(32, seed=1), Blobs()
    cache = TeacherCache.load_or_build(teacher, data, tmp_path / "c", taps=["1"], store_output=False,
                                       dtype="float16", preprocessing="none")
    assert cache.names == ["1"] and cache.arrays["1"].dtype == np.float16
    with torch.no_grad():
        ref = torch.relu(teacher[0](data.x[:5]))
    assert torch.allclose(cache.lookup(range(5))["1"], ref, rtol=1e-3, atol=1e-3)
    meta = json.loads((tmp_path / "c/meta.json").read_text())
    assert meta["count"] == 40 and meta["arrays"]["1"]["shape"] == [40, 32]


def test_cached_teacher_in_multi_teacher_matches_the_live_teacher(tmp_path):
    t1, t2, data = net(32, seed=1), net(24, seed=2), Blobs()
    cached = CachedTeacher(TeacherCache.load_or_build(t1, data, tmp_path / "c", preprocessing="none"))
    x, y = data.x[:6], data.y[:6]
    index = torch.arange(6)
    live = MultiTeacher(net(8, seed=3), [t1, t2])(x, y)
    from_cache = MultiTeacher(net(8, seed=3), [cached, t2])(x, y, index=index)
    assert torch.allclose(live["kd"], from_cache["kd"], atol=1e-6)
    with pytest.raises(KDConfigError, match="index"):
        MultiTeacher(net(8, seed=3), [cached, t2])(x, y)


def test_training_from_the_cache_equals_training_with_the_teacher_and_skips_it(tmp_path):
    data = Blobs()
    terms = [{"name": "kd", "loss": {"type": "kd", "temperature": 2}}]
    cfg = dict(max_steps=8, batch_size=8, lr=0.05, progress=False, console=False, tensorboard=False, seed=1)

    teacher = net(32, seed=1)
    live = Trainer(Distiller(net(8, seed=3), teacher, terms, task_loss=nn.CrossEntropyLoss()), data,
                   TrainConfig(output_dir=str(tmp_path / "live"), **cfg)).fit()

    cache = TeacherCache.load_or_build(teacher, data, tmp_path / "cache", preprocessing="none")
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    cached = Trainer(Distiller(net(8, seed=3), None, terms, task_loss=nn.CrossEntropyLoss()), data,
                     TrainConfig(output_dir=str(tmp_path / "cached"), **cfg), teacher_cache=cache).fit()
    assert calls == []
    for k, v in live.model.state_dict().items():
        assert torch.allclose(v, cached.model.state_dict()[k], atol=1e-6), k
    with pytest.raises(KDConfigError, match="40 samples"):
        Trainer(Distiller(net(8), None, terms), Blobs(n=32), TrainConfig(output_dir=str(tmp_path / "x"), **cfg),
                teacher_cache=cache)


# ------------------------------------------------------------------ damage, binding, augmentation


@pytest.mark.parametrize("damage, named", [
    ("meta garbage", "meta.json"),
    ("meta missing key", "meta.json"),
    ("array truncated", "out0.npy"),
    ("array missing", "out0.npy"),
    ("ids missing", "ids.npy"),
])
def test_a_damaged_cache_is_named_with_the_rebuild_hint(tmp_path, damage, named):
    teacher, data = net(32, seed=1), Blobs()
    TeacherCache.load_or_build(teacher, data, tmp_path / "c", preprocessing="none")
    c = tmp_path / "c"
    if damage == "meta garbage":
        (c / "meta.json").write_text("{not json")
    elif damage == "meta missing key":
        meta = json.loads((c / "meta.json").read_text())
        del meta["arrays"]
        (c / "meta.json").write_text(json.dumps(meta))
    elif damage == "array truncated":
        raw = (c / "out0.npy").read_bytes()
        (c / "out0.npy").write_bytes(raw[: len(raw) // 2])
    elif damage == "array missing":
        (c / "out0.npy").unlink()
    else:
        (c / "ids.npy").unlink()
    with pytest.raises(StaleCacheError) as e:
        TeacherCache.load_or_build(teacher, data, c, preprocessing="none")
    assert named in str(e.value) and "--rebuild-cache" in str(e.value)
    rebuilt = TeacherCache.load_or_build(teacher, data, c, preprocessing="none", rebuild=True)
    assert rebuilt.status == "rebuilt" and len(rebuilt) == 40


class Files(Blobs):
    """Blobs that say where each sample comes from (like ImageFolder's ``samples``)."""

    def __init__(self, order=None, **kw):
        super().__init__(**kw)
        self.samples = [(f"img{i}.png", int(self.y[i])) for i in range(len(self.y))]
        if order is not None:
            self.x, self.y = self.x[order], self.y[order]
            self.samples = [self.samples[i] for i in order]


def test_rows_are_bound_to_their_samples_so_a_reordered_training_set_is_refused(tmp_path):
    teacher, data = net(32, seed=1), Files()
    cache = TeacherCache.load_or_build(teacher, data, tmp_path / "c", preprocessing="none")
    terms = [{"name": "kd", "loss": {"type": "kd", "temperature": 2}}]
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=8, progress=False, console=False,
                      tensorboard=False)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0)).tolist()
    with pytest.raises(StaleCacheError, match=r"does not belong to the training set.*reordered.*--rebuild-cache"):
        Trainer(Distiller(net(8), None, terms), Files(order=order), cfg, teacher_cache=cache)
    swapped = Files()
    swapped.samples[7] = ("other.png", swapped.samples[7][1])  # same length, one other file
    with pytest.raises(StaleCacheError, match="index 7"):
        Trainer(Distiller(net(8), None, terms), swapped, cfg, teacher_cache=cache)
    # an augmented view of the same files is the same samples
    Trainer(Distiller(net(8), None, terms), Files(noise=0.1), cfg, teacher_cache=cache)
    # without declared sources, rows are bound to the samples' content
    plain = TeacherCache.load_or_build(teacher, Blobs(), tmp_path / "p", preprocessing="none")
    edited = Blobs()
    edited.x[[3, 4]] = edited.x[[4, 3]]
    with pytest.raises(StaleCacheError, match="index 3"):
        Trainer(Distiller(net(8), None, terms), edited, cfg, teacher_cache=plain)


class FlipSome(Blobs):
    """A 20 % random flip: the augmentation the old 3-probe check missed a third of the time."""

    transform = None

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return (x.flip(0) if torch.rand(()) < 0.2 else x), y


@pytest.mark.parametrize("seed", range(5))
def test_a_20_percent_random_flip_is_always_detected(tmp_path, seed):
    torch.manual_seed(seed)
    with pytest.raises(KDConfigError, match="random augmentation"):
        TeacherCache.load_or_build(net(), FlipSome(), tmp_path / "c", preprocessing="x")
    torch.manual_seed(seed)
    with pytest.raises(KDConfigError, match="random augmentation"):  # a caller-given dataset id: the chunk check
        TeacherCache.load_or_build(net(), FlipSome(), tmp_path / "c", preprocessing="x", dataset_id="v1")
    assert not (tmp_path / "c").exists()


def test_a_declared_random_transform_is_refused_before_reading():
    class Declared(Blobs):
        transform = "Compose(RandomHorizontalFlip(p=0.5), ToTensor())"

        def __getitem__(self, i):
            raise AssertionError("read")

    with pytest.raises(KDConfigError, match="RandomHorizontalFlip"):
        TeacherCache.load_or_build(net(), Declared(), "unused", preprocessing="x")


def test_top_k_logits_keep_the_teachers_top_probabilities_and_tail_mass(tmp_path):
    from kd_tasks.shared.topk import compress_topk, expand_topk

    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 50, generator=g, dtype=torch.float64) * 3
    values, indices, tail = compress_topk(z, 8)
    dense = expand_topk(values, indices, tail, 50).double()
    p, q = F.softmax(z, 1), F.softmax(dense, 1)
    for row in range(5):  # independent: a loop over classes
        top = set(torch.argsort(z[row], descending=True)[:8].tolist())
        for c in range(50):
            if c in top:
                assert q[row, c].item() == pytest.approx(p[row, c].item(), rel=1e-5)
            else:  # the teacher's tail mass, spread evenly
                rest = 1 - sum(p[row, i].item() for i in top)
                assert q[row, c].item() == pytest.approx(rest / 42, rel=1e-5)
    full = expand_topk(*compress_topk(z, 50), 50).double()
    torch.testing.assert_close(F.softmax(full, 1), p, rtol=1e-5, atol=1e-7)
    with pytest.raises(KDConfigError, match="k must lie in 1..50"):
        compress_topk(z, 0)

    teacher, data = net(32, seed=1), Blobs()
    dense_cache = TeacherCache.load_or_build(teacher, data, tmp_path / "dense", preprocessing="none")
    topk_cache = TeacherCache.load_or_build(teacher, data, tmp_path / "topk", preprocessing="none", top_k=2)
    assert topk_cache.names == ["output"] and TeacherCache.load_or_build(
        teacher, data, tmp_path / "topk", preprocessing="none", top_k=2).status == "hit"
    with pytest.raises(KDConfigError, match="stale"):  # another k is another cache
        TeacherCache.load_or_build(teacher, data, tmp_path / "topk", preprocessing="none", top_k=3)
    idx = torch.tensor([0, 7, 39])
    exact = dense_cache.lookup(idx)["output"]
    approx = topk_cache.lookup(idx)["output"]
    assert approx.shape == exact.shape == (3, C)
    assert torch.equal(approx.argmax(1), exact.argmax(1))
    top2 = exact.topk(2, dim=1).indices
    torch.testing.assert_close(F.softmax(approx, 1).gather(1, top2), F.softmax(exact, 1).gather(1, top2), rtol=1e-5,
                               atol=1e-6)
    stored = sum(a.size for a in topk_cache.arrays.values())
    assert stored == 40 * (2 + 2 + 1)  # k values, k indices, one tail logit per row
