"""configs/{bert,gpt,t5}.py reproduce the published tables (issue 5): hyperparameters from the
config objects, parameter counts from `jax.eval_shape` of the real models (via jaxgen.catalog).

The expected numbers are typed here from the papers, independently of the config files.
"""

import dataclasses
import math

import pytest

from jaxgen import config as config_lib
from jaxgen import models, objectives
from jaxgen.tools import catalog


def load(family: str, arg: str):
    """A row through the real loader (validation included)."""
    return config_lib.load_config(f"configs/{family}.py:{arg}")


ALL_ROWS = [catalog.parse_name(name) for name in catalog.list_names()]
ROW_IDS = [f"{family}:{arg}" for family, arg in ALL_ROWS]

# --------------------------------------------------------------------------------------- every row


@pytest.mark.parametrize(("family", "arg"), ALL_ROWS, ids=ROW_IDS)
def test_every_row_validates_and_builds(family, arg):
    config = load(family, arg)
    assert config.model.family == family
    assert config.meta.name == f"configs/{family}.py:{arg}"
    assert isinstance(config.model, models.ModelConfig)
    assert config.model.num_heads * config.model.head_dim > 0


@pytest.mark.parametrize("family", objectives.FAMILIES)
def test_every_row_has_every_key(family):
    """Rows of a family share their keys, but for the optimizer's own (AdamW or Adafactor)."""
    module = catalog.load_family(family)
    optimizer_keys = {f"optim.{k}" for cls in config_lib.OPTIMIZERS.values() for k in cls.keys()}
    shared_optim = {f"optim.{k}" for k in config_lib.OptimConfig.keys()}
    key_sets = {}
    for arg in module.ROWS:
        config = module.get_config(arg)
        keys = set(config_lib.flat_keys(config))
        own = {k for k in keys if k in optimizer_keys - shared_optim}
        name = config.optim.name
        assert own == {f"optim.{k}" for k in config_lib.OPTIMIZERS[name].keys()} - shared_optim
        key_sets[arg] = keys - own
    reference = key_sets["smoke"]
    for arg, keys in key_sets.items():
        assert keys == reference, f"{family}:{arg} differs by {keys ^ reference}"
    assert {k.split(".")[0] for k in reference} == set(config_lib.SECTIONS)
    for key in ("published_params", "released_params", "hardware", "name"):
        assert f"meta.{key}" in reference


@pytest.mark.parametrize("family", objectives.FAMILIES)
def test_docstring_gives_the_command_and_unknown_rows_are_named(family):
    module = catalog.load_family(family)
    assert f"jaxgen train --config configs/{family}.py:" in module.__doc__
    with pytest.raises(ValueError, match="valid rows: smoke"):
        module.get_config("nope")
    assert module.get_config().meta.name.endswith(":smoke")


def test_overrides_reach_family_specific_keys():
    config = config_lib.load_config(
        "configs/gpt.py:gpt3-125m",
        ["--config.train.batch_ramp_tokens=1e9", "--config.model.sparse_attention=none"],
    )
    assert config.train.batch_ramp_tokens == 1_000_000_000
    assert config.model.sparse_attention == "none"
    config = config_lib.load_config("configs/t5.py:smoke", ["--config.data.noise_density=0.3"])
    assert config.data.noise_density == pytest.approx(0.3)


@pytest.mark.parametrize(("family", "arg"), [("bert", "smoke"), ("gpt", "smoke"), ("t5", "smoke")])
def test_smoke_rows_run_on_cpu(family, arg):
    # Values are tuned by whoever owns the smoke runs; only their nature is pinned here.
    config = load(family, arg)
    assert config.meta.hardware == "cpu" and config.model.attention == "xla"
    assert config.model.dtype == "float32" and config.data.corpus == "builtin"
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (-1, 1, 1)


# -------------------------------------------------------------------------------------------- BERT

# row: (layers, d_model, heads)  (Devlin et al. 2018; Turc et al. 2019 compact models)
BERT = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


@pytest.mark.parametrize("arg", list(BERT))
def test_bert_rows(arg):
    config = load("bert", arg)
    model, data, optim, train = config.model, config.data, config.optim, config.train
    layers, d_model, heads = BERT[arg]
    assert (model.num_layers, model.d_model, model.num_heads) == (layers, d_model, heads)
    assert model.head_dim == 64 and model.d_ff == 4 * d_model
    assert model.vocab_size == 30_522 and model.max_len == 512 and model.type_vocab_size == 2
    assert model.dropout == 0.1 and model.attention_dropout == 0.1
    assert data.tokenizer == "wordpiece" and data.mask_prob == 0.15 and data.random_next_prob == 0.5
    assert optim.name == "adamw" and optim.learning_rate == 1e-4
    assert (optim.b1, optim.b2, optim.weight_decay) == (0.9, 0.999, 0.01)
    assert (
        optim.schedule == "linear" and optim.warmup_steps == 10_000 and optim.final_lr_fraction == 0
    )
    assert optim.clip_norm == 1.0
    assert train.num_steps == 1_000_000
    if arg == "mini":  # the CPU benchmark row: 32 x 128 tokens, 20 predictions, one phase
        assert train.batch_size == 32 and data.seq_len == 128 and data.max_predictions == 20
        assert list(train.phases) == []
        return
    assert train.batch_size == 256 and data.seq_len == 512 and data.max_predictions == 80
    assert train.batch_size * data.seq_len == 131_072  # the paper's "128,000 tokens"
    phases = [dict(p) for p in train.phases]
    assert phases == [
        {"fraction": 0.9, "seq_len": 128, "max_predictions": 20},
        {"fraction": 0.1, "seq_len": 512, "max_predictions": 80},
    ]


def test_bert_large_fits_its_slice():
    config = load("bert", "large")
    assert config.meta.hardware == "v3-64" and config.model.dtype == "bfloat16"


# --------------------------------------------------------------------------------------------- GPT


def test_gpt1():
    config = load("gpt", "gpt1")
    model, optim, train = config.model, config.optim, config.train
    assert (model.num_layers, model.d_model, model.num_heads, model.d_ff) == (12, 768, 12, 3072)
    assert model.max_len == 512 and config.data.seq_len == 512 and model.norm_position == "post"
    assert model.vocab_size == 40_478  # 40,000 merges + 478 base symbols
    assert model.dropout == 0.1 and model.attention_dropout == 0.1
    assert optim.learning_rate == 2.5e-4 and optim.warmup_steps == 2000
    assert optim.schedule == "cosine" and optim.final_lr_fraction == 0.0
    assert optim.weight_decay == 0.01 and optim.name == "adamw"
    assert train.batch_size == 64
    assert config.meta.published_params == 117_000_000


GPT2 = {  # row: (layers, d_model, heads, paper count, released count)
    "gpt2-small": (12, 768, 12, 117e6, 124e6),
    "gpt2-medium": (24, 1024, 16, 345e6, 355e6),
    "gpt2-large": (36, 1280, 20, 762e6, 774e6),
    "gpt2-xl": (48, 1600, 25, 1542e6, 1558e6),
}


@pytest.mark.parametrize("arg", list(GPT2))
def test_gpt2_rows(arg):
    config = load("gpt", arg)
    model = config.model
    layers, d_model, heads, published, released = GPT2[arg]
    assert (model.num_layers, model.d_model, model.num_heads) == (layers, d_model, heads)
    assert model.head_dim * model.num_heads == d_model and model.d_ff == 4 * d_model
    assert model.max_len == 1024 and config.data.seq_len == 1024 and model.vocab_size == 50_257
    assert model.norm_position == "pre" and config.train.batch_size == 512
    assert config.meta.published_params == published
    assert config.meta.released_params == pytest.approx(released, rel=0.005)  # "124M" etc.


GPT3 = {  # Table 2.1: (params, layers, d_model, heads, head_dim, batch tokens, lr)
    "gpt3-125m": (125e6, 12, 768, 12, 64, 0.5e6, 6.0e-4),
    "gpt3-350m": (350e6, 24, 1024, 16, 64, 0.5e6, 3.0e-4),
    "gpt3-760m": (760e6, 24, 1536, 16, 96, 0.5e6, 2.5e-4),
    "gpt3-1.3b": (1.3e9, 24, 2048, 24, 128, 1e6, 2.0e-4),
    "gpt3-2.7b": (2.7e9, 32, 2560, 32, 80, 1e6, 1.6e-4),
    "gpt3-6.7b": (6.7e9, 32, 4096, 32, 128, 2e6, 1.2e-4),
    "gpt3-13b": (13.0e9, 40, 5140, 40, 128, 2e6, 1.0e-4),
    "gpt3-175b": (175.0e9, 96, 12288, 96, 128, 3.2e6, 0.6e-4),
}


@pytest.mark.parametrize("arg", list(GPT3))
def test_gpt3_rows(arg):
    config = load("gpt", arg)
    model, optim, train = config.model, config.optim, config.train
    params, layers, d_model, heads, head_dim, batch_tokens, lr = GPT3[arg]
    assert (model.num_layers, model.d_model, model.head_dim) == (layers, d_model, head_dim)
    # The printed table's heads are in the config: as the model's, or as `printed_num_heads` where
    # the row must differ (1.3B: 24 x 128 = 3072 != d_model 2048; see test_gpt3_1_3b_heads).
    assert config.meta.printed_num_heads == (heads if arg == "gpt3-1.3b" else 0)
    assert model.num_heads == (16 if arg == "gpt3-1.3b" else heads)
    assert model.d_ff == 4 * d_model and model.max_len == 2048 and config.data.seq_len == 2048
    assert model.vocab_size == 50_257 and model.norm_position == "pre"
    assert model.sparse_attention == "alternating"
    assert config.meta.published_params == params
    tokens = train.batch_size * 2048
    assert tokens == pytest.approx(batch_tokens, rel=0.05)  # 0.5M = 2^19 tokens, 3.2M = 1536 x 2048
    assert optim.learning_rate == pytest.approx(lr)
    assert (optim.b1, optim.b2, optim.eps, optim.clip_norm) == (0.9, 0.95, 1e-8, 1.0)
    assert optim.weight_decay == 0.1
    assert optim.schedule == "cosine" and optim.final_lr_fraction == 0.1
    assert optim.warmup_steps == math.ceil(375e6 / tokens)
    assert optim.decay_steps == math.ceil(260e9 / tokens)
    assert train.num_steps == math.ceil(300e9 / tokens)
    assert train.batch_ramp_start_tokens == 32_768
    assert 4e9 <= train.batch_ramp_tokens <= 12e9
    assert model.dtype == "bfloat16" and model.remat


def test_gpt3_1_3b_printed_heads_cannot_give_1_3b():
    """Table 2.1 prints 24 heads of 128 for d_model 2048: built as printed, the model misses the
    paper's own 1.3B by more than 3%, while the row's 16 heads of 128 land within it."""
    config = load("gpt", "gpt3-1.3b")
    printed = dataclasses.replace(config.model, num_heads=config.meta.printed_num_heads)
    as_printed = catalog.count_params(printed)
    assert as_printed == pytest.approx(1.52e9, rel=0.01)
    assert abs(as_printed / config.meta.published_params - 1) > 0.03
    assert catalog.count_params(config.model) == pytest.approx(1.3e9, rel=0.03)


def test_gpt3_ramp_grows_with_size():
    ramps = [load("gpt", arg).train.batch_ramp_tokens for arg in GPT3]
    assert ramps == sorted(ramps) and ramps[0] == 4e9 and ramps[-1] == 12e9


def test_gpt3_175b_on_v4_1024():
    config = load("gpt", "gpt3-175b")
    assert config.meta.hardware == "v4-1024"
    assert config.train.batch_size % (config.train.grad_accum * config.mesh.fsdp) == 0


def test_gpt_mini_benchmark_row():
    model, train = load("gpt", "mini").model, load("gpt", "mini").train
    assert (model.num_layers, model.d_model, model.num_heads, model.d_ff) == (4, 256, 4, 1024)
    assert load("gpt", "mini").data.seq_len == 128 and train.batch_size == 32


# ---------------------------------------------------------------------------------------------- T5

T5 = {  # row: (layers per stack, d_model, d_ff, heads, d_kv, published)
    "t5-small": (6, 512, 2048, 8, 64, 60e6),
    "t5-base": (12, 768, 3072, 12, 64, 220e6),
    "t5-large": (24, 1024, 4096, 16, 64, 770e6),
    "t5-3b": (24, 1024, 16384, 32, 128, 2.8e9),
    "t5-11b": (24, 1024, 65536, 128, 128, 11e9),
}
T5_11 = {  # T5.1.1 release: (layers per stack, d_model, d_ff, heads, d_kv)
    "t5.1.1-small": (8, 512, 1024, 6, 64),
    "t5.1.1-base": (12, 768, 2048, 12, 64),
    "t5.1.1-large": (24, 1024, 2816, 16, 64),
    "t5.1.1-xl": (24, 2048, 5120, 32, 64),
    "t5.1.1-xxl": (24, 4096, 10240, 64, 64),
}
RECIPES = {"": (128, 2**19), ",baseline": (128, 2**19), ",final": (2048, 1_000_000)}


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("row", [*T5, *T5_11])
def test_t5_rows(row, recipe):
    config = load("t5", row + recipe)
    model, data, optim, train = config.model, config.data, config.optim, config.train
    layers, d_model, d_ff, heads, d_kv = (T5 | T5_11)[row][:5]
    assert (model.num_layers, model.num_decoder_layers) == (layers, layers)
    assert (model.d_model, model.d_ff, model.num_heads, model.head_dim) == (
        d_model,
        d_ff,
        heads,
        d_kv,
    )
    assert model.vocab_size == 32_128
    assert (
        model.relative_attention_num_buckets == 32 and model.relative_attention_max_distance == 128
    )
    v11 = row in T5_11
    assert model.feed_forward == ("gated-gelu" if v11 else "relu")
    assert model.tie_embeddings is (not v11)
    assert model.dropout == 0.0 and model.attention_dropout == 0.0  # pretraining
    assert data.tokenizer == "sentencepiece" and data.seq_len == 512
    assert data.noise_density == 0.15 and data.mean_noise_span_length == 3.0
    assert optim.name == "adafactor" and optim.schedule == "rsqrt"
    assert optim.learning_rate == 0.01 and optim.warmup_steps == 10_000  # 1/sqrt(max(n, 10^4))
    assert optim.weight_decay == 0.0 and optim.clip_norm == 0.0
    # Adafactor as T5 ran it: factored, no momentum, decay 0.8, eps 1e-30, update clipping 1.0.
    assert (optim.decay_rate, optim.epsilon, optim.clipping_threshold) == (0.8, 1e-30, 1.0)
    assert optim.factored and optim.momentum == 0.0 and optim.multiply_by_parameter_scale
    assert (train.batch_size, train.num_steps) == RECIPES[recipe]
    assert config.meta.recipe == ("final" if recipe == ",final" else "baseline")
    if not v11:
        assert config.meta.published_params == T5[row][5]


def test_t5_recipe_tokens():
    base, final = load("t5", "t5-base"), load("t5", "t5-base,final")
    assert base.train.batch_size * base.data.seq_len == 2**16
    tokens = final.train.batch_size * final.data.seq_len * final.train.num_steps
    assert tokens == pytest.approx(1e12, rel=0.1)


def test_t5_decoder_length_follows_encoder():
    from jaxgen.objectives import span_corruption

    data = load("t5", "t5-base").data
    raw, decoder = span_corruption.input_and_target_lengths(
        data.seq_len, data.noise_density, data.mean_noise_span_length
    )
    assert (raw, decoder) == (568, 114)


def test_t5_bad_recipe():
    module = catalog.load_family("t5")
    with pytest.raises(ValueError, match="valid recipes: baseline, final"):
        module.get_config("t5-base,long")


def test_t5_mini_benchmark_row():
    config = load("t5", "mini")
    model = config.model
    assert (model.num_layers, model.num_decoder_layers, model.d_model) == (4, 4, 256)
    assert (model.num_heads, model.head_dim, model.d_ff) == (4, 64, 1024)
    assert config.data.seq_len == 128 and config.train.batch_size == 32


# -------------------------------------------------------------------------------- parameter counts

# Rows whose paper count is off from the released checkpoint (documented in the config files): their
# count is checked against the release to 1%, every other row against the paper to 3%.
PAPER_MISCOUNTED = {
    "configs/gpt.py:gpt2-small",
    "configs/t5.py:t5-large",
    "configs/t5.py:t5-large,final",
}


@pytest.mark.parametrize("name", catalog.list_names(), ids=ROW_IDS)
def test_parameter_count(name):
    config = catalog.load_run(name)
    params = catalog.count_params(config.model)  # jax.eval_shape of the real model, cached
    if config.meta.released_params:
        assert params == pytest.approx(config.meta.released_params, rel=0.01)
    if config.meta.published_params:
        within = abs(params / config.meta.published_params - 1) <= 0.03
        assert within != (name in PAPER_MISCOUNTED), (name, params, config.meta.published_params)
    else:
        assert config.meta.released_params or config.meta.hardware == "cpu", (
            "paper rows need a count"
        )


@pytest.mark.parametrize(
    "name",
    ["configs/bert.py:base", "configs/gpt.py:gpt3-125m", "configs/gpt.py:gpt1",
     "configs/t5.py:t5-small", "configs/t5.py:t5.1.1-small"],
)  # fmt: skip
def test_depth_extrapolation_equals_full_trace(name):
    model = catalog.load_run(name).model
    assert catalog.count_params(model) == catalog.count_params_full_depth(model)
