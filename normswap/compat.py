"""Import guards for broken-but-common installs. Each guard does nothing on a healthy install.

The CPU build of torch beside PyPI's (CUDA) torchvision wheel fails at ``import torchvision`` with
``RuntimeError: operator torchvision::nms does not exist``: the wheel's compiled ops cannot load, and
its import registers fake kernels for ``torchvision::nms`` / ``qnms`` without checking they exist.
Defining those two operator schemas first lets torchvision (and timm, transformers' vision code)
import; models, transforms, datasets and fx tracing then work, only the C++ ops stay unavailable.
"""

from __future__ import annotations

import sys
from types import ModuleType

_LIB = None  # keeps the torch.library.Library alive (the schemas vanish with it)
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def import_torchvision() -> ModuleType:
    """Import torchvision, repairing the missing-operator failure if (and only if) it happens."""
    global _LIB
    try:
        import torchvision

        return torchvision
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            _LIB.define(schema)
    import torchvision

    return torchvision


def torchvision_is_patched() -> bool:
    """True when :func:`import_torchvision` had to define the operator schemas itself."""
    return _LIB is not None
