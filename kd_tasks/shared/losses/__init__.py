"""Distillation losses, one file per family; importing this package registers them in ``LOSSES``.

=============  ====================================================================================
family         registry names
=============  ====================================================================================
logit          kd (hinton), dkd, dist, logit_mse, sigmoid_kd (bce_kd)
feature        feature (mse, l1, smooth_l1, cosine), fitnet (hint), at (attention_transfer), fsp
channel        cwd (channel_wise)
dense          pkd, mgd, fgd, dense_kd, ld (localization_distillation); one FPN level per term
relational     rkd, sp (similarity_preserving), pkt, cc (correlation_congruence), irg, crd
attention      attention-map and MiniLM / MiniLMv2 relation losses for transformers
=============  ====================================================================================
"""

import importlib

_FAMILIES = ("logit", "feature", "channel", "dense", "relational", "attention")

for _name in _FAMILIES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:  # a family still being written
        if _e.name != f"{__name__}.{_name}":
            raise
