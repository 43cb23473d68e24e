"""T5 span-corruption pretraining (Raffel et al. 2019, §3.1, §3.7; T5.1.1 from the T5 release).

Run a row (the argument after ':' picks it; `smoke` when omitted), optionally with a recipe:

    jaxgen train --config configs/t5.py:t5-base --workdir runs/t5-base  # §3.1 baseline recipe
    jaxgen train --config configs/t5.py:t5-base,final --workdir runs/t5-base-final  # §3.7 recipe
    jaxgen train --config configs/t5.py:smoke --workdir runs/t5-smoke  # CPU, built-in corpus

Recipes, picked by the `,final` / `,baseline` suffix because one changes batch, steps and hardware
together (the `recipe` key only records which one built the config):
  baseline (default)  §3.1: 2^19 = 524,288 steps of 128 sequences x 512 tokens (2^16 tokens).
  final               §3.7: 1,000,000 steps of 2,048 x 512 tokens (~1T tokens).
Both: Adafactor, inverse square root schedule 1/sqrt(max(step, 10^4)) (learning_rate 0.01 held
for the first 10^4 steps), span corruption of 15% of tokens with mean span 3, encoder 512 and
decoder 114 tokens, SentencePiece vocabulary of 32,000 (32,128 rows with padding), dropout 0 in
pretraining (0.1 is for fine-tuning), as issue 5 states it. Note: the T5.1.1 release notes call
dropout-off pretraining new in 1.1, which suggests v1.0 pretrained with dropout 0.1.

Rows:
  smoke                  2+2 layers, d_model 128, vocabulary 1024: learns on the built-in corpus on
                         2 CPU cores (held-out loss > 40% below step 0 in 400 steps).
  mini                   4+4 layers, d_model 256, 32 x 128 tokens: the CPU benchmark's row.
  t5-small ... t5-11b    T5 v1.0: ReLU feed-forward, output projection tied to the embeddings.
  t5.1.1-small ... -xxl  T5.1.1: gated-GELU, untied output, no dropout in pretraining.

Parameter counts: the paper's "~770M" for T5-Large is 4% above its released checkpoint (737,668,096
with tied embeddings; 770M is the count with an untied output layer). Every v1.0 row matches its
released checkpoint (`released_params`, the HuggingFace tensor count) to < 0.01%. T5.1.1 has no
published counts, only its checkpoints'.
"""

from pathlib import Path

import ml_collections

from jaxgen.config import load_python_file

common = load_python_file(Path(__file__).with_name("common.py"))

PAPER = (
    "Raffel et al. 2019, Exploring the Limits of Transfer Learning with a Unified Text-to-Text "
    "Transformer"
)
T5_VOCAB = 32_128  # 32,000 SentencePiece pieces + 100 sentinels, padded to a multiple of 128

# row: (layers per stack, d_model, num_heads, head_dim, d_ff, published, released)
V10 = {
    "t5-small": (6, 512, 8, 64, 2048, 60_000_000, 60_506_624),
    "t5-base": (12, 768, 12, 64, 3072, 220_000_000, 222_903_552),
    "t5-large": (24, 1024, 16, 64, 4096, 770_000_000, 737_668_096),
    "t5-3b": (24, 1024, 32, 128, 16384, 2_800_000_000, 2_851_598_336),
    "t5-11b": (24, 1024, 128, 128, 65536, 11_000_000_000, 11_307_321_344),
}
V11 = {
    "t5.1.1-small": (8, 512, 6, 64, 1024, 0, 76_961_152),
    "t5.1.1-base": (12, 768, 12, 64, 2048, 0, 247_577_856),
    "t5.1.1-large": (24, 1024, 16, 64, 2816, 0, 783_150_080),
    "t5.1.1-xl": (24, 2048, 32, 64, 5120, 0, 2_849_757_184),
    "t5.1.1-xxl": (24, 4096, 64, 64, 10240, 0, 11_135_332_352),
}
RECIPES = {
    # recipe: (batch sequences, steps)
    "baseline": (128, 2**19),
    "final": (2048, 1_000_000),
}

# Hardware per (row size, recipe). TPU v3: one JAX device per TensorCore, 16 GiB; "v3-N" has N
# devices. Sized with the estimate `jaxgen configs show` prints: float32 params and grads plus
# Adafactor's factored statistics, sharded over fsdp x tensor, plus bfloat16 activations of one
# micro-batch (remat keeps only each layer's input) and float32 logits; kept under 75% of HBM.
# Memory only rules out smaller slices for 3B/11B (their float32 params and grads alone are 23/90
# GB); otherwise the slices are sized for step time, as the paper trained on TPU v3 pod slices.
# size: {recipe: (hardware, (data, fsdp, tensor), grad_accum, remat)}
HARDWARE = {
    "small": {"baseline": ("v3-8", (-1, 1, 1), 1, False), "final": ("v3-64", (-1, 1, 1), 2, False)},
    "base": {"baseline": ("v3-8", (-1, 1, 1), 1, False), "final": ("v3-128", (-1, 1, 1), 2, True)},
    "large": {"baseline": ("v3-32", (-1, 4, 1), 1, True), "final": ("v3-256", (-1, 8, 1), 2, True)},
    "3b": {"baseline": ("v3-64", (-1, 8, 2), 1, True), "final": ("v3-512", (-1, 16, 4), 2, True)},
    "11b": {
        "baseline": ("v3-128", (-1, 8, 16), 2, True),
        "final": ("v3-1024", (-1, 8, 16), 4, True),
    },
}
SIZE_OF = {
    "t5-small": "small", "t5-base": "base", "t5-large": "large", "t5-3b": "3b", "t5-11b": "11b",
    "t5.1.1-small": "small", "t5.1.1-base": "base", "t5.1.1-large": "large", "t5.1.1-xl": "3b",
    "t5.1.1-xxl": "11b",
}  # fmt: skip

ROWS = ["smoke", "mini", *V10, *V11]


def list_rows() -> list[str]:
    """The arguments `jaxgen configs list` shows: every row, and v1.0's §3.7 recipe."""
    return ["smoke", "mini", *[r for row in V10 for r in (row, f"{row},final")], *V11]


def _base(arg: str) -> ml_collections.ConfigDict:
    """Every key of the schema, with the smoke row's values; rows overwrite what differs."""
    return common.config(
        meta=common.meta(name=f"configs/t5.py:{arg}", recipe="baseline", hardware="cpu"),
        model=common.model(
            "t5",
            # The built-in corpus has ~60k tokens: 924 SentencePiece pieces + 100 sentinels are
            # each seen often. Held-out loss after 200 steps (entries as documents): 40% below
            # step 0 with 1024 rows, 37% with 4096 (most rows rare; that run without dropout).
            vocab_size=1024,
            num_layers=2,  # encoder layers
            num_decoder_layers=2,
            d_model=128,
            num_heads=2,
            head_dim=64,
            d_ff=512,
            max_len=128,  # no absolute positions in T5: the longest encoder input (data.seq_len)
            dropout=0.1,
            attention_dropout=0.1,
            dtype="float32",  # compute dtype; parameters are always float32
            attention="xla",
            remat=False,
            remat_policy="full",  # what remat keeps: only each layer's input
            # The CPU rows (2-4 layers per stack) stay unrolled; the TPU rows scan each stack.
            # Adafactor then runs per layer on the stacked leaves (jaxgen.train.optim.per_layer),
            # so scanning keeps the paper's per-matrix update clipping and parameter scale.
            scan_layers=False,
            layer_norm_eps=1e-6,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward="relu",
            tie_embeddings=True,
        ),
        data=common.data(
            "t5",
            corpus="builtin",
            tokenizer="sentencepiece",
            vocab_path="",  # '' = train a SentencePiece model (sentinels included)
            lowercase=False,
            seq_len=128,  # encoder length; the decoder length follows (T5's random_spans_helper)
            eval_fraction=0.1,  # ~17 of the built-in corpus's 168 sections
            eval_documents=1,
            split_seed=0,  # picks the held-out documents; train.seed does not move them
            noise_density=0.15,
            mean_noise_span_length=3.0,
        ),
        optim=common.optim(
            "adamw",
            learning_rate=1e-3,
            schedule="linear",
            warmup_steps=60,
            decay_steps=0,  # 0 = over train.num_steps
            final_lr_fraction=0.0,
            weight_decay=0.01,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            clip_norm=1.0,
        ),
        train=common.train(
            batch_size=32,
            num_steps=400,
            grad_accum=1,
            eval_every=100,
            eval_steps=4,
            log_every=20,
            checkpoint_every=200,
            seed=0,
        ),
        mesh=common.mesh(-1, 1, 1),
    )


def get_config(arg: str = "smoke") -> ml_collections.ConfigDict:
    """The full config of `row` or `row,recipe` (see the module docstring); rows share every key."""
    row, _, recipe = arg.partition(",")
    if row not in ROWS:
        raise ValueError(f"unknown t5 row {row!r}; valid rows: {', '.join(ROWS)}")
    if recipe and (recipe not in RECIPES or row in ("smoke", "mini")):
        valid = (
            "none (smoke and mini have one recipe)"
            if row in ("smoke", "mini")
            else ", ".join(RECIPES)
        )
        raise ValueError(f"unknown t5 recipe {recipe!r} for {row}; valid recipes: {valid}")
    recipe = recipe or "baseline"
    config = _base(arg)
    model = config.model

    if row == "mini":
        model.update(num_layers=4, num_decoder_layers=4, d_model=256, num_heads=4, d_ff=1024)
        model.vocab_size = T5_VOCAB
        config.meta.paper = "CPU benchmark row (T5 vocabulary)"
        return config
    if row == "smoke":
        return config

    v11 = row in V11
    num_layers, d_model, num_heads, head_dim, d_ff, published, released = (V11 if v11 else V10)[row]
    config.meta.paper = (
        "T5.1.1 release (google-research/text-to-text-transfer-transformer)" if v11 else PAPER
    )
    config.meta.recipe = recipe
    config.meta.published_params, config.meta.released_params = published, released
    model.update(num_layers=num_layers, num_decoder_layers=num_layers, d_model=d_model)
    model.update(
        num_heads=num_heads, head_dim=head_dim, d_ff=d_ff, vocab_size=T5_VOCAB, max_len=512
    )
    model.update(dropout=0.0, attention_dropout=0.0, dtype="bfloat16", attention="auto")
    model.update(feed_forward="gated-gelu" if v11 else "relu", tie_embeddings=not v11)
    model.scan_layers = True
    config.data.seq_len = 512
    # Adafactor with factored second moments, no momentum, decay rate 0.8, epsilon 1e-30 and update
    # clipping 1.0 instead of gradient clipping; lr 0.01 / sqrt(max(step, 10^4)) * sqrt(10^4) =
    # 1 / sqrt(max(step, 10^4)) from the schedule (Adafactor's relative step is not used); no
    # weight decay.
    config.optim = common.optim(
        "adafactor",
        learning_rate=0.01,
        schedule="rsqrt",
        warmup_steps=10_000,
        decay_steps=0,
        final_lr_fraction=0.0,
        weight_decay=0.0,
        clip_norm=0.0,
        decay_rate=0.8,
        epsilon=1e-30,
        clipping_threshold=1.0,
        factored=True,
        min_dim_size_to_factor=128,
        momentum=0.0,
        multiply_by_parameter_scale=True,
    )

    batch, steps = RECIPES[recipe]
    hardware, mesh, grad_accum, remat = HARDWARE[SIZE_OF[row]][recipe]
    config.meta.hardware = hardware
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    model.remat = remat
    config.train.update(batch_size=batch, num_steps=steps, grad_accum=grad_accum)
    config.train.update(eval_every=10_000, eval_steps=100, log_every=100, checkpoint_every=10_000)
    # Held out: 0.1% of the documents of a web-scale corpus, at least 100.
    config.data.update(eval_fraction=0.001, eval_documents=100)
    return config
