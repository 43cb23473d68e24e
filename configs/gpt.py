"""GPT causal-LM pretraining: GPT-1 (Radford et al. 2018), GPT-2 (2019), GPT-3 (Brown et al. 2020).

Run a row (the argument after ':' picks it; `smoke` when omitted):

    jaxgen train --config configs/gpt.py:gpt3-1.3b --workdir runs/gpt3-1.3b
    jaxgen train --config configs/gpt.py:smoke --workdir runs/gpt-smoke  # CPU, built-in corpus

Rows:
  smoke    2 layers, d_model 128, pre-LN, 512-token BPE: learns on the built-in corpus on 2 CPU
           cores (held-out loss > 40% below step 0 in 400 steps).
  mini     4 layers, d_model 256, GPT-2 vocabulary, 32 x 128 tokens: the CPU benchmark's row.
  gpt1     12 x 768, post-LN, context 512, 40,478 BPE tokens (40,000 merges + 478 base symbols).
  gpt2-*   small/medium/large/xl: pre-LN + final LayerNorm, context 1024, vocab 50,257, batch 512.
  gpt3-*   125m ... 175b, Table 2.1: context 2048, Adam(0.9, 0.95, 1e-8), clip 1.0, weight decay
           0.1, warmup over 375M tokens, cosine to 10% of peak over 260B tokens, 300B tokens in
           all, batch ramped from 32k tokens, dense and locally banded attention alternating.

Parameter counts come from `jax.eval_shape` of the model (`jaxgen configs list`). GPT-2: the
paper's 117M/345M/762M/1542M do not match its released checkpoints (124M/355M/774M/1558M: the same
architecture, tied embeddings, 1024 learned positions); the paper's figures are widely held to be
miscounted (117M is also GPT-1's count). These rows build the released architecture, so the count
matches `released_params` to < 0.01%; `published_params` keeps the paper's figure for the record.

Token budgets are converted to steps at the full batch (the ramp covers at most 12B of 300B
tokens). Values the papers do not state are marked "not published" below: they are our choice.
"""

import math
from pathlib import Path

import ml_collections

from jaxgen.config import load_python_file

common = load_python_file(Path(__file__).with_name("common.py"))

SEQ_GPT3 = 2048
# row: (num_layers, d_model, num_heads, head_dim, batch (sequences), lr, published, ramp tokens)
# Table 2.1 of Brown et al. 2020; batch 0.5M/1M/2M/3.2M tokens = 256/512/1024/1536 sequences of
# 2048. 13B: the paper prints d_model 5140 with 40 heads of 128 (= 5120); kept as printed, so the
# attention projections map 5140 -> 5120 -> 5140. 1.3B: the paper prints 24 heads of 128 (= 3072 !=
# d_model 2048), which would make 1.52B parameters, 17% over its own 1.3B; we keep d_model 2048 and
# head_dim 128 and use 16 heads (= 2048), giving 1.32B. Ramp: the paper says the batch grows
# linearly from 32k tokens over "the first 4-12 billion tokens, depending on the model size" without
# a per-model figure; we interpolate linearly in log(params).
GPT3 = {
    "gpt3-125m": (12, 768, 12, 64, 256, 6.0e-4, 125_000_000, 4_000_000_000),
    "gpt3-350m": (24, 1024, 16, 64, 256, 3.0e-4, 350_000_000, 5_000_000_000),
    "gpt3-760m": (24, 1536, 16, 96, 256, 2.5e-4, 760_000_000, 6_000_000_000),
    "gpt3-1.3b": (24, 2048, 16, 128, 512, 2.0e-4, 1_300_000_000, 6_500_000_000),
    "gpt3-2.7b": (32, 2560, 32, 80, 512, 1.6e-4, 2_700_000_000, 7_500_000_000),
    "gpt3-6.7b": (32, 4096, 32, 128, 1024, 1.2e-4, 6_700_000_000, 8_500_000_000),
    "gpt3-13b": (40, 5140, 40, 128, 1024, 1.0e-4, 13_000_000_000, 9_000_000_000),
    "gpt3-175b": (96, 12288, 96, 128, 1536, 0.6e-4, 175_000_000_000, 12_000_000_000),
}
# Table 2.1's head count for gpt3-1.3b, recorded as `printed_num_heads` (see above).
GPT3_1_3B_PRINTED_HEADS = 24
GPT3_WARMUP_TOKENS = 375_000_000
GPT3_DECAY_TOKENS = 260_000_000_000
GPT3_TOTAL_TOKENS = 300_000_000_000
GPT3_RAMP_START_TOKENS = 16 * SEQ_GPT3  # "32k tokens": 16 sequences of 2048 = 32,768

# row: (num_layers, d_model, num_heads, published (paper), released (checkpoint), lr)
# GPT-2's paper gives no optimizer settings ("learning rate manually tuned"); not published: the lr
# of the GPT-3 row of similar size, warmup 2,000 steps, cosine to 10%, 800k steps (~420B tokens at
# 512 x 1024).
GPT2 = {
    "gpt2-small": (12, 768, 12, 117_000_000, 124_439_808, 6.0e-4),
    "gpt2-medium": (24, 1024, 16, 345_000_000, 354_823_168, 3.0e-4),
    "gpt2-large": (36, 1280, 20, 762_000_000, 774_030_080, 2.5e-4),
    "gpt2-xl": (48, 1600, 25, 1_542_000_000, 1_557_611_200, 2.0e-4),
}

# GPT-1 trained 100 epochs over BooksCorpus and gives no step count; at ~800M words, ~1B BPE tokens
# (our estimate) and 64 x 512 = 32,768 tokens per update, that is ~3M updates.
BOOKSCORPUS_TOKENS_ESTIMATE = 1_000_000_000
GPT1_STEPS = round(100 * BOOKSCORPUS_TOKENS_ESTIMATE / (64 * 512))

# Hardware for the large rows (TPU v4: one JAX device per chip, 32 GiB HBM; "v4-N" has N/2 chips).
# Sized with the estimate `jaxgen configs show` prints: float32 params, grads and Adam moments
# sharded over fsdp x tensor, plus bfloat16 activations of one micro-batch (batch / (data * fsdp) /
# grad_accum sequences; with remat only each layer's input is kept, plus one layer's activations
# during its backward pass) and float32 logits; kept under 75% of HBM (tests/test_catalog.py).
# The embed dim must divide by fsdp to be sharded (5140 = 4 x 1285).
# row: (hardware, (data, fsdp, tensor), grad_accum, remat)
HARDWARE = {
    "gpt1": ("v3-8", (-1, 1, 1), 1, False),
    "gpt2-small": ("v3-32", (-1, 1, 1), 2, False),
    "gpt2-medium": ("v3-32", (-1, 1, 1), 2, True),
    "gpt2-large": ("v3-64", (-1, 4, 1), 2, True),
    "gpt2-xl": ("v3-128", (-1, 8, 1), 2, True),
    "gpt3-125m": ("v4-32", (-1, 1, 1), 2, True),
    "gpt3-350m": ("v4-32", (-1, 1, 1), 2, True),
    "gpt3-760m": ("v4-64", (-1, 4, 1), 2, True),
    "gpt3-1.3b": ("v4-128", (-1, 8, 1), 2, True),
    "gpt3-2.7b": ("v4-128", (-1, 16, 1), 2, True),
    "gpt3-6.7b": ("v4-256", (-1, 16, 4), 4, True),
    "gpt3-13b": ("v4-512", (-1, 4, 8), 4, True),
    "gpt3-175b": ("v4-1024", (1, 64, 8), 12, True),
}

ROWS = ["smoke", "mini", "gpt1", *GPT2, *GPT3]


def list_rows() -> list[str]:
    """The valid `get_config` arguments, in table order."""
    return list(ROWS)


def _base(arg: str) -> ml_collections.ConfigDict:
    """Every key of the schema, with the smoke row's values; rows overwrite what differs."""
    return common.config(
        meta=common.meta(name=f"configs/gpt.py:{arg}", hardware="cpu"),
        model=common.model(
            "gpt",
            # The built-in corpus has ~60k tokens: a 512-token byte-level BPE (256 bytes + 256
            # merges, close to nanoGPT's character-level smoke run) sees every row often.
            # Held-out loss after 200 steps (entries as documents): 40% below step 0 with 512
            # rows, 37% with 1024, 34% with 4096 (most rows rare; that run without dropout).
            vocab_size=512,
            num_layers=2,
            d_model=128,
            num_heads=2,
            head_dim=64,
            d_ff=512,
            max_len=128,
            dropout=0.1,
            attention_dropout=0.1,
            dtype="float32",  # compute dtype; parameters are always float32
            attention="xla",
            remat=False,
            remat_policy="full",  # what remat keeps: only each layer's input
            scan_layers=False,  # the CPU rows (2-4 layers) stay unrolled; _paper_scale scans
            layer_norm_eps=1e-5,
            init_std=0.02,
            norm_position="pre",
            sparse_attention="none",
            local_window=256,  # the band of sparse_attention='alternating'
        ),
        data=common.data(
            "gpt",
            corpus="builtin",
            tokenizer="bpe",
            vocab_path="",  # '' = train a byte-level BPE of model.vocab_size on the corpus
            lowercase=False,
            seq_len=128,
            eval_fraction=0.1,  # ~17 of the built-in corpus's 168 sections
            eval_documents=1,
            split_seed=0,  # picks the held-out documents; train.seed does not move them
            # GPT-2/3 pack documents separated by <|endoftext|> with no attention masking between
            # them.
            separate_documents=False,
        ),
        optim=common.optim(
            "adamw",
            learning_rate=1e-3,
            schedule="linear",
            warmup_steps=60,
            decay_steps=0,  # 0 = decay over train.num_steps
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
            # GPT-3's batch ramp: the global batch grows linearly from batch_ramp_start_tokens to
            # batch_size * seq_len over the first batch_ramp_tokens tokens (0 = no ramp).
            batch_ramp_tokens=0,
            batch_ramp_start_tokens=0,
        ),
        mesh=common.mesh(-1, 1, 1),
    )


def _paper_scale(config: ml_collections.ConfigDict, arg: str) -> None:
    """Settings shared by every published row: TPU hardware, bf16, longer logging intervals."""
    hardware, mesh, grad_accum, remat = HARDWARE[arg]
    config.meta.hardware = hardware
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    config.train.grad_accum = grad_accum
    config.model.remat = remat
    # One scanned layer (GPT-3: one (dense, local) pair) per compile instead of up to 96.
    config.model.scan_layers = True
    config.model.dtype = "bfloat16"
    config.model.attention = "auto"
    config.train.update(eval_every=10_000, eval_steps=100, log_every=100, checkpoint_every=10_000)
    # Held out: 0.1% of the documents of a web-scale corpus, at least 100.
    config.data.update(eval_fraction=0.001, eval_documents=100)


def get_config(arg: str = "smoke") -> ml_collections.ConfigDict:
    """The full config of one row (see the module docstring); every row has every key."""
    if arg not in ROWS:
        raise ValueError(f"unknown gpt row {arg!r}; valid rows: {', '.join(ROWS)}")
    config = _base(arg)
    model, optim, train = config.model, config.optim, config.train

    if arg == "mini":
        model.update(num_layers=4, d_model=256, num_heads=4, d_ff=1024, vocab_size=50_257)
        config.meta.paper = "CPU benchmark row (GPT-2 vocabulary)"

    elif arg == "gpt1":
        config.meta.paper = (
            "Radford et al. 2018, Improving Language Understanding by Generative Pre-Training"
        )
        config.meta.published_params = 117_000_000
        _paper_scale(config, arg)
        model.update(num_layers=12, d_model=768, num_heads=12, d_ff=3072, max_len=512)
        model.update(vocab_size=40_478, norm_position="post")
        config.data.update(
            seq_len=512, lowercase=True
        )  # the GPT-1 BPE was learnt on lower-cased text
        # Adam, max lr 2.5e-4, linear warmup from 0 over 2,000 updates, cosine annealing to 0;
        # modified L2 (decoupled) weight decay 0.01 on non-bias, non-gain weights. Betas/eps not
        # published.
        optim.update(
            learning_rate=2.5e-4, schedule="cosine", warmup_steps=2000, final_lr_fraction=0.0
        )
        optim.update(weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0)
        train.update(batch_size=64, num_steps=GPT1_STEPS)

    elif arg in GPT2:
        num_layers, d_model, num_heads, published, released, lr = GPT2[arg]
        config.meta.paper = (
            "Radford et al. 2019, Language Models are Unsupervised Multitask Learners"
        )
        config.meta.published_params, config.meta.released_params = published, released
        _paper_scale(config, arg)
        model.update(num_layers=num_layers, d_model=d_model, num_heads=num_heads, head_dim=64)
        model.update(d_ff=4 * d_model, max_len=1024, vocab_size=50_257, norm_position="pre")
        config.data.seq_len = 1024
        optim.update(learning_rate=lr, schedule="cosine", warmup_steps=2000, final_lr_fraction=0.1)
        optim.update(weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0)
        train.update(batch_size=512, num_steps=800_000)

    elif arg in GPT3:
        num_layers, d_model, num_heads, head_dim, batch, lr, published, ramp = GPT3[arg]
        config.meta.paper = "Brown et al. 2020, Language Models are Few-Shot Learners (Table 2.1)"
        config.meta.published_params = published
        _paper_scale(config, arg)
        model.update(num_layers=num_layers, d_model=d_model, num_heads=num_heads, head_dim=head_dim)
        if arg == "gpt3-1.3b":
            config.meta.printed_num_heads = GPT3_1_3B_PRINTED_HEADS
        model.update(d_ff=4 * d_model, max_len=SEQ_GPT3, vocab_size=50_257, norm_position="pre")
        # Not published: dropout (0, as is usual at this scale) and the band width (256 tokens).
        model.update(dropout=0.0, attention_dropout=0.0, sparse_attention="alternating")
        config.data.seq_len = SEQ_GPT3
        tokens_per_batch = batch * SEQ_GPT3
        optim.update(
            learning_rate=lr,
            schedule="cosine",
            warmup_steps=math.ceil(GPT3_WARMUP_TOKENS / tokens_per_batch),
            decay_steps=math.ceil(GPT3_DECAY_TOKENS / tokens_per_batch),
            final_lr_fraction=0.1,
            weight_decay=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            clip_norm=1.0,
        )
        train.update(batch_size=batch, num_steps=math.ceil(GPT3_TOTAL_TOKENS / tokens_per_batch))
        # Not published: how smoothly the batch grows; 8 stages compile 8 step shapes.
        train.update(batch_ramp_tokens=ramp, batch_ramp_start_tokens=GPT3_RAMP_START_TOKENS,
                     batch_ramp_stages=8)  # fmt: skip
    return config
