from collections import OrderedDict

import pytest
import torch
from torch import nn

from kd_tasks.shared.errors import KDConfigError, UnknownTapError
from kd_tasks.shared.taps import FeatureTaps, TapSpec, resolve_module, unwrap_model


class TupleNeck(nn.Module):
    """Returns a tuple of two maps, like an MMDetection FPN neck."""

    def forward(self, x):
        return (x * 2, x * 3)


class DictHead(nn.Module):
    def forward(self, x):
        return OrderedDict(logits=x.sum(-1), hidden_states=(x, x + 1))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5))
        self.neck = TupleNeck()
        self.head = DictHead()

    def forward(self, x):
        h = self.body(x)
        a, b = self.neck(h)
        return self.head(a + b)


def test_captures_plain_tuple_and_dict_outputs():
    net = Net()
    x = torch.randn(3, 4)
    with FeatureTaps(net, {"lin": "body.0", "n1": "neck:1", "hs": "head:hidden_states.1", "inp": "head@input"}) as taps:
        out = net(x)
    h = net.body(x)
    lin = net.body[0](x)
    assert torch.allclose(taps.outputs["lin"], lin)
    assert torch.allclose(taps.outputs["n1"], h * 3)
    assert torch.allclose(taps.outputs["hs"], h * 5 + 1)
    assert torch.allclose(taps.outputs["inp"], h * 5)
    assert torch.allclose(out["logits"], (h * 5).sum(-1))


def test_dict_spec_equals_string_spec():
    assert TapSpec.parse({"module": "neck", "index": 0}) == TapSpec.parse("neck:0")
    with pytest.raises(KDConfigError, match="keys 'module'"):
        TapSpec.parse({"modul": "neck"})


def test_unknown_name_lists_close_matches():
    net = Net()
    with pytest.raises(UnknownTapError) as e:
        FeatureTaps(net, {"x": "body.3"})
    msg = str(e.value)
    assert "body.3" in msg and "body.0" in msg and "did you mean" in msg


def test_bad_index_is_clear():
    net = Net()
    taps = FeatureTaps(net, {"n": "neck:5"})
    with pytest.raises(KDConfigError, match="length 2"):
        taps.run(lambda: net(torch.randn(2, 4)))
    taps2 = FeatureTaps(net, {"n": "head:logit"})
    with pytest.raises(KDConfigError, match="did you mean 'logits'"):
        taps2.run(lambda: net(torch.randn(2, 4)))


def test_hooks_are_removed():
    net = Net()
    taps = FeatureTaps(net, ["body.0", "neck:0"])
    with taps:
        assert len(net.body[0]._forward_hooks) == 1
    assert len(net.body[0]._forward_hooks) == 0 and len(net.neck._forward_hooks) == 0
    # run() attaches only for the call
    taps.run(lambda: net(torch.randn(2, 4)))
    assert len(net.neck._forward_hooks) == 0
    assert set(taps.outputs) == {"body.0", "neck:0"}


def test_hooks_removed_even_when_forward_raises():
    net = Net()
    taps = FeatureTaps(net, ["body.0"])
    with pytest.raises(RuntimeError):
        taps.run(lambda: net(torch.randn(2, 7)))
    assert len(net.body[0]._forward_hooks) == 0


def test_wrapped_models_resolve_with_and_without_prefix():
    net = Net()
    wrapped = nn.DataParallel(net)  # the same '.module' layout as DistributedDataParallel
    assert unwrap_model(wrapped) is net
    assert resolve_module(wrapped, "body.0") is net.body[0]
    assert resolve_module(wrapped, "module.body.0") is net.body[0]
    with FeatureTaps(wrapped, {"f": "module.neck:0"}) as taps:
        wrapped(torch.randn(2, 4))
    assert taps.outputs["f"].shape == (2, 5)


def test_unwrap_does_not_strip_a_real_submodule_called_module():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.other = nn.Linear(2, 2)

    h = Holder()
    assert unwrap_model(h) is h


def test_stop_after_last_skips_rest_of_forward():
    calls = []
    net = Net()
    net.head.register_forward_hook(lambda *a: calls.append("head"))
    taps = FeatureTaps(net, {"n": "neck:0"}, stop_after_last=True)
    result = taps.run(lambda: net(torch.randn(2, 4)))
    assert result is None and calls == [] and "n" in taps.outputs


def test_detach_and_gradients():
    net = Net()
    x = torch.randn(2, 4)
    t = FeatureTaps(net, ["body.0"], detach=True)
    t.run(lambda: net(x))
    assert not t.outputs["body.0"].requires_grad
    s = FeatureTaps(net, ["body.0"])
    s.run(lambda: net(x))
    s.outputs["body.0"].sum().backward()
    assert net.body[0].weight.grad is not None
