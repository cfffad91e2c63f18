"""Kinds of layers: which torch modules and functions normswap treats as norms, activations and affine
layers, and the ops an activation's affine compensation commutes with. Plain tables, no normswap imports."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def qualname(obj: Any) -> str:
    """``module.QualName`` of a class, or of an instance's class."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    NORM_TYPES = NORM_TYPES + (nn.RMSNorm,)
AFFINE_TYPES: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear)
ACTIVATION_TYPES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Sigmoid, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.PReLU,
)
# Classes outside torch.nn that behave as norms (matched by qualified name: no import needed).
EXTRA_NORMS = {"torchvision.ops.misc.FrozenBatchNorm2d"}

NORM_FUNCTIONS = {
    F.batch_norm: "F.batch_norm", F.layer_norm: "F.layer_norm", F.group_norm: "F.group_norm",
    F.instance_norm: "F.instance_norm", torch.batch_norm: "torch.batch_norm", torch.layer_norm: "torch.layer_norm",
}
if hasattr(F, "rms_norm"):
    NORM_FUNCTIONS[F.rms_norm] = "F.rms_norm"
ACTIVATION_FUNCTIONS = {
    F.relu: "F.relu", F.relu_: "F.relu_", torch.relu: "torch.relu", torch.relu_: "torch.relu_",
    F.relu6: "F.relu6", F.leaky_relu: "F.leaky_relu", F.elu: "F.elu", F.selu: "F.selu", F.celu: "F.celu",
    F.gelu: "F.gelu", F.silu: "F.silu", F.mish: "F.mish", torch.tanh: "torch.tanh", F.tanh: "F.tanh",
    torch.sigmoid: "torch.sigmoid", F.sigmoid: "F.sigmoid", F.softplus: "F.softplus",
    F.hardswish: "F.hardswish", F.hardsigmoid: "F.hardsigmoid", F.hardtanh: "F.hardtanh",
}
ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


# Ops through which a positive per-tensor affine map c * (f - mu) commutes exactly (in eval mode): an
# activation's consumers found through them can absorb the map (ANAct compensation, docs/methods.md section 2.2).
COMMUTING_MODULES: tuple[type, ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
COMMUTING_FUNCTIONS = {
    torch.flatten: "flatten", F.dropout: "dropout", F.max_pool1d: "max_pool1d", F.max_pool2d: "max_pool2d",
    F.max_pool3d: "max_pool3d", F.adaptive_avg_pool1d: "adaptive_avg_pool1d",
    F.adaptive_avg_pool2d: "adaptive_avg_pool2d", F.adaptive_avg_pool3d: "adaptive_avg_pool3d",
    torch.mean: "mean", torch.reshape: "reshape", torch.permute: "permute", torch.transpose: "transpose",
}
COMMUTING_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "mean", "unsqueeze", "squeeze"}

# Leaf modules whose child ``act`` is the last op of their forward (its output is the parent's output), so the
# parent node's consumers are the activation's consumers: timm's norm + activation layers.
ACT_PARENTS = {f"timm.layers.norm_act.{n}" for n in (
    "BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d", "GroupNormAct", "GroupNorm1Act", "LayerNormAct",
    "LayerNormActFp32", "LayerNormAct2d", "LayerNormAct2dFp32", "RmsNormAct", "RmsNormActFp32", "RmsNormAct2d",
    "RmsNormAct2dFp32")}


def is_norm(m: nn.Module) -> bool:
    return isinstance(m, NORM_TYPES) or qualname(m) in EXTRA_NORMS


def is_activation(m: nn.Module) -> bool:
    return isinstance(m, ACTIVATION_TYPES)


def short_kind(m: nn.Module) -> str:
    """A short structural word for patterns: conv, linear, bn, ln, gn, norm, act, or the class name."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.modules.batchnorm._BatchNorm) or qualname(m) in EXTRA_NORMS:
        return "bn"
    if isinstance(m, nn.LayerNorm):
        return "ln"
    if isinstance(m, nn.GroupNorm):
        return "gn"
    if is_norm(m):
        return "norm"
    if is_activation(m):
        return "act"
    return type(m).__name__
