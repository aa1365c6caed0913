"""Vision Transformer (Dosovitskiy et al. 2020), written for export.

Parameter names follow timm's VisionTransformer so that timm state dicts load
as they are. Everything a tensor's shape decides is fixed when the module is
built (token count, head size); the batch dimension is only ever written as -1
or taken from a tensor by an op (expand_as), never read into a Python int, so
the exported graph keeps a symbolic batch.
"""
from __future__ import annotations

import torch
from torch import nn

from ..zoo import ModelSpec


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, num_tokens: int):
        super().__init__()
        self.heads, self.head_dim, self.num_tokens = heads, dim // heads, num_tokens
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, hd = self.num_tokens, self.heads, self.head_dim
        # Plain MatMul + Softmax: portable to every runtime (no fused SDPA kernel).
        qkv = self.qkv(x).reshape(-1, n, 3, h, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(-1, n, h * hd)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as in the reference models
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm encoder block; dropout and drop-path are identity at inference."""

    def __init__(self, dim: int, mlp: int, heads: int, num_tokens: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, num_tokens)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = patch; a hybrid puts a CNN backbone in front."""

    def __init__(self, in_chans: int, dim: int, patch: int, backbone: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is not None:
            x = self.backbone(x)
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D]


class VisionTransformer(nn.Module):
    def __init__(self, spec: ModelSpec, num_classes: int = 1000, img_size: int = 224,
                 layer_norm_eps: float | None = None):
        super().__init__()
        from .resnetv2 import ResNetV2Backbone  # only hybrids need it

        self.spec, self.num_classes, self.img_size = spec, num_classes, img_size
        eps = spec.layer_norm_eps if layer_norm_eps is None else layer_norm_eps
        d = spec.hidden_size
        if spec.is_hybrid:
            backbone = ResNetV2Backbone(spec.backbone_layers)
            self.patch_embed = PatchEmbed(backbone.out_channels, d, spec.patch_size, backbone)
        else:
            self.patch_embed = PatchEmbed(3, d, spec.patch_size)
        self.grid_size = img_size // spec.stride
        num_tokens = self.grid_size ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, spec.mlp_size, spec.heads, num_tokens, eps)
                                      for _ in range(spec.layers)])
        self.norm = nn.LayerNorm(d, eps=eps)
        self.head = nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # Random but well-scaled weights, so that tests without a checkpoint see
        # realistic activations (trunc-normal 0.02 like timm, zero biases).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        cls = self.cls_token.expand_as(x[:, :1])  # batch taken from the tensor, not an int
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])
