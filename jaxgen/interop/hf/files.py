"""Files of a HuggingFace model directory: config.json, weights (safetensors or torch, possibly
sharded with a `*.index.json`) and vocabulary files (`vocab.txt`, `vocab.json` + `merges.txt`,
`spiece.model`, or only `tokenizer.json`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxgen import objectives
from jaxgen.interop.hf.errors import InteropError

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
VOCAB_FILES = ("vocab.txt", "vocab.json", "merges.txt", "spiece.model")


def read_json(file: Path) -> dict[str, Any]:
    """A JSON file of the model directory; a missing or broken file names itself."""
    if not file.is_file():
        raise InteropError(f"{file} not found: a HuggingFace model directory needs {file.name}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise InteropError(f"{file} is not valid JSON: {err}") from err


def _to_float32(array: Any) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError as err:
        raise InteropError(
            f"reading {file} needs the safetensors package: pip install 'jaxgen[interop]'"
        ) from err
    try:
        return {k: _to_float32(v) for k, v in load_file(str(file)).items()}
    except (TypeError, ValueError) as err:
        # numpy has no bfloat16: read such files through torch when it is installed.
        try:
            from safetensors.torch import load_file as load_torch
        except ImportError:
            raise InteropError(f"cannot read {file} with numpy ({err}); install torch") from err
        return {k: v.float().numpy() for k, v in load_torch(str(file)).items()}


def _read_torch(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise InteropError(
            f"reading {file} needs torch (pip install 'jaxgen[interop]'), or convert it to "
            f"{SAFETENSORS_FILE}"
        ) from err
    state = torch.load(file, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "float")}


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a HF model directory as float32 numpy arrays, by HF name (shards too)."""
    path = Path(path)
    for name, reader in ((SAFETENSORS_FILE, _read_safetensors), (TORCH_FILE, _read_torch)):
        if (path / name).is_file():
            return reader(path / name)
        index = path / f"{name}.index.json"
        if index.is_file():
            tensors: dict[str, np.ndarray] = {}
            for shard in sorted(set(read_json(index)["weight_map"].values())):
                if not (path / shard).is_file():
                    raise InteropError(f"{path / shard} not found (listed in {index.name})")
                tensors.update(reader(path / shard))
            return tensors
    raise InteropError(
        f"no weights in {path}: expected {SAFETENSORS_FILE} or {TORCH_FILE} "
        "(or a sharded *.index.json)"
    )


def write_weights(tensors: dict[str, np.ndarray], path: Path, name: str = SAFETENSORS_FILE) -> None:
    """Writes `path/model.safetensors` (or `name`; float32, the layout from_pretrained reads)."""
    try:
        from safetensors.numpy import save_file
    except ImportError as err:
        raise InteropError(
            "writing model.safetensors needs safetensors: pip install 'jaxgen[interop]'"
        ) from err
    save_file(tensors, str(path / name), metadata={"format": "pt"})


def tokenizer_settings(path: Path, family: str) -> tuple[str, str, bool]:
    """(kind, vocab_path, lowercase) from vocabulary files next to the weights ('' when none)."""
    settings = {}
    if (path / "tokenizer_config.json").is_file():
        settings = read_json(path / "tokenizer_config.json")
    lower = settings.get("do_lower_case")
    if (path / "vocab.txt").is_file():
        return "wordpiece", str(path / "vocab.txt"), True if lower is None else bool(lower)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return "bpe", str(path), bool(lower)
    models_found = sorted(path.glob("*.model"))
    if models_found:
        return "sentencepiece", str(models_found[0]), bool(lower)
    defaults = objectives.get(family).Data()
    return defaults.tokenizer, "", defaults.lowercase if lower is None else bool(lower)


def extract_vocabulary(path: Path, out: Path) -> tuple[str, bool] | None:
    """vocab.txt or vocab.json+merges.txt from tokenizer.json (transformers 5 saves only that)."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    spec = read_json(file)
    model, normalizer = spec.get("model") or {}, spec.get("normalizer") or {}
    out.mkdir(parents=True, exist_ok=True)
    if model.get("type") == "WordPiece":
        tokens = sorted(model["vocab"], key=model["vocab"].get)
        (out / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
        return "wordpiece", bool(normalizer.get("lowercase", True))
    if model.get("type") == "BPE":
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        (out / "vocab.json").write_text(
            json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8"
        )
        (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges),
                                        encoding="utf-8")  # fmt: skip
        return "bpe", normalizer.get("type") == "Lowercase"
    return None
