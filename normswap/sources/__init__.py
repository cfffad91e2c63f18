"""Sources: where a model comes from (torchvision, timm, Hugging Face, a Python factory, a file), its weights,
and the input it expects (a probe batch inferred from the model and its source)."""

from normswap.sources.hf import HF_CODE_KWARGS, TRUST_HINT, hf_custom_code
from normswap.sources.inputs import example_input, image_size, model_float
from normswap.sources.libs import optional_module
from normswap.sources.models import (KINDS, WEIGHT_SUFFIXES, RandomInitWarning, SourceSpec, cached_weights, load_model,
                                     parse_spec, rebuild)
from normswap.sources.weights import first_line, load_weights_file, read_state_dict

__all__ = [
    "HF_CODE_KWARGS", "KINDS", "TRUST_HINT", "WEIGHT_SUFFIXES", "RandomInitWarning", "SourceSpec", "cached_weights",
    "example_input", "first_line", "hf_custom_code", "image_size", "load_model", "load_weights_file", "model_float",
    "optional_module", "parse_spec", "read_state_dict", "rebuild",
]
