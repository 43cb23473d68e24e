"""The tiny model and data shapes that the end-to-end tests train (well under a second a step)."""

from __future__ import annotations

from jaxgen import config as config_lib

_SHAPES = [
    "model.d_model=32",
    "model.num_heads=2",
    "model.head_dim=16",
    "model.d_ff=64",
    "model.vocab_size=1000",
    "data.seq_len=32",
    # max_len = seq_len: sampling tests reach the context limit, and every tiny run of a family has
    # the same shapes, so the persistent compilation cache serves all test modules.
    "model.max_len=32",
    # 12 of the built-in corpus's 168 sections: fewer leave an eval of a few unusual paragraphs.
    "data.eval_fraction=0",
    "data.eval_documents=12",
    "train.batch_size=8",
    "train.eval_steps=1",
]

# `--config` overrides (without the `--config.` prefix) per family: one layer (per stack).
TINY = {
    "bert": ["model.num_layers=1", *_SHAPES, "data.max_predictions=5"],
    "gpt": ["model.num_layers=1", *_SHAPES],
    "t5": ["model.num_layers=1", "model.num_decoder_layers=1", *_SHAPES],
}


def tiny_shapes(family: str) -> list[str]:
    """The family's tiny overrides without the layer count (for sweeps over model.num_layers)."""
    return [o for o in TINY[family] if not o.startswith(("model.num_layers", "model.num_decoder"))]


def tiny_config(family: str, cache_dir: object, *extra: str) -> object:
    """The family's smoke config at tiny shapes: 6 steps, eval and checkpoint every 3."""
    overrides = TINY[family] + [
        f"data.cache_dir={cache_dir}",
        "train.num_steps=6",
        "train.log_every=1",
        "train.eval_every=3",
        "train.checkpoint_every=3",
        "optim.warmup_steps=2",
        *extra,
    ]
    return config_lib.load_config(f"configs/{family}.py:smoke", overrides)
