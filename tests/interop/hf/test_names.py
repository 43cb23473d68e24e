"""HF checkpoints load into jaxgen models that give PyTorch's numbers and export back exactly."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from jaxgen import models, sample
from jaxgen.interop import hf
from tests.interop.hf.conftest import perturb, save, t5_model

ATOL = 1e-4  # float32 end to end; both sides accumulate in float32

torch.set_grad_enabled(False)


def _flat(params: dict) -> dict[str, np.ndarray]:
    return traverse_util.flatten_dict(params, sep="/")


def _bert_batch() -> dict[str, np.ndarray]:
    """Two rows: two segments each, the second row padded after 7 tokens."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 99, (2, 10)).astype(np.int32)
    segments = np.array([[0] * 5 + [1] * 5, [0] * 4 + [1] * 3 + [0] * 3], np.int32)
    mask = np.array([[1] * 10, [1] * 7 + [0] * 3], np.int32)
    ids[1, 7:] = 0
    return {"input_ids": ids, "segment_ids": segments, "attention_mask": mask}


def _export_matches(
    reference: transformers.PreTrainedModel, config, params, path: Path, **inputs
) -> None:
    """jaxgen -> HF: transformers reads the export with the original's exact weights and outputs."""
    hf.save(config, params, path)
    again, info = type(reference).from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    expected = reference.state_dict()
    for name, value in again.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(again.eval()(**inputs)[0], reference(**inputs)[0], rtol=0, atol=0)


def _long(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.long)


def test_bert_mlm_and_nsp_logits_match(bert_dir, tmp_path):
    path, reference = bert_dir
    config, params = hf.load(path)
    assert config.model.family == "bert" and config.model.layer_norm_eps == 1e-12
    batch = _bert_batch()
    inputs = dict(input_ids=_long(batch["input_ids"]), token_type_ids=_long(batch["segment_ids"]),
                  attention_mask=_long(batch["attention_mask"]))  # fmt: skip
    expected = reference(**inputs)
    module = models.build(config.model)
    out = jax.jit(module.apply)(
        {"params": params}, batch["input_ids"], batch["segment_ids"], batch["attention_mask"]
    )  # fmt: skip  (masked_positions=None)
    mlm = expected.prediction_logits.numpy()
    np.testing.assert_allclose(out["mlm_logits"], mlm, atol=ATOL, rtol=0)
    nsp = expected.seq_relationship_logits.numpy()
    np.testing.assert_allclose(out["nsp_logits"], nsp, atol=ATOL, rtol=0)
    _export_matches(reference, config, params, tmp_path / "export", **inputs)


def test_gpt_logits_and_greedy_generation_match(gpt_dir, tmp_path):
    path, reference = gpt_dir
    config, params = hf.load(path)
    module = models.build(config.model)
    ids = np.random.default_rng(1).integers(0, 99, (2, 12)).astype(np.int32)
    expected = reference(input_ids=_long(ids)).logits.numpy()
    logits = jax.jit(module.apply)({"params": params}, ids)
    np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=0)

    prompt = ids[:, :5]
    hf_tokens = reference.generate(
        _long(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
        max_new_tokens=20, do_sample=False, pad_token_id=0,
    ).numpy()  # fmt: skip
    tokens = sample.sample_gpt(module, params, prompt, max_new_tokens=20, temperature=0.0)
    assert hf_tokens.shape == (2, 25)
    np.testing.assert_array_equal(np.asarray(tokens), hf_tokens)
    _export_matches(reference, config, params, tmp_path / "export", input_ids=_long(ids))


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_t5_logits_and_greedy_generation_match(version, tmp_path):
    reference = t5_model(version)
    config, params = hf.load(save(reference, tmp_path / "hf"))
    assert config.model.feed_forward == ("gated-gelu" if version == "v1.1" else "relu")
    assert config.model.tie_embeddings == (version == "v1.0")
    module = models.build(config.model)
    rng = np.random.default_rng(2)
    enc = rng.integers(2, 99, (2, 9)).astype(np.int32)
    enc_mask = np.array([[1] * 9, [1] * 6 + [0] * 3], np.int32)
    enc[1, 6:] = 0
    dec = np.concatenate([np.zeros((2, 1)), rng.integers(2, 99, (2, 6))], 1).astype(np.int32)
    inputs = dict(
        input_ids=_long(enc), attention_mask=_long(enc_mask), decoder_input_ids=_long(dec)
    )
    expected = reference(**inputs).logits.numpy()
    logits = jax.jit(module.apply)({"params": params}, enc, dec, encoder_mask=enc_mask)
    np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=0)

    hf_tokens = reference.generate(
        _long(enc),
        attention_mask=_long(enc_mask),
        max_new_tokens=12,
        do_sample=False,
        use_cache=False,  # transformers' T5 cache breaks when the two stacks differ in depth
    ).numpy()[:, 1:]  # fmt: skip  (without the decoder start token)
    tokens = sample.decode_t5(module, params, enc, enc_mask, max_decode_len=12, decoder_start_id=0,
                              eos_id=1, pad_id=0, temperature=0.0)  # fmt: skip
    tokens = np.asarray(tokens)
    np.testing.assert_array_equal(tokens[:, : hf_tokens.shape[1]], hf_tokens)
    assert (tokens[:, hf_tokens.shape[1] :] == 0).all()  # HF stops once every row has ended
    _export_matches(reference, config, params, tmp_path / "export", **inputs)


def _tiny_model(family: str, **extra) -> dict:
    base = dict(family=family, vocab_size=99, num_layers=2, d_model=32, num_heads=4, head_dim=8,
                d_ff=37, max_len=64, dropout=0.1, attention_dropout=0.1)  # fmt: skip
    return dict(base, **extra)


ROUND_TRIP = {
    "bert": _tiny_model("bert"),
    "gpt": _tiny_model("gpt"),
    "t5-v1.0": _tiny_model("t5", feed_forward="relu", tie_embeddings=True),
    "t5-v1.1": _tiny_model("t5", feed_forward="gated-gelu", tie_embeddings=False,
                           num_decoder_layers=1),
}  # fmt: skip


def _random_params(model: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    shapes = hf.param_shapes(model)
    flat = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    return traverse_util.unflatten_dict(flat, sep="/")


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_round_trip_jaxgen_hf_jaxgen_is_bit_identical(name, tmp_path):
    model = ROUND_TRIP[name]
    params = _random_params(model, seed=len(name))
    hf.save(hf.full_config(model), params, tmp_path)
    config, loaded = hf.load(tmp_path)
    assert {k: getattr(config.model, k) for k in model} == model
    original, again = _flat(params), _flat(loaded)
    assert sorted(original) == sorted(again)
    for key, value in original.items():
        assert again[key].dtype == np.float32, key
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_base_models_and_torch_bin_load(bert_dir, gpt_dir, tmp_path):
    bert_path, bert = bert_dir
    full = _flat(hf.load(bert_path)[1])
    # BertModel (no heads, names without 'bert.'): encoder equal, heads initialised as jaxgen does.
    base = _flat(hf.load(save(bert.bert, tmp_path / "bert_base"))[1])
    assert sorted(base) == sorted(full)
    for key, value in full.items():
        if key.startswith(("mlm_", "nsp/")):
            assert base[key].shape == value.shape and base[key].dtype == np.float32, key
        else:
            np.testing.assert_array_equal(base[key], value, err_msg=key)
    np.testing.assert_array_equal(base["mlm_bias"], 0.0)

    gpt_path, gpt = gpt_dir
    _, gpt_full = hf.load(gpt_path)
    _, gpt_base = hf.load(save(gpt.transformer, tmp_path / "gpt_base"))
    jax.tree.map(np.testing.assert_array_equal, gpt_base, gpt_full)

    # pytorch_model.bin (torch.save of the state dict, tied tensors included twice).
    bin_dir = tmp_path / "bert_bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((bert_path / "config.json").read_text())
    torch.save(bert.state_dict(), bin_dir / "pytorch_model.bin")
    from_bin = _flat(hf.load(bin_dir)[1])
    for key, value in full.items():
        np.testing.assert_array_equal(from_bin[key], value, err_msg=key)


# ------------------------------------------------------------------------------------------ errors


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_unknown_architecture_lists_supported(bert_dir, tmp_path):
    path = _copy_dir(bert_dir[0], tmp_path / "m")
    _edit_config(path, architectures=["LlamaForCausalLM"], model_type="llama")
    supported = "BertForPreTraining.*GPT2LMHeadModel.*T5ForConditionalGeneration"
    with pytest.raises(hf.InteropError, match=f"LlamaForCausalLM.*supported: {supported}"):
        hf.load(path)


def test_missing_files_are_named(bert_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(hf.InteropError, match="config.json"):
        hf.load(tmp_path / "empty")
    path = _copy_dir(bert_dir[0], tmp_path / "no_weights")
    (path / "model.safetensors").unlink()
    with pytest.raises(hf.InteropError, match="model.safetensors or pytorch_model.bin"):
        hf.load(path)
    with pytest.raises(hf.InteropError, match="not a directory"):
        hf.load(tmp_path / "nowhere")


def test_shape_mismatch_names_parameter_and_both_shapes(bert_dir, tmp_path):
    path = _copy_dir(bert_dir[0], tmp_path / "m")
    _edit_config(path, intermediate_size=40)
    with pytest.raises(
        hf.InteropError,
        match=r"layers_0/mlp/wi/kernel.*intermediate\.dense\.weight.*\(37, 32\).*\(40, 32\)",
    ):
        hf.load(path)


def test_missing_tensor_and_unsupported_settings(bert_dir, tmp_path):
    path = _copy_dir(bert_dir[0], tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["bert.encoder.layer.1.output.dense.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        hf.InteropError,
        match="lacks 'bert.encoder.layer.1.output.dense.weight'.*layers_1/mlp/wo/kernel",
    ):
        hf.load(path)
    _edit_config(path, hidden_act="relu")
    with pytest.raises(hf.InteropError, match="hidden_act='relu'"):
        hf.load(path)


def _zeros(model: dict) -> dict:
    shapes = hf.param_shapes(model)
    return traverse_util.unflatten_dict(
        {k: np.zeros(v, np.float32) for k, v in shapes.items()}, sep="/"
    )


def test_save_checks_shapes_and_exportability(tmp_path):
    model = _tiny_model("gpt")
    params = _zeros(model)
    params["layers_1"]["mlp"]["wo"]["kernel"] = np.zeros((36, 32), np.float32)
    with pytest.raises(hf.InteropError, match=r"layers_1/mlp/wo/kernel.*\(36, 32\).*\(37, 32\)"):
        hf.save(model, params, tmp_path)
    gpt1 = dict(model, norm_position="post")
    with pytest.raises(hf.InteropError, match="norm_position"):
        hf.save(gpt1, _zeros(gpt1), tmp_path)


def test_t5_v11_with_tied_unscaled_head_gets_an_lm_head_copy(tmp_path):
    """transformers 5 ties a fresh v1.1 lm_head to shared without scaling: jaxgen keeps a copy."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=99, d_model=16, d_kv=4, d_ff=24, num_layers=1,
                                   num_heads=2, feed_forward_proj="gated-gelu",
                                   tie_word_embeddings=False)  # fmt: skip
    path = save(transformers.T5ForConditionalGeneration(config), tmp_path)
    model_config, params = hf.load(path)
    assert not model_config.model.tie_embeddings
    np.testing.assert_array_equal(params["lm_head"]["kernel"], params["token_embed"]["embedding"].T)


@pytest.mark.parametrize("num_labels", [3, 1], ids=["classifier", "regression"])
def test_bert_sequence_classifier_converts_with_its_logits(num_labels, tmp_path):
    """A HF BertForSequenceClassification gives jaxgen's classifier_logits, and exports back."""
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, num_labels=num_labels,
    )  # fmt: skip
    torch.manual_seed(3)
    reference = perturb(transformers.BertForSequenceClassification(config), 3)
    loaded, params = hf.load(save(reference, tmp_path / "hf"))
    assert loaded.model.num_labels == num_labels
    batch = _bert_batch()
    inputs = dict(input_ids=_long(batch["input_ids"]), token_type_ids=_long(batch["segment_ids"]),
                  attention_mask=_long(batch["attention_mask"]))  # fmt: skip
    out = jax.jit(models.build(loaded.model).apply)(
        {"params": params}, batch["input_ids"], batch["segment_ids"], batch["attention_mask"]
    )
    assert out["classifier_logits"].shape == (2, num_labels)
    np.testing.assert_allclose(out["classifier_logits"], reference(**inputs).logits.numpy(),
                               atol=ATOL, rtol=0)  # fmt: skip
    hf.save(loaded, params, tmp_path / "export")
    again, info = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path / "export", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # no MLM/NSP heads
    expected = reference.state_dict()
    for name, value in again.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    # The same weights; torch's kernels may order a 1-wide output's sum differently.
    torch.testing.assert_close(again.eval()(**inputs).logits, reference(**inputs).logits,
                               rtol=0, atol=1e-6)  # fmt: skip


def test_bert_question_answering_converts_with_its_span_logits(tmp_path):
    """A HF BertForQuestionAnswering gives jaxgen's span_logits (start, end), and exports back."""
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(4)
    reference = perturb(transformers.BertForQuestionAnswering(config), 4)
    loaded, params = hf.load(save(reference, tmp_path / "hf"))
    assert loaded.model.span_head and not loaded.model.num_labels
    batch = _bert_batch()
    inputs = dict(input_ids=_long(batch["input_ids"]), token_type_ids=_long(batch["segment_ids"]),
                  attention_mask=_long(batch["attention_mask"]))  # fmt: skip
    out = jax.jit(models.build(loaded.model).apply)(
        {"params": params}, batch["input_ids"], batch["segment_ids"], batch["attention_mask"]
    )
    expected = reference(**inputs)
    np.testing.assert_allclose(out["span_logits"][..., 0], expected.start_logits.numpy(),
                               atol=ATOL, rtol=0)  # fmt: skip
    np.testing.assert_allclose(out["span_logits"][..., 1], expected.end_logits.numpy(),
                               atol=ATOL, rtol=0)  # fmt: skip
    hf.save(loaded, params, tmp_path / "export")
    again, info = transformers.BertForQuestionAnswering.from_pretrained(
        tmp_path / "export", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for name, value in again.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[name], rtol=0, atol=0, msg=name)
