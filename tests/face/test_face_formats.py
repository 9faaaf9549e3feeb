"""insightface formats (RecordIO, verification .bin), 5-landmark alignment, ONNX teacher input conventions,
export round trips, ROC output and the FAR-resolution warning."""

import io
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from face_helpers import embedding_net
from kd_tasks.face.align import ARCFACE_DST, align_folder, estimate_norm, norm_crop
from kd_tasks.face.data import FaceTransform, IdentityFolder
from kd_tasks.face.export import export_student
from kd_tasks.face.formats import (MAGIC, RecordFaceDataset, RecordIOReader, evaluate_bin, load_bin, pack_record,
                                   unpack_record, write_bin, write_recordio)
from kd_tasks.face.models import build_student
from kd_tasks.face.teachers import ONNXTeacher, check_teacher
from kd_tasks.face.verify import FARResolutionWarning, plot_roc, verification_metrics
from kd_tasks.shared.errors import KDConfigError


def png_bytes(seed, size=16, mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue(), arr


# ----------------------------------------------------------------------------- RecordIO


def test_recordio_round_trip_with_header_record_multipart_and_a_bad_image(tmp_path):
    images = [png_bytes(k) for k in range(5)]
    labels = [0, 0, 1, 2, 2]
    payloads = [pack_record([6.0, 9.0], b"")]  # record 0: images are records 1..5
    payloads += [pack_record(float(y), b) for y, (b, _) in zip(labels, images)]
    # a payload holding the magic number is written in parts (cflag 1..3) and joined on reading
    odd = pack_record(1.0, struct.pack("<I", MAGIC).join([images[0][0], b"tail"]))
    payloads[2] = odd
    write_recordio(tmp_path / "train.rec", payloads)
    reader = RecordIOReader(tmp_path / "train.rec")
    assert reader.keys == list(range(6))
    assert reader.read(2) == odd
    label, _, img = unpack_record(reader.read(3))
    assert label == 1.0 and img == images[2][0]
    vec, _, rest = unpack_record(reader.read(0))
    assert np.allclose(vec, [6, 9]) and rest == b""
    # record 2 (PNG + trailing bytes) still decodes with PIL; make record 4 unreadable instead
    payloads[4] = pack_record(2.0, b"not an image")
    write_recordio(tmp_path / "train.rec", payloads)
    with pytest.warns(UserWarning, match="1 unreadable"):
        ds = RecordFaceDataset(tmp_path / "train.rec", image_size=16)
    assert [k for k, _ in ds.bad] == [4] and len(ds) == 4
    assert ds.labels.tolist() == [0, 1, 1, 2]  # records 1, 2 (the multi-part one), 3, 5
    x, y = ds[2]
    expected = torch.from_numpy(images[2][1]).permute(2, 0, 1).float() / 127.5 - 1
    assert y == 1 and torch.allclose(x, expected, atol=1e-6)
    (tmp_path / "bad.idx").write_text("0\tzero\n")
    with pytest.raises(KDConfigError, match="key<TAB>offset"):
        RecordIOReader(tmp_path / "train.rec", tmp_path / "bad.idx")


def test_recordio_without_header_record_uses_every_key(tmp_path):
    payloads = [pack_record(float(k % 2), png_bytes(k)[0]) for k in range(4)]
    write_recordio(tmp_path / "t.rec", payloads)
    ds = RecordFaceDataset(tmp_path / "t.rec", image_size=8)
    assert len(ds) == 4 and ds.labels.tolist() == [0, 1, 0, 1] and ds[0][0].shape == (3, 8, 8)


# ----------------------------------------------------------------------------- .bin verification sets


def test_bin_set_round_trip_flip_accuracy_and_refuses_code(tmp_path):
    # pairs of the same random image are "same", of different ones "different"
    imgs, same = [], []
    for p in range(10):
        a = png_bytes(100 + p)[0]
        b = a if p % 2 == 0 else png_bytes(200 + p)[0]
        imgs += [a, b]
        same.append(p % 2 == 0)
    imgs[3] = b"broken"  # pair 1 is unreadable: reported and skipped
    write_bin(tmp_path / "lfw.bin", imgs, same)
    with pytest.warns(UserWarning, match="1 pairs"):
        images, issame, bad = load_bin(tmp_path / "lfw.bin", image_size=16)
    assert bad == [1] and images.shape == (18, 3, 16, 16) and len(issame) == 9
    net = embedding_net(8)
    with pytest.warns(UserWarning):
        metrics = evaluate_bin(net, tmp_path / "lfw.bin", image_size=16, folds=3, far_targets=(0.1,))
    # insightface's flip protocol written out: normalize(f(x) + f(flip x)), cosine per pair
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        e = torch.nn.functional.normalize(net(images) + net(images.flip(-1)), dim=1).numpy()
    scores = np.sum(e[0::2] * e[1::2], axis=1)
    assert np.allclose(scores[issame], 1.0, atol=1e-5)  # identical images
    assert metrics["auc"] == pytest.approx(roc_auc_score(issame, scores)) and metrics["skipped_pairs"] == 1
    assert 0.5 <= metrics["accuracy"] <= 1.0 and metrics["pairs"] == 9
    # a pickle that would call a function is refused
    (tmp_path / "evil.bin").write_bytes(pickle.dumps((print, [True])))
    with pytest.raises(KDConfigError, match="builtins.print"):
        load_bin(tmp_path / "evil.bin")


# ----------------------------------------------------------------------------- alignment


def test_norm_crop_maps_landmarks_onto_the_arcface_template(tmp_path):
    # a generated image with five bright dots where a face's landmarks would be, rotated and scaled
    angle, scale, shift = 0.3, 1.7, np.array([40.0, 25.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    lmk = ARCFACE_DST @ (scale * rot).T + shift
    img = np.zeros((260, 260, 3), np.uint8)
    for x, y in lmk:
        img[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 255
    m = estimate_norm(lmk, 112)
    mapped = lmk @ m[:, :2].T + m[:, 2]
    assert np.allclose(mapped, ARCFACE_DST, atol=1e-3)
    chip = norm_crop(img, lmk, 112)
    assert chip.shape == (112, 112, 3)
    for x, y in ARCFACE_DST:
        assert chip[int(round(y)), int(round(x))].max() > 100  # each dot lands on its template point
    m128 = estimate_norm(lmk, 128)
    assert np.allclose(lmk @ m128[:, :2].T + m128[:, 2], ARCFACE_DST * 128 / 128 + [8, 0], atol=1e-3)
    with pytest.raises(KDConfigError, match="5 landmarks"):
        estimate_norm(lmk[:4])
    # a folder: given landmarks, an unreadable file and a file without landmarks are reported and skipped
    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "src" / "a" / "1.png")
    Image.fromarray(img).save(tmp_path / "src" / "a" / "2.png")
    (tmp_path / "src" / "a" / "3.png").write_text("nope")
    report = align_folder(tmp_path / "src", tmp_path / "dst", landmarks={"a/1.png": lmk})
    assert report["aligned"] == ["a/1.png"] and [r for r, _ in report["skipped"]] == ["a/2.png", "a/3.png"]
    assert Image.open(tmp_path / "dst" / "a" / "1.png").size == (112, 112)
    from kd_tasks.face.align import main as align_main

    (tmp_path / "l.json").write_text(json.dumps({"a/2.png": lmk.tolist()}))
    assert align_main([str(tmp_path / "src"), str(tmp_path / "dst2"), "--landmarks", str(tmp_path / "l.json")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "dst2" / "a" / "2.png")), norm_crop(img, lmk, 112))


# ----------------------------------------------------------------------------- data views


def test_aspect_kept_view_and_exclusion(tmp_path):
    root = tmp_path / "orl"
    for ident in ("s1", "s2"):
        (root / ident).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((112, 92), 200, np.uint8)).save(root / ident / f"{k}.pgm")
    Image.fromarray(np.full((112, 92), 10, np.uint8)).save(root / "s2" / "target.jpg")
    x = FaceTransform(56)(root / "s1" / "0.pgm")
    # 92x112 -> 46x56 centred on black: black bars of 5 columns each side, the face keeps its shape
    assert torch.all(x[:, :, :5] == -1) and torch.all(x[:, :, -5:] == -1) and torch.all(x[:, :, 5:51] > 0.5)
    stretched = FaceTransform(56, fit="stretch")(root / "s1" / "0.pgm")
    assert torch.all(stretched > 0.5)
    folder = IdentityFolder(root, 56, exclude=["s2/target.jpg"])
    assert len(folder) == 4 and all(p.name != "target.jpg" for p, _ in folder.samples)
    assert len(IdentityFolder(root, 56)) == 5
    with pytest.raises(KDConfigError, match="match no file"):
        IdentityFolder(root, 56, exclude=["s3/target.jpg"])


# ----------------------------------------------------------------------------- ONNX teacher conventions


class PixelNet(torch.nn.Module):
    """Embeds NHWC or NCHW 0..255-scaled BGR/RGB input: checks the conversion, not a face model."""

    def __init__(self, nhwc):
        super().__init__()
        self.nhwc = nhwc
        self.net = embedding_net(6)

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2) if self.nhwc else x)


@pytest.mark.parametrize("nhwc,channels,scaling", [(True, "bgr", "unit"), (False, "rgb", "insightface"),
                                                  (False, "bgr", "raw")])
def test_onnx_teacher_fixed_batch_layout_scaling_channels(tmp_path, nhwc, channels, scaling):
    net = PixelNet(nhwc).eval()
    shape = (4, 24, 24, 3) if nhwc else (4, 3, 24, 24)
    path = tmp_path / "t.onnx"
    torch.onnx.export(net, (torch.zeros(shape),), str(path), dynamo=False, input_names=["x"])  # batch fixed at 4
    teacher = ONNXTeacher(path, scaling=scaling, channels=channels)
    assert teacher.batch_size == 4 and teacher.layout == ("nhwc" if nhwc else "nchw") and teacher.input_size == (24, 24)
    x = torch.rand(7, 3, 24, 24) * 2 - 1  # 7 images: chunks of 4, the last padded
    pixels = (x + 1) * 127.5
    if channels == "bgr":
        pixels = pixels.flip(1)
    mean, std = {"unit": (0, 255), "insightface": (127.5, 127.5), "raw": (0, 1)}[scaling]
    expected_in = (pixels - mean) / std
    if nhwc:
        expected_in = expected_in.permute(0, 2, 3, 1)
    with torch.no_grad():
        expected = net(expected_in)
    np.testing.assert_allclose(teacher(x).numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(KDConfigError, match="scaling"):
        ONNXTeacher(path, scaling="zscore")


def test_teacher_check_refuses_near_chance():
    check_teacher({"auc": 0.97})
    with pytest.raises(KDConfigError, match="AUC 0.520 .*chance"):
        check_teacher({"auc": 0.52})


# ----------------------------------------------------------------------------- export, ROC, FAR warning


def test_export_onnx_and_torchscript_match_pytorch(tmp_path):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    student = build_student("mobilefacenet_s", embedding_dim=32, input_size=32).eval()
    out = export_student(student, tmp_path)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = student(x).numpy()
    sess = ort.InferenceSession(out["onnx"], providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    assert inp.shape[1:] == [3, 32, 32]
    np.testing.assert_allclose(sess.run(None, {inp.name: x.numpy()})[0], ref, atol=1e-4)
    # insightface's ArcFaceONNX picks (x - 127.5) / 127.5 when the first nodes are not Sub and Mul
    names = [n.name for n in onnx.load(out["onnx"]).graph.node[:8]]
    assert not (any(n.startswith(("Sub", "_minus")) for n in names) and any(n.startswith(("Mul", "_mul")) for n in names))
    ts = torch.jit.load(out["torchscript"])
    np.testing.assert_allclose(ts(x).detach().numpy(), ref, atol=1e-5)
    assert json.loads((tmp_path / "input.json").read_text())["scaling"] == "(x - 127.5) / 127.5"


def test_roc_png_and_far_warning(tmp_path):
    rng = np.random.default_rng(0)
    same = np.r_[np.ones(50), np.zeros(50)].astype(bool)
    scores = rng.normal(same * 1.0, 1.0)
    png = plot_roc({"teacher": (scores + same, same), "student": (scores, same)}, str(tmp_path / "roc.png"))
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 100
    with pytest.warns(FARResolutionWarning, match="FAR=0.001 cannot be measured with 50 impostor pairs"):
        verification_metrics(scores, same, far_targets=(1e-3,))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verification_metrics(scores, same, far_targets=(0.1,))  # 5 impostor pairs at FAR 0.1: measurable
