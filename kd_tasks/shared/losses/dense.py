"""Losses for dense prediction, one FPN level per term: PKD, MGD, FGD, dense logit KD and LD.

Inputs are ``(N, C, H, W)`` maps of one level: features (``pkd``, ``mgd``, ``fgd``; the student is
already mapped by a connector when the channel counts differ) or dense head outputs (``dense_kd``:
classification logits, ``ld``: box-side distributions). Student and teacher must have the same
shape. The teacher is a target: it is detached, so no gradient reaches it.

Every loss computes in float32: the ``LOSSES`` registry upcasts fp16/bf16 inputs and switches autocast
off inside every loss (:mod:`kd_tasks.shared.precision`); student and teacher are brought to one dtype
here (float64 when either is float64). The learnable parts of ``mgd`` and ``fgd`` are cast to that
dtype for the computation (their gradients flow back to the stored parameters).

``boxes_to_mask`` (the foreground cells of a map from ground-truth boxes) lives here too; the
detection package re-exports it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KDConfigError, ShapeMismatchError
from ..registry import LOSSES
from .feature import shape_mismatch
from .logit import check_choice, check_temperature, soft_kl

__all__ = [
    "PKDLoss",
    "MGDLoss",
    "FGDLoss",
    "DenseKDLoss",
    "LDLoss",
    "boxes_to_mask",
    "binary_kl",
    "fgd_attention",
    "fgd_masks",
    "pkd_normalize",
]


# ----------------------------------------------------------------------------- helpers


def boxes_to_mask(boxes: Sequence[Tensor], feature_shape: Sequence[int], input_shape: Sequence[int]) -> Tensor:
    """``(B, 1, h, w)`` float mask: 1 where a feature cell overlaps a box, else 0.

    ``boxes[b]`` is an ``(n, 4)`` tensor of ``(x1, y1, x2, y2)`` in the pixels of the padded input of
    size ``input_shape = (H, W)``; a map of ``(h, w)`` cells has strides ``H / h`` and ``W / w``, and
    cell ``(i, j)`` spans ``[j·sx, (j+1)·sx) × [i·sy, (i+1)·sy)``. A cell belongs to the foreground when
    that span overlaps a box by a positive area, so every box covers at least one cell on every level.
    """
    b, h, w = int(feature_shape[0]), int(feature_shape[-2]), int(feature_shape[-1])
    if len(boxes) != b:
        raise KDConfigError(f"fg_feature: {len(boxes)} box lists for a batch of {b}")
    height, width = float(input_shape[0]), float(input_shape[1])
    sy, sx = height / h, width / w
    device = boxes[0].device if b else torch.device("cpu")
    left = torch.arange(w, device=device, dtype=torch.float32) * sx
    top = torch.arange(h, device=device, dtype=torch.float32) * sy
    mask = torch.zeros(b, 1, h, w, device=device)
    for i, img_boxes in enumerate(boxes):
        if img_boxes.numel() == 0:
            continue
        bx = img_boxes.to(device=device, dtype=torch.float32)
        cols = (left[None, :] < bx[:, 2:3]) & (left[None, :] + sx > bx[:, 0:1])  # (n, w)
        rows = (top[None, :] < bx[:, 3:4]) & (top[None, :] + sy > bx[:, 1:2])  # (n, h)
        mask[i, 0] = (rows[:, :, None] & cols[:, None, :]).any(dim=0).float()
    return mask


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64: fp16/bf16 inputs are computed in float32."""
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_pair(owner: str, student: Tensor, teacher: Tensor) -> None:
    if student.dim() != 4 or teacher.dim() != 4:
        raise ShapeMismatchError(
            f"{owner}: expects (N, C, H, W) maps of one FPN level; got student {tuple(student.shape)}, teacher "
            f"{tuple(teacher.shape)}. Tap one level per term (e.g. 'neck:0')"
        )


def feature_pair(owner: str, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Detach the teacher, check both are equal-shaped ``(N, C, H, W)`` maps, cast to the compute dtype."""
    teacher = teacher.detach()
    _check_pair(owner, student, teacher)
    if student.shape != teacher.shape:
        raise shape_mismatch(owner, student.shape, teacher.shape)
    dtype = compute_dtype(student, teacher)
    return student.to(dtype), teacher.to(dtype)


def logit_pair(owner: str, student: Tensor, teacher: Tensor, layout: str) -> tuple[Tensor, Tensor]:
    """As :func:`feature_pair` for dense head outputs, where a connector cannot fix the channels."""
    teacher = teacher.detach()
    _check_pair(owner, student, teacher)
    s, t = tuple(student.shape), tuple(teacher.shape)
    if s[0] != t[0]:
        raise ShapeMismatchError(
            f"{owner}: batch sizes differ (student {s}, teacher {t}); feed the teacher the same inputs as the student"
        )
    if s[1] != t[1]:
        raise ShapeMismatchError(
            f"{owner}: student has {s[1]} channels, teacher {t[1]}; both heads must predict the same {layout} "
            f"per position (a connector cannot map head outputs)"
        )
    if s[2:] != t[2:]:
        raise ShapeMismatchError(
            f"{owner}: spatial sizes differ (student {s[2:]}, teacher {t[2:]}); pair the same FPN level (same "
            f"stride) of both heads, or add a 'resize' connector"
        )
    dtype = compute_dtype(student, teacher)
    return student.to(dtype), teacher.to(dtype)


def check_boxes(owner: str, gt_boxes: Sequence[Tensor] | None, input_shape: Sequence[int] | None, batch: int) -> None:
    """Raise :class:`KDConfigError` unless there is one box tensor per image and a valid ``(H, W)``."""
    if gt_boxes is None or input_shape is None:
        raise KDConfigError(
            f"{owner} needs gt_boxes= (one (n, 4) x1y1x2y2 tensor per image, input pixels) and input_shape= "
            f"(the padded batch (H, W)); DetectionDistiller passes both"
        )
    if len(gt_boxes) != batch:
        raise KDConfigError(f"{owner}: {len(gt_boxes)} box lists for a batch of {batch}; pass one per image")
    if len(input_shape) != 2 or not all(float(v) > 0 for v in input_shape):
        raise KDConfigError(f"{owner}: input_shape must be the padded input's (H, W), got {tuple(input_shape)}")
    for boxes in gt_boxes:
        if boxes.numel() and (boxes.dim() != 2 or boxes.shape[1] != 4):
            raise ShapeMismatchError(
                f"{owner}: every gt_boxes entry must be an (n, 4) x1y1x2y2 tensor; got {tuple(boxes.shape)}"
            )


def _param(p: Tensor, like: Tensor) -> Tensor:
    """A learnable tensor in the dtype of ``like`` (a no-op when it already is); gradients flow back."""
    return p if p.dtype == like.dtype else p.to(like.dtype)


def _check_device(owner: str, module: nn.Module, x: Tensor) -> None:
    device = next(module.parameters()).device
    if device != x.device:
        raise KDConfigError(
            f"{owner}: its learnable parts are on {device} but the features are on {x.device}; move the loss "
            f"with .to(device) (the Distiller moves its terms with the student)"
        )


def _uniform_(t: Tensor, bound: float, generator: torch.Generator) -> None:
    t.uniform_(-bound, bound, generator=generator)


def _default_conv_init(conv: nn.Conv2d, generator: torch.Generator) -> None:
    """PyTorch's default ``Conv2d`` initialisation (kaiming-uniform with ``a = √5``: ``U(±1/√fan_in)``
    for weight and bias), drawn from ``generator`` instead of the global random stream."""
    fan_in = conv.weight[0].numel()
    _uniform_(conv.weight, 1.0 / math.sqrt(fan_in), generator)
    if conv.bias is not None:
        _uniform_(conv.bias, 1.0 / math.sqrt(fan_in), generator)


def _unbuilt_conv(cin: int, cout: int, kernel: int) -> nn.Conv2d:
    """A CPU ``Conv2d`` with uninitialised weights, made without touching the global random stream."""
    return nn.Conv2d(cin, cout, kernel, padding=kernel // 2, device="meta").to_empty(device="cpu")


def _check_channels(owner: str, channels: int | None) -> int | None:
    if channels is None:
        return None
    if int(channels) != channels or int(channels) < 1:
        raise KDConfigError(f"{owner}: channels must be a positive integer (or None to take it from the first batch)")
    return int(channels)


def _check_weight(owner: str, name: str, value: float) -> float:
    value = float(value)
    if not value >= 0:
        raise KDConfigError(f"{owner}: {name} must be >= 0, got {value}")
    return value


# ----------------------------------------------------------------------------- PKD


def pkd_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """PKD's normalisation of an ``(N, C, H, W)`` map: every channel to zero mean and unit variance
    over its ``N·H·W`` values (the whole batch), ``(x - mean) / (std + eps)`` with the unbiased std."""
    n, c, h, w = x.shape
    rows = x.transpose(0, 1).reshape(c, -1)
    mean = rows.mean(dim=1, keepdim=True)
    std = rows.std(dim=1, keepdim=True)
    return ((rows - mean) / (std + eps)).reshape(c, n, h, w).transpose(0, 1)


@LOSSES.register("pkd")
class PKDLoss(nn.Module):
    """Cao, Zhang, Gao, Cheng, Cheng & Cheng (NeurIPS 2022), "PKD: General Distillation Framework for
    Object Detectors via Pearson Correlation Coefficient".

    Each channel of student and teacher is normalised over the batch and positions,
    ``x̂ = (x - μ_c) / (σ_c + 1e-6)`` with ``μ_c``, ``σ_c`` the mean and unbiased standard deviation of
    its ``M = N·H·W`` values (:func:`pkd_normalize`), then::

        L = 1 / (2·N·C·H·W) · sum (ŝ - t̂)²  =  1/C · sum_c (M - 1)/M · (1 - r_c)   (for eps -> 0)

    with ``r_c`` the Pearson correlation of channel ``c`` of student and teacher. The value is
    invariant to a per-channel affine map of either side with positive scale (up to the ``1e-6``), so
    the teacher's feature magnitude no longer constrains the student.

    This is exactly the authors' implementation (mmrazor ``PKDLoss``: ``F.mse_loss(norm(S), norm(T)) /
    2`` where ``norm`` pools each channel over ``N, H, W`` and uses ``torch.std`` and ``std + 1e-6``).
    The statistics therefore span the whole batch (padding included), not one image. The authors'
    ``loss_weight`` is the term weight here (their configs: 6 for Faster R-CNN, 10 for RetinaNet); their
    ``resize_stu`` option is a ``"resize"`` connector here. Mismatched shapes are refused.
    """

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = float(eps)
        if not self.eps >= 0:
            raise KDConfigError(f"pkd: eps must be >= 0, got {eps}")

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        s, t = feature_pair("pkd", student, teacher)
        n, _, h, w = s.shape
        if n * h * w < 2:
            raise ShapeMismatchError(
                f"pkd: needs at least 2 values per channel (N·H·W >= 2) for its standard deviation; got "
                f"{tuple(s.shape)}"
            )
        return F.mse_loss(pkd_normalize(s, self.eps), pkd_normalize(t, self.eps)) / 2

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


# ----------------------------------------------------------------------------- MGD


@LOSSES.register("mgd")
class MGDLoss(nn.Module):
    """Yang, Li, Shao, Shi, Yuan & Yuan (ECCV 2022), "Masked Generative Distillation".

    A random spatial mask ``M`` (one value per image and position, shared by all channels) drops a
    fraction ``λ = lambda_mgd`` of the student's positions, and a generation block
    ``G = conv3x3(C→C) → ReLU → conv3x3(C→C)`` must regenerate the teacher's full map from the rest::

        M_{n,h,w} = 0 if u_{n,h,w} > 1 - λ else 1,   u ~ U[0, 1)
        L = alpha_mgd · 1/N · sum_{n,c,h,w} (G(s · M) - t)²

    The mask is drawn exactly as the authors' ``torch.where(rand(N, 1, H, W) > 1 - λ, 0, 1)``. Defaults
    ``alpha_mgd = 2e-5``, ``lambda_mgd = 0.65`` are the authors' RetinaNet values (yzd-v/MGD
    ``retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py``; also mmrazor's ``MGDLoss`` /
    ``MGDConnector`` defaults and its RetinaNet config). Their two-stage configs use ``alpha_mgd=5e-7,
    lambda_mgd=0.45``.

    Randomness never touches the global random streams (so adding the term does not shift the
    student's augmentations or dropout): the masks come from this loss's own generator seeded with
    ``2·seed + 1`` (drawn on the CPU, then moved to the features' device), and the generation block
    is initialised from a generator seeded with ``2·seed``. Give each level's term its own ``seed``
    for independent masks. The mask generator's state is saved in ``state_dict`` (extra state), so a
    resumed run draws the masks it would have drawn.

    The generation block is learnable and belongs to this loss module. It is built with ``channels``
    when given, else from the channel count of the first batch (on that batch's device): **build the
    optimiser after a first (dry) call** -- :meth:`~kd_tasks.shared.distiller.Distiller.prepare` does
    it -- or its parameters are missing from the optimiser. Loading a state dict into an unbuilt loss
    builds it from the stored weights. Its initialisation is PyTorch's ``Conv2d`` default, as in the
    authors' code (parameter names ``generation.0.*`` / ``generation.2.*`` as theirs).

    Deviations from the authors' code: the student's ``align`` 1x1 convolution is not part of the loss
    (mismatched channels are refused: add a ``"conv1x1"`` connector); the mask comes from the loss's
    own generator instead of the global one; the loss is computed in float32 with autocast off.
    """

    def __init__(self, alpha_mgd: float = 2e-5, lambda_mgd: float = 0.65, channels: int | None = None, seed: int = 0):
        super().__init__()
        self.alpha_mgd = _check_weight("mgd", "alpha_mgd", alpha_mgd)
        self.lambda_mgd = float(lambda_mgd)
        if not 0.0 <= self.lambda_mgd <= 1.0:
            raise KDConfigError(f"mgd: lambda_mgd is the masked fraction and must lie in [0, 1], got {lambda_mgd}")
        if int(seed) != seed:
            raise KDConfigError(f"mgd: seed must be an integer, got {seed!r}")
        self.seed = int(seed)
        self._mask_state = torch.Generator().manual_seed(2 * self.seed + 1).get_state()
        self.generation: nn.Sequential | None = None
        channels = _check_channels("mgd", channels)
        if channels is not None:
            self._build(channels)

    @property
    def built(self) -> bool:
        return self.generation is not None

    def _build(self, channels: int, device: torch.device | None = None) -> None:
        generator = torch.Generator().manual_seed(2 * self.seed)
        first, second = _unbuilt_conv(channels, channels, 3), _unbuilt_conv(channels, channels, 3)
        with torch.no_grad():
            _default_conv_init(first, generator)
            _default_conv_init(second, generator)
        self.generation = nn.Sequential(first, nn.ReLU(), second).to(device=device)

    def draw_mask(self, n: int, h: int, w: int) -> Tensor:
        """The next ``(n, 1, h, w)`` keep-mask (1 = kept) from this loss's generator, on the CPU."""
        generator = torch.Generator()
        generator.set_state(self._mask_state)
        mat = torch.rand((n, 1, h, w), generator=generator)
        self._mask_state = generator.get_state()
        return torch.where(mat > 1 - self.lambda_mgd, 0.0, 1.0)

    def generate(self, x: Tensor) -> Tensor:
        """The generation block ``conv3x3 → ReLU → conv3x3`` applied in ``x``'s dtype."""
        first, _, second = self.generation
        x = F.conv2d(x, _param(first.weight, x), _param(first.bias, x), padding=1)
        return F.conv2d(F.relu(x), _param(second.weight, x), _param(second.bias, x), padding=1)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        s, t = feature_pair("mgd", student, teacher)
        n, c, h, w = s.shape
        if self.generation is None:
            self._build(c, s.device)
        built_for = self.generation[0].in_channels
        if c != built_for:
            raise ShapeMismatchError(
                f"mgd: the generation block was built for {built_for} channels, got {c}; use one mgd term per "
                f"FPN level, or a 'conv1x1' connector to {built_for} channels"
            )
        _check_device("mgd", self.generation, s)
        mask = self.draw_mask(n, h, w).to(device=s.device, dtype=s.dtype)
        return self.alpha_mgd * (self.generate(s * mask) - t).pow(2).sum() / n

    def get_extra_state(self) -> Any:
        return {"mask_generator_state": self._mask_state.clone()}

    def set_extra_state(self, state: Any) -> None:
        self._mask_state = state["mask_generator_state"].detach().cpu().to(torch.uint8).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "generation.0.weight"
        if self.generation is None and key in state_dict:
            self._build(int(state_dict[key].shape[1]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"alpha_mgd={self.alpha_mgd}, lambda_mgd={self.lambda_mgd}, seed={self.seed}, built={self.built}"


# ----------------------------------------------------------------------------- FGD


def fgd_attention(x: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """FGD's spatial ``(N, H, W)`` and channel ``(N, C)`` attention of an ``(N, C, H, W)`` map.

    ``A^S = H·W · softmax_{h,w}(mean_c |x| / T)`` and ``A^C = C · softmax_c(mean_{h,w} |x| / T)``.
    """
    n, c, h, w = x.shape
    value = x.abs()
    spatial = h * w * F.softmax(value.mean(dim=1).reshape(n, -1) / temperature, dim=1)
    channel = c * F.softmax(value.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial.reshape(n, h, w), channel


def fgd_masks(
    gt_boxes: Sequence[Tensor],
    feature_hw: Sequence[int],
    input_shape: Sequence[int],
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """FGD's foreground and background weights, ``(N, H, W)`` each (float64), per the authors' code.

    A box ``(x1, y1, x2, y2)`` in input pixels is scaled to feature cells (``x · W / W_in``,
    ``y · H / H_in``, in float64) and covers the cells ``floor(x1') … ceil(x2')`` and
    ``floor(y1') … ceil(y2')`` inclusive (so a box usually covers one row and column more than it
    overlaps). Each covered cell weighs ``1 / (rows · cols)`` of that index range; a cell covered by
    several boxes takes the largest weight (the smallest box). The background is every cell with no
    box, each weighing ``1 / (number of background cells)`` of its image (all 0 when there is none).
    """
    h, w = int(feature_hw[0]), int(feature_hw[1])
    in_h, in_w = float(input_shape[0]), float(input_shape[1])
    n = len(gt_boxes)
    fg = torch.zeros(n, h, w, dtype=torch.float64, device=device)
    rows = torch.arange(h, device=device)[None, :, None]
    cols = torch.arange(w, device=device)[None, None, :]
    for i, boxes in enumerate(gt_boxes):
        if boxes.numel() == 0:
            continue
        b = boxes.detach().to(device=device, dtype=torch.float64).reshape(-1, 4)
        wmin = torch.floor(b[:, 0] / in_w * w).long()
        wmax = torch.ceil(b[:, 2] / in_w * w).long()
        hmin = torch.floor(b[:, 1] / in_h * h).long()
        hmax = torch.ceil(b[:, 3] / in_h * h).long()
        area = 1.0 / ((hmax + 1 - hmin) * (wmax + 1 - wmin)).double()
        inside = (
            (rows >= hmin[:, None, None]) & (rows <= hmax[:, None, None])
            & (cols >= wmin[:, None, None]) & (cols <= wmax[:, None, None])
        )  # (boxes, h, w)
        fg[i] = torch.where(inside, area[:, None, None], torch.zeros((), dtype=torch.float64, device=device)).amax(0)
    bg = (fg <= 0).double()
    count = bg.sum(dim=(1, 2), keepdim=True)
    bg = torch.where(count > 0, bg / count.clamp(min=1), bg)
    return fg, bg


def _global_context_block(channels: int, generator: torch.Generator) -> nn.ModuleDict:
    """A GcBlock (Cao et al., GCNet) initialised as in the FGD authors' code, from ``generator``."""
    conv_mask = _unbuilt_conv(channels, 1, 1)
    squeeze, expand = _unbuilt_conv(channels, channels // 2, 1), _unbuilt_conv(channels // 2, channels, 1)
    norm = nn.LayerNorm([channels // 2, 1, 1])
    with torch.no_grad():
        # mmcv kaiming_init(mode="fan_in"): normal, relu gain, bias 0
        conv_mask.weight.normal_(0.0, math.sqrt(2.0 / channels), generator=generator)
        conv_mask.bias.zero_()
        _default_conv_init(squeeze, generator)
        expand.weight.zero_()  # last_zero_init
        expand.bias.zero_()
    return nn.ModuleDict(
        {"conv_mask": conv_mask, "channel_add_conv": nn.Sequential(squeeze, norm, nn.ReLU(), expand)}
    )


@LOSSES.register("fgd")
class FGDLoss(nn.Module):
    """Yang, Li, Jiang, Gong, Yuan, Zhao & Yuan (CVPR 2022), "Focal and Global Knowledge Distillation
    for Detectors".

    With ``s``, ``t`` the ``(N, C, H, W)`` maps and ``T = temperature``:

    - attention from ``|x|`` (:func:`fgd_attention`): spatial ``A^S = H·W · softmax_{hw}(mean_c|x| / T)``,
      channel ``A^C = C · softmax_c(mean_{hw}|x| / T)``; the teacher's weigh the feature loss;
    - foreground weights ``M^fg`` (``1 / box cells``, the smallest box where boxes overlap) and
      background weights ``M^bg`` (``1 / background cells``), see :func:`fgd_masks`;
    - focal loss ``L_fg = 1/N · sum M^fg · A^S_t · A^C_t · (s - t)²`` and ``L_bg`` likewise with ``M^bg``;
    - attention loss ``L_at = 1/N · (sum |A^C_s - A^C_t| + sum |A^S_s - A^S_t|)``;
    - global loss ``L_gl = 1/N · sum (R_s(s) - R_t(t))²`` with ``R(x) = x + W2·ReLU(LN(W1·ctx(x)))``,
      ``ctx(x) = sum_{hw} softmax_{hw}(W_k·x) · x`` -- a GcBlock; student and teacher each have their own,
      both learnable (the teacher's map is detached, its GcBlock still trains, as in the authors' code);
    - ``L = alpha_fgd · L_fg + beta_fgd · L_bg + gamma_fgd · L_at + lambda_fgd · L_gl``.

    Defaults are the authors' RetinaNet / GFL / SOLO values (yzd-v/FGD
    ``configs/distillers/fgd/fgd_retina_*.py``: ``temp=0.5, alpha_fgd=0.001, beta_fgd=0.0005,
    gamma_fgd=0.0005, lambda_fgd=0.000005``; their class default for gamma is 0.001). Their Faster /
    Mask R-CNN configs use ``5e-5, 2.5e-5, 5e-5, 5e-7``; RepPoints ``1.6e-3, 8e-4, 8e-4, 8e-6`` (FCOS the
    same with ``temp=0.8``).

    Needs ``gt_boxes`` (one ``(n, 4)`` x1y1x2y2 tensor per image, in pixels of the padded input) and
    ``input_shape`` (the padded batch ``(H, W)``); :class:`~kd_tasks.detection.distiller.DetectionDistiller`
    passes both. The GcBlocks are built with ``channels`` when given, else from the first batch (on its
    device): **build the optimiser after a first (dry) call** (the Distiller's ``prepare`` does it).
    They are initialised as the authors' (context conv: kaiming-normal fan-in, bias 0; first 1x1 conv:
    PyTorch default; last 1x1 conv: zeros, so ``L_gl`` starts at ``sum (s - t)²/N`` and only the last
    convs get a gradient at first) from this loss's own generator seeded with ``seed`` -- never the
    global random stream. Parameter names follow the authors' (``conv_mask_s``, ``channel_add_conv_s``,
    ``conv_mask_t``, ``channel_add_conv_t``); loading a state dict into an unbuilt loss builds it.

    Deviations from the authors' code:

    - boxes are scaled by the padded batch shape ``input_shape``; the authors divide by each image's
      own ``img_shape`` although the feature map covers the padded batch, which stretches the boxes
      of images smaller than the batch (identical when there is no padding). Coordinates are scaled in
      float64; a box reaching left of or above the image starts at cell 0 (the authors' slice would
      wrap around; clipped boxes never do);
    - the feature loss is written ``M·A^S·A^C·(s - t)²`` (they multiply both maps by the square roots
      and square the difference: the same value);
    - no ``align`` 1x1 conv inside the loss: mismatched channels are refused (add a ``"conv1x1"``
      connector); ``temperature`` is their ``temp``; float32 with autocast off.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        alpha_fgd: float = 0.001,
        beta_fgd: float = 0.0005,
        gamma_fgd: float = 0.0005,
        lambda_fgd: float = 0.000005,
        channels: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.temperature = check_temperature(temperature, "fgd")
        self.alpha_fgd = _check_weight("fgd", "alpha_fgd", alpha_fgd)
        self.beta_fgd = _check_weight("fgd", "beta_fgd", beta_fgd)
        self.gamma_fgd = _check_weight("fgd", "gamma_fgd", gamma_fgd)
        self.lambda_fgd = _check_weight("fgd", "lambda_fgd", lambda_fgd)
        if int(seed) != seed:
            raise KDConfigError(f"fgd: seed must be an integer, got {seed!r}")
        self.seed = int(seed)
        self.conv_mask_s: nn.Conv2d | None = None
        self.channel_add_conv_s: nn.Sequential | None = None
        self.conv_mask_t: nn.Conv2d | None = None
        self.channel_add_conv_t: nn.Sequential | None = None
        channels = _check_channels("fgd", channels)
        if channels is not None:
            self._build(channels)

    @property
    def built(self) -> bool:
        return self.conv_mask_s is not None

    def _build(self, channels: int, device: torch.device | None = None) -> None:
        if channels < 2:
            raise ShapeMismatchError(f"fgd: needs at least 2 channels (its GcBlock halves them), got {channels}")
        generator = torch.Generator().manual_seed(self.seed)
        student_block = _global_context_block(channels, generator).to(device=device)
        teacher_block = _global_context_block(channels, generator).to(device=device)
        self.conv_mask_s, self.channel_add_conv_s = student_block["conv_mask"], student_block["channel_add_conv"]
        self.conv_mask_t, self.channel_add_conv_t = teacher_block["conv_mask"], teacher_block["channel_add_conv"]

    def global_context(self, x: Tensor, conv_mask: nn.Conv2d, channel_add: nn.Sequential) -> Tensor:
        """``x + channel_add(context(x))`` -- the GcBlock output, computed in ``x``'s dtype."""
        n, c, h, w = x.shape
        logits = F.conv2d(x, _param(conv_mask.weight, x), _param(conv_mask.bias, x))  # (N, 1, H, W)
        weights = F.softmax(logits.reshape(n, 1, h * w), dim=2)
        context = torch.bmm(x.reshape(n, c, h * w), weights.transpose(1, 2)).reshape(n, c, 1, 1)
        squeeze, norm, _, expand = channel_add
        y = F.conv2d(context, _param(squeeze.weight, x), _param(squeeze.bias, x))
        y = F.layer_norm(y, norm.normalized_shape, _param(norm.weight, x), _param(norm.bias, x), norm.eps)
        y = F.conv2d(F.relu(y), _param(expand.weight, x), _param(expand.bias, x))
        return x + y

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        gt_boxes: Sequence[Tensor] | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> Tensor:
        s, t = feature_pair("fgd", student, teacher)
        n, c, h, w = s.shape
        check_boxes("fgd", gt_boxes, input_shape, n)
        if not self.built:
            self._build(c, s.device)
        built_for = self.conv_mask_s.in_channels
        if c != built_for:
            raise ShapeMismatchError(
                f"fgd: the GcBlocks were built for {built_for} channels, got {c}; use one fgd term per FPN "
                f"level, or a 'conv1x1' connector to {built_for} channels"
            )
        _check_device("fgd", self.conv_mask_s, s)
        spatial_t, channel_t = fgd_attention(t, self.temperature)
        spatial_s, channel_s = fgd_attention(s, self.temperature)
        fg, bg = fgd_masks(gt_boxes, (h, w), input_shape, s.device)
        fg, bg = fg.to(s.dtype), bg.to(s.dtype)

        weighted = (s - t).pow(2) * spatial_t[:, None] * channel_t[:, :, None, None]
        fg_loss = (weighted * fg[:, None]).sum() / n
        bg_loss = (weighted * bg[:, None]).sum() / n
        at_loss = (channel_s - channel_t).abs().sum() / n + (spatial_s - spatial_t).abs().sum() / n
        out_s = self.global_context(s, self.conv_mask_s, self.channel_add_conv_s)
        out_t = self.global_context(t, self.conv_mask_t, self.channel_add_conv_t)
        global_loss = (out_s - out_t).pow(2).sum() / n
        return (
            self.alpha_fgd * fg_loss
            + self.beta_fgd * bg_loss
            + self.gamma_fgd * at_loss
            + self.lambda_fgd * global_loss
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "conv_mask_s.weight"
        if not self.built and key in state_dict:
            self._build(int(state_dict[key].shape[1]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha_fgd={self.alpha_fgd}, beta_fgd={self.beta_fgd}, "
            f"gamma_fgd={self.gamma_fgd}, lambda_fgd={self.lambda_fgd}, seed={self.seed}, built={self.built}"
        )


# ----------------------------------------------------------------------------- dense logit KD


def binary_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Element-wise ``KL(Bern(σ(z_t)) ‖ Bern(σ(z_s)))`` from logits, in log space (terms with zero
    teacher probability are 0)."""
    log_qs, log_not_qs = F.logsigmoid(student_logits), F.logsigmoid(-student_logits)
    log_qt, log_not_qt = F.logsigmoid(teacher_logits), F.logsigmoid(-teacher_logits)
    qt, not_qt = log_qt.exp(), log_not_qt.exp()
    zero = qt.new_zeros(())
    positive = torch.where(qt > 0, qt * (log_qt - log_qs), zero)
    negative = torch.where(not_qt > 0, not_qt * (log_not_qt - log_not_qs), zero)
    return positive + negative


@LOSSES.register("dense_kd")
class DenseKDLoss(nn.Module):
    """Hinton-style KD on the dense classification logits of one level of a detection head.

    Input ``(N, A·K, H, W)`` with ``K = num_classes`` and ``A`` anchors per position (channel
    ``a·K + k`` is class ``k`` of anchor ``a``, the layout of mmdet's anchor heads; ``A = 1`` for
    anchor-free heads). Every ``(n, a, h, w)`` is one prediction, ``P = N·A·H·W`` of them; ``T`` is the
    temperature.

    - ``mode="sigmoid"`` (default; focal-loss heads: RetinaNet, FCOS, ATSS, GFL): each class is a
      binary distribution ``q = sigmoid(z / T)`` and::

          L = T² / P · sum_{n,a,h,w} sum_k KL(Bern(q_t) ‖ Bern(q_s))
            = T² / P · sum [BCE(q_s; q_t) - H(q_t)]       (0 when student = teacher)

      i.e. the soft-target binary cross-entropy minus the teacher's entropy, computed in log space;
    - ``mode="softmax"`` (softmax heads, background included in ``K``)::

          L = T² / P · sum_{n,a,h,w} KL(softmax_k(z_t / T) ‖ softmax_k(z_s / T))

    Classes are summed, predictions averaged (so the value does not grow with the map size or batch).
    ``T²`` keeps gradient magnitudes comparable across temperatures. Default ``T = 1``. All positions
    count (there is no foreground selection); unlike :class:`~kd_tasks.shared.losses.logit.SigmoidKDLoss`
    the sigmoid mode sums over classes and has its minimum at 0.
    """

    MODES = ("sigmoid", "softmax")

    def __init__(self, num_classes: int | None = None, mode: str = "sigmoid", temperature: float = 1.0):
        super().__init__()
        if num_classes is not None and (int(num_classes) != num_classes or int(num_classes) < 1):
            raise KDConfigError(
                f"dense_kd: num_classes is the classes per anchor of the head (e.g. 80 for COCO); got {num_classes!r}"
            )
        self.num_classes = None if num_classes is None else int(num_classes)
        self.mode = check_choice(mode, self.MODES, "dense_kd", "mode")
        self.temperature = check_temperature(temperature, "dense_kd")

    def forward(self, student: Tensor, teacher: Tensor, num_classes: int | None = None) -> Tensor:
        """``num_classes`` (passed by the detection adapter: the student head's classes) is used when the
        loss was built without one; a recipe's own value must agree with it."""
        k = self.num_classes if self.num_classes is not None else num_classes
        if k is None:
            raise KDConfigError("dense_kd: set num_classes to the classes per anchor of the head (e.g. 80 for COCO)")
        if num_classes is not None and int(num_classes) != k:
            raise KDConfigError(f"dense_kd: num_classes={k} in the recipe, but the detector's head has {num_classes} "
                                "classes; drop num_classes from the recipe or fix it")
        k = int(k)
        s, t = logit_pair("dense_kd", student, teacher, "anchors and classes")
        n, ch, h, w = s.shape
        if ch % k:
            raise KDConfigError(
                f"dense_kd: {ch} channels are not a multiple of num_classes={k}; channels = anchors × classes, "
                f"so set num_classes to the head's classes per anchor"
            )
        temp = self.temperature
        zs = s.reshape(n, ch // k, k, h, w) / temp
        zt = t.reshape(n, ch // k, k, h, w) / temp
        if self.mode == "softmax":
            per_prediction = soft_kl(zs.movedim(2, -1), zt.movedim(2, -1))
        else:
            per_prediction = binary_kl(zs, zt).sum(dim=2)
        return per_prediction.mean() * temp**2

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, mode={self.mode!r}, temperature={self.temperature}"


# ----------------------------------------------------------------------------- LD


@LOSSES.register("ld", "localization_distillation")
class LDLoss(nn.Module):
    """Zheng, Ye, Wang, Ren, Hu, Wang, Zuo & Cheng (CVPR 2022), "Localization Distillation for Dense
    Object Detection".

    Input: the box-regression map of one level of a GFL-style head, ``(N, 4·(n+1), H, W)`` with
    ``n = reg_max`` (channel ``side·(n+1) + i`` is bin ``i`` of side ``side`` in left, top, right,
    bottom order, mmdet's layout). Each side at each position is a distribution over ``n+1`` bins::

        ℓ_{b,side,h,w} = T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))      (over the n+1 bins)
        L = mean of ℓ over the selected (b, side, h, w)

    ``region="all"`` (default) averages over every position and side; ``region="boxes"`` keeps the
    cells that overlap a ground-truth box (:func:`boxes_to_mask`; needs ``gt_boxes`` and
    ``input_shape``, which :class:`~kd_tasks.detection.distiller.DetectionDistiller` passes) and is 0
    when no cell is kept. Defaults ``T = 10`` and ``reg_max = 16`` are mmdet's
    (``KnowledgeDistillationKLDivLoss(T=10)`` in ``configs/ld/ld_r18-gflv1-r101_fpn_1x_coco.py``).

    Deviations from mmdet's ``LDHead`` (the authors' implementation): there, LD runs only on the
    positive anchors of the ATSS assignment, each weighted by the student's detached maximum class
    score, summed over positives and averaged over the 4 sides (``avg_factor=4``); and
    ``knowledge_distillation_kl_div_loss`` averages the KL over the ``n+1`` bins (``.mean(1)``), i.e.
    divides it by ``n+1``. Here the KL is the plain sum over bins, there is no label assignment (use
    ``region="boxes"`` for a box-based selection) and no score weighting, and the value is a mean, not
    a sum over positives, so mmdet's ``loss_weight=0.25`` does not carry over: set the term weight for
    this scale.
    """

    REGIONS = ("all", "boxes")

    def __init__(self, reg_max: int = 16, temperature: float = 10.0, region: str = "all"):
        super().__init__()
        if int(reg_max) != reg_max or int(reg_max) < 1:
            raise KDConfigError(f"ld: reg_max must be a positive integer (the head's reg_max), got {reg_max!r}")
        self.reg_max = int(reg_max)
        self.temperature = check_temperature(temperature, "ld")
        self.region = check_choice(region, self.REGIONS, "ld", "region")

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        gt_boxes: Sequence[Tensor] | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> Tensor:
        s, t = logit_pair("ld", student, teacher, "box distribution (reg_max)")
        n, c, h, w = s.shape
        bins = self.reg_max + 1
        if c != 4 * bins:
            hint = f" (this map fits reg_max={c // 4 - 1})" if c % 4 == 0 and c >= 8 else ""
            raise ShapeMismatchError(
                f"ld: expects 4·(reg_max+1) = {4 * bins} channels for reg_max={self.reg_max}, got {c}; set "
                f"reg_max to the head's{hint}, and tap the box-regression output of a GFL-style head"
            )
        temp = self.temperature
        zs = s.reshape(n, 4, bins, h, w).movedim(2, -1)
        zt = t.reshape(n, 4, bins, h, w).movedim(2, -1)
        per_side = soft_kl(zs, zt, temp) * temp**2  # (N, 4, H, W)
        if self.region == "all":
            return per_side.mean()
        check_boxes("ld", gt_boxes, input_shape, n)
        mask = boxes_to_mask(gt_boxes, s.shape, input_shape).to(device=s.device, dtype=s.dtype)
        kept = mask.sum() * 4
        return (per_side * mask).sum() / kept.clamp(min=1)

    def extra_repr(self) -> str:
        return f"reg_max={self.reg_max}, temperature={self.temperature}, region={self.region!r}"
