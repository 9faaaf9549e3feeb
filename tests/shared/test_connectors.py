import pytest
import torch
from torch import nn

from kd_tasks.shared.connectors import LazyConnector, build_connector
from kd_tasks.shared.errors import KDConfigError, ShapeMismatchError


@pytest.mark.parametrize(
    "s,t,kind",
    [
        ((2, 8), (2, 16), "linear"),
        ((2, 5, 8), (2, 5, 16), "linear"),
        ((2, 4, 6, 6), (2, 8, 6, 6), "conv1x1"),
        ((2, 4, 6, 6), (2, 8, 6, 6), "conv_bn_relu"),
        ((2, 4, 6, 6), (2, 4, 12, 12), "resize"),
        ((2, 4, 6, 6), (2, 8, 12, 12), "auto"),
        ((2, 5, 8), (2, 5, 16), "auto"),
        ((2, 4, 6, 6), (2, 4, 6, 6), "auto"),
    ],
)
def test_connector_output_shapes(s, t, kind):
    conn = build_connector(kind, s, t)
    y = conn(torch.randn(*s))
    assert tuple(y.shape) == t


def test_auto_identity_has_no_parameters():
    assert sum(p.numel() for p in build_connector("auto", (2, 3, 4, 4), (2, 3, 4, 4)).parameters()) == 0


def test_resize_matches_interpolate():
    x = torch.randn(1, 2, 5, 5)
    y = build_connector("resize", x.shape, (1, 2, 10, 10))(x)
    ref = nn.Upsample(size=(10, 10), mode="bilinear", align_corners=False)(x)
    assert torch.allclose(y, ref)


def test_lazy_connector_builds_from_first_batch_and_trains():
    conn = LazyConnector("auto")
    assert not conn.materialized and len(list(conn.parameters())) == 0
    x = torch.randn(4, 8)
    target = torch.randn(4, 3)
    y = conn(x, target.shape)
    assert conn.materialized and y.shape == target.shape
    opt = torch.optim.SGD(conn.parameters(), lr=0.1)
    first = ((conn(x, target.shape) - target) ** 2).mean().item()
    for _ in range(30):
        loss = ((conn(x, target.shape) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.5


def test_errors():
    with pytest.raises(KDConfigError, match="did you mean 'conv1x1'"):
        LazyConnector("conv1x")
    with pytest.raises(ShapeMismatchError, match="number of dimensions"):
        build_connector("auto", (2, 8), (2, 4, 3, 3))
    with pytest.raises(ShapeMismatchError, match=r"\(B, C, H, W\)"):
        build_connector("conv1x1", (2, 8), (2, 16))
    conn = LazyConnector("linear")
    conn(torch.randn(2, 8), (2, 4))
    with pytest.raises(ShapeMismatchError, match="another shape"):
        conn(torch.randn(2, 9), (2, 4))


def test_lazy_resize_follows_each_batch_size():
    conn = LazyConnector("auto")
    y = conn(torch.randn(2, 4, 6, 6), (2, 8, 12, 12))
    assert y.shape == (2, 8, 12, 12)
    y2 = conn(torch.randn(2, 4, 10, 10), (2, 8, 20, 20))  # a larger image later
    assert y2.shape == (2, 8, 20, 20)
