"""LoRA adapters exported in peft's format load onto the HF base model with jaxgen's logits, and a
LoRA run exports its merged model beside them."""

from __future__ import annotations

import json

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import linen as nn

from jaxgen import models
from jaxgen.config import LoraConfig
from jaxgen.interop import hf
from jaxgen.interop.hf import peft as peft_export
from jaxgen.models import lora
from tests.interop.hf.conftest import bert_model, gpt_model, save, t5_model
from tests.interop.hf.test_names import ATOL, _bert_batch, _long
from tests.models.test_lora import _random_b

torch.set_grad_enabled(False)

# Targets per family: every kernel GPT-2 fuses or keeps apart (query and value share c_attn).
TARGETS = {
    "bert": ("query", "value", "out", "wo"),
    "gpt": ("query", "value", "out", "wi"),
    "t5": ("query", "key", "out", "wi_0", "wo"),
}


def _hf_model(family: str, tmp_path):
    reference = {"bert": bert_model, "gpt": gpt_model, "t5": lambda: t5_model("v1.1")}[family]()
    return save(reference, tmp_path / "base")


def _inputs(family: str) -> tuple[tuple, dict]:
    """(jaxgen apply arguments, the HF model's keyword inputs) of one small batch."""
    rng = np.random.default_rng(4)
    if family == "bert":
        b = _bert_batch()
        args = (b["input_ids"], b["segment_ids"], b["attention_mask"])
        return args, dict(input_ids=_long(b["input_ids"]), token_type_ids=_long(b["segment_ids"]),
                          attention_mask=_long(b["attention_mask"]))  # fmt: skip
    if family == "gpt":
        ids = rng.integers(0, 99, (2, 12)).astype(np.int32)
        return (ids,), dict(input_ids=_long(ids))
    enc = rng.integers(2, 99, (2, 9)).astype(np.int32)
    dec = np.concatenate([np.zeros((2, 1)), rng.integers(2, 99, (2, 6))], 1).astype(np.int32)
    return (enc, dec), dict(input_ids=_long(enc), decoder_input_ids=_long(dec))


@pytest.mark.parametrize("family", list(TARGETS))
def test_peft_loads_the_adapters_with_jaxgens_logits(family, tmp_path):
    base_dir = _hf_model(family, tmp_path)
    config, base = hf.load(base_dir)
    spec = LoraConfig(rank=3, alpha=6.0, targets=TARGETS[family])
    module = models.build(config.model, spec)
    args, hf_inputs = _inputs(family)
    fresh = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), *args)["params"])
    params = _random_b(lora.with_base(fresh, base))
    out = jax.jit(module.apply)({"params": params}, *args)
    logits = np.asarray(out["mlm_logits"] if family == "bert" else out)

    adapter_dir = peft_export.save_adapters(params, config.model, spec, tmp_path / "adapter",
                                            base=str(base_dir))  # fmt: skip
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["r"] == 3 and saved["base_model_name_or_path"] == str(base_dir)
    cls = getattr(transformers, transformers.AutoConfig.from_pretrained(base_dir).architectures[0])
    model = peft.PeftModel.from_pretrained(cls.from_pretrained(base_dir), adapter_dir).eval()
    expected = model(**hf_inputs)
    got = expected.prediction_logits if family == "bert" else expected.logits
    np.testing.assert_allclose(logits, got.numpy(), atol=ATOL, rtol=0)
    # Loaded, not ignored: without the adapters the logits differ.
    plain = cls.from_pretrained(base_dir).eval()(**hf_inputs)
    plain = plain.prediction_logits if family == "bert" else plain.logits
    assert np.max(np.abs(plain.numpy() - logits)) > 10 * ATOL


def test_peft_loads_an_adapted_classifier_with_its_head(tmp_path):
    """The trained head goes with the adapters (peft's modules_to_save): loaded onto the base
    BertForSequenceClassification, whose head is untrained, it gives jaxgen's logits."""
    hf_config = bert_model().config
    hf_config.num_labels = 3
    torch.manual_seed(1)
    base_dir = save(transformers.BertForSequenceClassification(hf_config), tmp_path / "base")
    config, base = hf.load(base_dir)
    spec = LoraConfig(rank=2, alpha=4.0, targets=("query", "value"))
    module = models.build(config.model, spec)
    args, hf_inputs = _inputs("bert")
    fresh = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), *args)["params"])
    params = _random_b(lora.with_base(fresh, base))
    rng = np.random.default_rng(0)
    params["classifier"] = {
        k: v + rng.normal(0, 0.5, v.shape).astype(np.float32)
        for k, v in params["classifier"].items()
    }  # a trained head
    logits = np.asarray(jax.jit(module.apply)({"params": params}, *args)["classifier_logits"])
    adapter_dir = peft_export.save_adapters(params, config.model, spec, tmp_path / "adapter")
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["classifier"] and saved["task_type"] == "SEQ_CLS"
    base_model = transformers.BertForSequenceClassification.from_pretrained(base_dir)
    model = peft.PeftModel.from_pretrained(base_model, adapter_dir).eval()
    np.testing.assert_allclose(logits, model(**hf_inputs).logits.numpy(), atol=ATOL, rtol=0)
    untrained = transformers.BertForSequenceClassification.from_pretrained(base_dir).eval()
    assert np.max(np.abs(untrained(**hf_inputs).logits.numpy() - logits)) > 10 * ATOL


def test_a_lora_run_exports_the_merged_model_and_its_adapters(tmp_path):
    from jaxgen import config as config_lib
    from jaxgen.train import checkpoint
    from jaxgen.train.state import TrainState

    base_dir = _hf_model("bert", tmp_path)
    config, base = hf.load(base_dir)
    spec = LoraConfig(rank=2)
    module = models.build(config.model, spec)
    args, hf_inputs = _inputs("bert")
    fresh = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), *args)["params"])
    params = _random_b(lora.with_base(fresh, base))
    workdir = tmp_path / "run"
    workdir.mkdir()
    run = config_lib.RunConfig(**{**{f: getattr(config, f) for f in config_lib.SECTIONS[:-1]},
                                  "lora": spec})  # fmt: skip
    config_lib.save_config(run, workdir / "config.json")
    saver = checkpoint.Checkpointer(workdir, use_async=False)
    saver.save(1, TrainState.create(params, {}, jax.random.key(0)), {}, force=True)
    saver.close()
    hf.export_workdir(workdir, tmp_path / "export")
    merged = transformers.BertForPreTraining.from_pretrained(tmp_path / "export").eval()
    want = np.asarray(jax.jit(module.apply)({"params": params}, *args)["mlm_logits"])
    np.testing.assert_allclose(merged(**hf_inputs).prediction_logits.numpy(), want, atol=ATOL)
    assert (tmp_path / "export" / "adapter" / "adapter_model.safetensors").is_file()
