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
    assert taps.run(lambda: net(torch.randn(2, 4))) is not None  # the first forward counts every call
    calls.clear()
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


class SharedHead(nn.Module):
    """One convolution-like layer run once per level, as detection heads run their convs per FPN level."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Linear(4, 4)
        self.after = nn.Linear(4, 4)

    def forward(self, levels):
        outs = [self.conv(x) for x in levels]
        return [self.after(o) for o in outs]


def test_numbered_calls_pick_one_call_or_all_of_them():
    head = SharedHead()
    levels = [torch.randn(2, 4) * (i + 1) for i in range(3)]
    taps = FeatureTaps(head, ["conv#0", "conv#2", "conv#*"])
    taps.run(lambda: head(levels))
    expected = [head.conv(x) for x in levels]
    assert torch.equal(taps.outputs["conv#0"], expected[0])
    assert torch.equal(taps.outputs["conv#2"], expected[2])
    assert len(taps.outputs["conv#*"]) == 3 and all(torch.equal(a, b) for a, b in zip(taps.outputs["conv#*"], expected))
    assert TapSpec.parse("conv#1:0") == TapSpec("conv", ("0",), False, 1)
    assert TapSpec.parse({"module": "conv", "call": 1}) == TapSpec("conv", (), False, 1)
    assert str(TapSpec.parse("conv#1:0")) == "conv#1:0"
    with pytest.raises(KDConfigError, match="call after '#'"):
        TapSpec.parse("conv#first")


def test_a_module_that_fires_several_times_must_name_its_call():
    head = SharedHead()
    taps = FeatureTaps(head, ["conv", "after#1"])
    taps.run(lambda: head([torch.randn(2, 4) for _ in range(3)]))
    assert taps.ambiguous() == {"conv": 3}
    error = taps.ambiguity_error("student")
    assert "runs 3 times" in str(error) and "'conv#0' .. 'conv#2'" in str(error) and "'conv#*'" in str(error)
    single = FeatureTaps(head, ["conv#1"])
    single.run(lambda: head([torch.randn(2, 4) for _ in range(3)]))
    assert single.ambiguity_error("student") is None


def test_early_stop_waits_for_the_numbered_call_and_never_cuts_a_repeated_module_short():
    head = SharedHead()
    levels = [torch.randn(2, 4) for _ in range(3)]
    after_calls = []
    head.after.register_forward_hook(lambda *a: after_calls.append(1))
    taps = FeatureTaps(head, ["conv#1"], stop_after_last=True)
    assert taps.run(lambda: head(levels)) is not None  # the first forward runs to the end (counts the calls)
    after_calls.clear()
    assert taps.run(lambda: head(levels)) is None  # then stops right after call 1
    assert after_calls == [] and torch.equal(taps.outputs["conv#1"], head.conv(levels[1]))
    every = FeatureTaps(head, ["conv#*"], stop_after_last=True)
    every.run(lambda: head(levels))
    every.run(lambda: head(levels))
    assert len(every.outputs["conv#*"]) == 3  # stopped only after the last of the three calls
    unnamed = FeatureTaps(head, ["conv"], stop_after_last=True)
    unnamed.run(lambda: head(levels))
    unnamed.run(lambda: head(levels))
    assert unnamed.ambiguous() == {"conv": 3}  # not stopped after the first call: the repeat is seen
