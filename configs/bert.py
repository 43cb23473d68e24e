"""BERT pretraining: masked LM + next-sentence prediction (Devlin et al. 2018, §3.1, App. A.2).

Run a row (the argument after ':' picks it; `smoke` when omitted):

    jaxgen train --config configs/bert.py:base --workdir runs/bert-base
    jaxgen train --config configs/bert.py:smoke --workdir runs/bert-smoke  # CPU, built-in corpus

Rows:
  smoke               2 layers, d_model 128: learns on the built-in corpus on 2 CPU cores.
  tiny, small, medium compact BERTs of Turc et al. 2019 (google-research/bert "BERT miniatures",
                      d_ff = 4 x d_model) with BERT's own recipe (the release gives no other).
  mini                compact BERT-Mini dims (4/256/4) with the CPU benchmark's batch: 32 x 128
                      tokens, 20 predictions each (experiments/bench_train_step.py uses it).
  base, large         the paper: batch 256, 1M steps, Adam 1e-4, 10k warmup then linear decay,
                      90% of steps at 128 tokens (20 predictions), then 10% at 512 (80).

Point `--config.data.corpus` at Wikipedia + BooksCorpus text (one sentence per line, blank line
between documents) to pretrain for real; the default is the built-in corpus, so every row starts
without a download.

`hardware` names the TPU slice that the row's mesh, dtype and remat were sized for; `jaxgen configs
show configs/bert.py:large` prints the per-device estimate (float32 params, grads and optimizer
state sharded by the mesh, plus activations of one micro-batch at the longest phase).
"""

from pathlib import Path

import ml_collections

from jaxgen.config import load_python_file

common = load_python_file(Path(__file__).with_name("common.py"))


PAPER = "Devlin et al. 2018, BERT: Pre-training of Deep Bidirectional Transformers"
BERT_VOCAB = 30_522  # uncased WordPiece vocabulary of the released checkpoints

# row: (num_layers, d_model, num_heads, published_params, hardware, mesh (data, fsdp, tensor))
# Published counts: the paper (110M, 340M) and the BERT-miniatures table (4.4M, 11.3M, 29.1M,
# 41.7M).
ROWS = {
    "smoke": (2, 128, 2, 0, "cpu", (-1, 1, 1)),
    "tiny": (2, 128, 2, 4_400_000, "v3-8", (-1, 1, 1)),
    "mini": (4, 256, 4, 11_300_000, "cpu", (-1, 1, 1)),
    "small": (4, 512, 8, 29_100_000, "v3-8", (-1, 1, 1)),
    "medium": (8, 512, 8, 41_700_000, "v3-8", (-1, 1, 1)),
    # The paper trained base on 4 Cloud TPUs (16 chips) and large on 16 (64 chips). On v3 a JAX
    # device is one TensorCore with 16 GiB. Pure data parallelism fits: large, 4 sequences of 512
    # per device, needs ~1.3 GiB of params, ~3.8 GiB of grads and Adam moments and ~1.7 GiB of
    # activations with flash attention (`jaxgen configs show configs/bert.py:large`).
    "base": (12, 768, 12, 110_000_000, "v3-16", (-1, 1, 1)),
    "large": (24, 1024, 16, 340_000_000, "v3-64", (-1, 1, 1)),
}

# BERT's two phases (Appendix A.2): 90% of the steps at 128 tokens, then 10% at 512 to learn the
# positions.
PAPER_PHASES = [
    {"fraction": 0.9, "seq_len": 128, "max_predictions": 20},
    {"fraction": 0.1, "seq_len": 512, "max_predictions": 80},
]


def list_rows() -> list[str]:
    """The valid `get_config` arguments, in table order."""
    return list(ROWS)


def get_config(arg: str = "smoke") -> ml_collections.ConfigDict:
    """The full config of one row (see the module docstring); every row has every key."""
    if arg not in ROWS:
        raise ValueError(f"unknown bert row {arg!r}; valid rows: {', '.join(ROWS)}")
    num_layers, d_model, num_heads, published, hardware, mesh = ROWS[arg]
    smoke = arg == "smoke"
    paper = arg not in ("smoke", "mini")
    cpu = hardware == "cpu"
    config = common.config(
        meta=common.meta(
            name=f"configs/bert.py:{arg}",
            paper=PAPER,
            published_params=published,
            hardware=hardware,
        ),  # fmt: skip
        model=common.model(
            "bert",
            vocab_size=BERT_VOCAB,
            num_layers=num_layers,
            d_model=d_model,
            num_heads=num_heads,
            head_dim=64,
            d_ff=4 * d_model,
            max_len=128 if smoke else 512,
            dropout=0.1,
            attention_dropout=0.1,
            # Parameters are always float32; activations in bfloat16 on accelerators.
            dtype="float32" if cpu else "bfloat16",
            attention="xla" if cpu else "auto",
            remat=False,
            remat_policy="full",  # what remat keeps: only each layer's input
            # The TPU rows compile one scanned layer for the whole stack; the CPU rows (2-4
            # layers) stay unrolled.
            scan_layers=not cpu,
            layer_norm_eps=1e-12,
            init_std=0.02,
            type_vocab_size=2,
        ),
        data=common.data(
            "bert",
            corpus="builtin",
            tokenizer="wordpiece",
            vocab_path="",  # '' = train a WordPiece vocabulary of model.vocab_size on the corpus
            lowercase=True,
            # The longest phase's shape; `train.phases` sets the shorter first phase.
            seq_len=512 if paper else 128,
            # Held out: 0.1% of the documents (~16 MB of a 16 GB corpus), at least 8.
            eval_fraction=0.001,
            eval_documents=8,
            split_seed=0,  # picks the held-out documents; train.seed does not move them
            mask_prob=0.15,
            max_predictions=80 if paper else 20,
            short_seq_prob=0.1,
            dupe_factor=10,  # create_pretraining_data.py's static masks per document
            dynamic_masking=smoke,  # the paper masked statically; smoke re-masks every epoch
            whole_word_masking=False,
            random_next_prob=0.5,
        ),
        optim=common.optim(
            "adamw",
            learning_rate=1e-3 if smoke else 1e-4,
            schedule="linear",
            warmup_steps=60 if smoke else 10_000,
            decay_steps=0,  # 0 = decay over train.num_steps
            final_lr_fraction=0.0,  # linear decay to 0
            weight_decay=0.01,  # not applied to LayerNorm gains and biases, as google-research/bert
            b1=0.9,
            b2=0.999,
            eps=1e-6,  # google-research/bert's AdamWeightDecayOptimizer
            clip_norm=1.0,
        ),
        train=common.train(
            batch_size=32 if cpu else 256,
            num_steps=600 if smoke else 1_000_000,
            grad_accum=1,
            eval_every=100 if smoke else 10_000,
            eval_steps=4 if smoke else 100,
            log_every=20 if smoke else 100,
            checkpoint_every=200 if smoke else 10_000,
            seed=0,
            phases=PAPER_PHASES if paper else [],
        ),
        mesh=common.mesh(*mesh),
    )
    if smoke:
        # Tuned to learn in under 5 minutes on 2 CPU cores. 64-token sequences in batches of 64 keep
        # the tokens per step of 32 x 128 but give NSP twice the labels per step. The vocabulary
        # keeps BERT's 30,522 rows although WordPiece finds only ~4,700 entries in this corpus, so
        # the step-0 loss is ln(30522) as for every BERT, and the unigram level is reached in ~250
        # steps; experiments/bert_baselines.py prints how far below unigram the run ends. Dropout
        # stays: without it the NSP head never leaves a constant answer on held-out documents.
        # 14% of the built-in corpus's documents held out (~24 of 168) give ~500 eval pairs; at
        # least 2, so that a corpus of a dozen documents still has NSP pairs to evaluate.
        config.data.update(seq_len=64, max_predictions=10, eval_fraction=0.14, eval_documents=2)
        config.optim.update(warmup_steps=50)
        config.train.update(batch_size=64, num_steps=500, eval_steps=8, log_every=50)
    return config
