"""normswap: swap a pretrained network's normalisation for research variants, starting exact.

    >>> import normswap
    >>> result = normswap.convert("mobilenet_v2", to="uan", weights="IMAGENET1K_V1")
    >>> result.report.ok
    True
    >>> result.save("mobilenet_v2-uan.safetensors")
    >>> model = normswap.load("mobilenet_v2-uan.safetensors")
    >>> calibrated = normswap.calibrate(result, "photos")   # EM on real photos + fidelity report
    >>> print(calibrated.report.render())
    >>> tuned = normswap.finetune("recipes/fmnist-uan.yaml")     # anneal to strength 1, distilling
    >>> print(tuned.render())
"""

from normswap.version import __version__  # noqa: E402

from normswap.compat import import_torchvision as _import_torchvision

_import_torchvision()  # repairs the CPU-torch + CUDA-torchvision install before anyone imports it

from normswap.api.conversion import ConvertResult, ExportResult, Inspection, convert, export, inspect, load, plan, save  # noqa: E402
from normswap.calibration.report import FidelityReport  # noqa: E402
from normswap.api.calibration import CalibrationResult, calibrate, evaluate  # noqa: E402
from normswap.diagnostics.session import diagnose  # noqa: E402
from normswap.errors import NormswapError  # noqa: E402
from normswap.recipe import Recipe, load_recipe  # noqa: E402
from normswap.core.plan import Plan, Site  # noqa: E402
from normswap.train.run import FinetuneResult, finetune  # noqa: E402
from normswap.variants import Variant, VariantConfig, register  # noqa: E402

__all__ = [
    "CalibrationResult", "ConvertResult", "ExportResult", "FidelityReport", "FinetuneResult", "Inspection",
    "NormswapError", "Plan", "Recipe", "Site", "Variant", "VariantConfig", "__version__", "calibrate", "convert",
    "diagnose", "evaluate", "export", "finetune", "inspect", "load", "load_recipe", "plan", "register", "save",
]
