"""The one switch for normswap's opt-in compiled kernels: the environment variable ``NORMSWAP_COMPILE``.

UAN's channel-mode kernel (:mod:`normswap.variants.uan.fused`) and PatchNorm's depthwise kernel
(:mod:`normswap.variants.patchnorm.fused`) each keep their own on/off state (``set_compiled`` overrides it per
variant); both start from what this module reads.
"""

from __future__ import annotations

import os

__all__ = ["ENV", "requested"]

ENV = "NORMSWAP_COMPILE"


def requested() -> bool:
    """Whether ``NORMSWAP_COMPILE`` asks for the compiled kernels (``1``, ``true``, ``yes`` or ``on``, any case)."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")
