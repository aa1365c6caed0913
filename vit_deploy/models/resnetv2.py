"""ResNet-v2 backbone of the R50+ViT-B/16 hybrid (timm's ResNetV2, preact=False).

StdConv2d standardizes its weight at every forward pass; `fold_weight_standardization`
replaces each one with a plain conv holding the standardized weight, so the
exported graph computes no weight statistics.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    """TF 'SAME' padding (timm's pad_same) for one spatial side."""
    total = max((math.ceil(size / s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    # H and W are static for a given export, so these are constants in the graph.
    ph, pw = _same_pad(x.shape[-2], k, s), _same_pad(x.shape[-1], k, s)
    if ph == (0, 0) and pw == (0, 0):
        return x
    return F.pad(x, (pw[0], pw[1], ph[0], ph[1]), value=value)


class StdConv2dSame(nn.Conv2d):
    """Conv with weight standardization and TF-style SAME padding (timm StdConv2dSame)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, eps: float = 1e-8):
        super().__init__(cin, cout, k, stride=stride, padding=0, bias=False)
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        return (w - mean) / torch.sqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.standardized_weight(), None, self.stride)


class FoldedConv2dSame(nn.Conv2d):
    """A StdConv2dSame after folding: plain weights, same padding rule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.weight, self.bias, self.stride)


class GroupNormAct(nn.GroupNorm):
    def __init__(self, channels: int, act: bool = True):
        super().__init__(32, channels, eps=1e-5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu(x) if self.act else x


class DownsampleConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = StdConv2dSame(cin, cout, 1, stride)
        self.norm = GroupNormAct(cout, act=False)

    def forward(self, x):
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """Non-pre-activation bottleneck (timm resnetv2.Bottleneck)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        mid = cout // 4
        self.downsample = DownsampleConv(cin, cout, stride) if (stride != 1 or cin != cout) else None
        self.conv1, self.norm1 = StdConv2dSame(cin, mid, 1), GroupNormAct(mid)
        self.conv2, self.norm2 = StdConv2dSame(mid, mid, 3, stride), GroupNormAct(mid)
        self.conv3, self.norm3 = StdConv2dSame(mid, cout, 1), GroupNormAct(cout, act=False)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class Stem(nn.Module):
    def __init__(self, cout: int = 64):
        super().__init__()
        self.conv = StdConv2dSame(3, cout, 7, stride=2)
        self.norm = GroupNormAct(cout)

    def forward(self, x):
        x = self.norm(self.conv(x))
        return F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), 3, 2)


class ResNetV2Backbone(nn.Module):
    def __init__(self, layers: tuple[int, ...], stem_chs: int = 64):
        super().__init__()
        self.stem = Stem(stem_chs)
        stages, cin = [], stem_chs
        for i, depth in enumerate(layers):
            cout = 256 * 2 ** i
            blocks = [Bottleneck(cin if j == 0 else cout, cout, (1 if i == 0 else 2) if j == 0 else 1)
                      for j in range(depth)]
            stages.append(nn.Module())
            stages[-1].blocks = nn.Sequential(*blocks)
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.out_channels = cin

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage.blocks(x)
        return x


def fold_weight_standardization(model: nn.Module) -> int:
    """Replace every StdConv2dSame in `model` by a FoldedConv2dSame; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, StdConv2dSame):
                folded = FoldedConv2dSame(child.in_channels, child.out_channels, child.kernel_size,
                                          stride=child.stride, padding=0, bias=False)
                with torch.no_grad():
                    folded.weight.copy_(child.standardized_weight())
                setattr(parent, name, folded.eval())
                count += 1
    return count
