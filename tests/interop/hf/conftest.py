"""Small random HF PyTorch models (BERT, GPT-2, T5 v1.0/v1.1) saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

VOCAB = 99
D_MODEL = 32
HEADS = 4
D_FF = 37  # deliberately not a multiple of anything, so a swapped axis cannot go unnoticed


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Adds noise to every parameter, so zero biases and unit gains cannot hide a wrong mapping."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)
    return model.eval()


def bert_model(seed: int = 0) -> transformers.BertForPreTraining:
    """A 2-layer BertForPreTraining (hidden 32, 4 heads, vocab 99), eval mode."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=D_FF, max_position_embeddings=64,
    )  # fmt: skip
    return perturb(transformers.BertForPreTraining(config), seed)


def gpt_model(seed: int = 0) -> transformers.GPT2LMHeadModel:
    """A 2-layer GPT2LMHeadModel (n_embd 32, 4 heads, vocab 99, 64 positions), eval mode."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=D_MODEL, n_layer=2, n_head=HEADS, n_inner=D_FF, n_positions=64,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return perturb(transformers.GPT2LMHeadModel(config), seed)


def t5_model(version: str, seed: int = 0) -> transformers.T5ForConditionalGeneration:
    """A small T5 v1.0 (relu, tied, scaled output) or v1.1 (gated-gelu, own lm_head, unscaled)."""
    torch.manual_seed(seed)
    v11 = version == "v1.1"
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=D_MODEL, d_kv=8, d_ff=D_FF, num_layers=2,
        num_decoder_layers=3 if v11 else 2, num_heads=HEADS,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu" if v11 else "relu", tie_word_embeddings=not v11,
        decoder_start_token_id=0,
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config)
    if v11:
        # transformers 5 ties lm_head even for v1.1; released v1.1 checkpoints have their own.
        gen = torch.Generator().manual_seed(seed + 1)
        head = torch.randn((VOCAB, D_MODEL), generator=gen) * D_MODEL**-0.5
        model.lm_head.weight = torch.nn.Parameter(head)
    return perturb(model, seed)


def save(model: transformers.PreTrainedModel, path: Path) -> Path:
    """save_pretrained into `path` (safetensors); returns it."""
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, transformers.PreTrainedModel]:
    model = bert_model()
    return save(model, tmp_path_factory.mktemp("hf_bert")), model


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, transformers.PreTrainedModel]:
    model = gpt_model()
    return save(model, tmp_path_factory.mktemp("hf_gpt")), model
