"""HuggingFace checkpoints: load BERT, GPT-2 and T5 into jaxgen and export them back (local files).

Split by concern: `names` (HF tensor names <-> parameter paths and their transforms),
`architectures` (config.json <-> config.model), `files` (reading and writing a model directory),
`convert` (whole conversions and the run directories of `jaxgen convert`).
"""

from jaxgen.interop.hf.architectures import (
    ARCHITECTURES,
    architecture,
    full_config,
    hf_config_from_model,
    model_config_from_hf,
)
from jaxgen.interop.hf.convert import export_workdir, import_workdir, load, save
from jaxgen.interop.hf.errors import InteropError
from jaxgen.interop.hf.files import read_weights
from jaxgen.interop.hf.names import param_shapes, params_from_hf, params_to_hf

__all__ = [
    "ARCHITECTURES",
    "InteropError",
    "architecture",
    "export_workdir",
    "full_config",
    "hf_config_from_model",
    "import_workdir",
    "load",
    "model_config_from_hf",
    "param_shapes",
    "params_from_hf",
    "params_to_hf",
    "read_weights",
    "save",
]
