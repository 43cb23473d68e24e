"""LoRA adapters in `peft`'s format: `adapter_config.json` + `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(<the HF base model>, dir)` loads onto the exported base model.

peft keeps `lora_A.weight [r, in]` and `lora_B.weight [out, r]` per adapted HF module, named
`base_model.model.<module>.lora_{A,B}.weight`, and scales by `lora_alpha / r`. jaxgen's
adapters `lora_a [*in, r]`, `lora_b [r, *out]` flatten onto them; GPT-2's fused `c_attn` (query,
key and value in one Conv1D) takes the adapted ones of the three as one adapter of rank r x (how
many), A stacked and B block-diagonal, `rank_pattern` and `alpha_pattern` keeping alpha / r.
A task head trained with the adapters (BERT's `classifier`) is saved whole as one of peft's
`modules_to_save`, `base_model.model.classifier.{weight,bias}`, so the adapted classifier loads
with its head.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from flax import linen as nn
from flax import traverse_util

from jaxgen.config import LoraConfig
from jaxgen.interop.hf import files, names
from jaxgen.interop.hf.errors import InteropError
from jaxgen.models import lora as lora_lib
from jaxgen.models import scan
from jaxgen.models.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _pair(flat: dict[str, Any], kernel: str, rank: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(A [r, in], B [out, r]) in peft's layout of the adapter beside `kernel`, if any."""
    parent = kernel.removesuffix("/kernel")
    if f"{parent}/lora_a" not in flat:
        return None
    a = np.asarray(flat[f"{parent}/lora_a"], np.float32).reshape(-1, rank).T
    b = np.asarray(flat[f"{parent}/lora_b"], np.float32).reshape(rank, -1).T
    return a, b


def adapters_to_peft(
    params: Any, model: ModelConfig, lora: LoraConfig
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config.json's content, {peft tensor name: array}) of an adapted model's params."""
    params = nn.meta.unbox(dict(params))
    if model.scan_layers:
        params = scan.unstack_layers(params, model)
        model = dataclasses.replace(model, scan_layers=False)
    flat = traverse_util.flatten_dict(params, sep="/")
    r = lora.rank
    tensors: dict[str, np.ndarray] = {}
    modules: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    heads: set[str] = set()
    for rule in names.RULES[model.family](model):
        if all(p.split("/")[0] in lora_lib.HEADS and p in flat for p in rule.jax):
            arrays = [np.asarray(flat[p], np.float32) for p in rule.jax]
            for name, value in zip(rule.hf, rule.transform.to_hf(arrays), strict=True):
                tensors[f"base_model.model.{name}"] = np.ascontiguousarray(value)
                heads.add(name.rsplit(".", 1)[0])
            continue
        kernels = [p for p in rule.jax if p.endswith("/kernel")]
        pairs = [_pair(flat, p, r) for p in kernels]
        if not kernels or all(p is None for p in pairs):
            continue
        module = rule.hf[0].removesuffix(".weight")
        if len(kernels) == 1:
            a, b = pairs[0]
        else:  # GPT-2's c_attn: the adapted parts of [query | key | value] as one adapter
            widths = [int(np.prod(flat[p].shape[1:])) for p in kernels]
            used = [(i, pair) for i, pair in enumerate(pairs) if pair is not None]
            a = np.concatenate([pair[0] for _, pair in used], axis=0)
            b = np.zeros((sum(widths), r * len(used)), np.float32)
            for block, (i, pair) in enumerate(used):
                start = sum(widths[:i])
                b[start : start + widths[i], block * r : (block + 1) * r] = pair[1]
            rank_pattern[module] = r * len(used)
            alpha_pattern[module] = lora.alpha * len(used)
        modules.append(module)
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b)
    if not modules:
        raise InteropError("the parameters hold no LoRA adapters (lora_a/lora_b) to export")
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if heads else None,
        "r": r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(modules),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": model.family == "gpt",  # GPT-2's Conv1D weights are [in, out]
        "init_lora_weights": True,
        "use_rslora": False,
        "inference_mode": True,
        "modules_to_save": sorted(heads) or None,
        "base_model_name_or_path": None,
    }
    return config, tensors


def save_adapters(
    params: Any, model: ModelConfig, lora: LoraConfig, path: str | os.PathLike, base: str = ""
) -> Path:
    """Writes the adapters in peft's format into `path` (base: the base model's directory, for
    adapter_config.json); returns `path`."""
    config, tensors = adapters_to_peft(params, model, lora)
    config["base_model_name_or_path"] = base or None
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    files.write_weights(tensors, path, WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path
