"""Train-step throughput and model FLOP utilisation of jaxgen, beside HuggingFace's PyTorch models.

    python experiments/bench_train_step.py                     # bert, gpt and t5 mini rows
    python experiments/bench_train_step.py --config configs/bert.py:mini --steps 10
    python experiments/bench_train_step.py --config configs/finetune.py:sst2@mini  # bert-cls

For each config it measures, in one process: the steady-state jitted train step (synthetic batches
of the real shapes), tokens/s, MFU = model FLOPs per step / (step time x measured matmul FLOP/s of
this device, and on TPU/GPU also x the published peak), the same step for the HuggingFace PyTorch
model of the same size with AdamW when `torch` and `transformers` are installed, and the data
pipeline alone (raw text to device-ready batches). The last line per family reads
`RESULT family=<f> tokens_per_sec=<n> peer_tokens_per_sec=<n|none> ratio=<x|none> mfu=<fraction>`.

A fine-tuning config (`configs/finetune.py:sst2@mini`, a default row: BERT-Mini sequence
classification, batch 32 x 128) is measured beside HF `BertForSequenceClassification` with the
same AdamW and clipping, and again with LoRA (rank 8 on query and value, the head trained): its
line is `RESULT family=bert-cls tokens_per_sec=<n> peer_tokens_per_sec=<n> ratio=<x>
lora_tokens_per_sec=<n> lora_vs_full=<x> optimizer_state_ratio=<x>` (full fine-tuning's optimizer
state bytes over LoRA's).

Like the `jaxgen` command, the script first re-executes itself with glibc malloc on transparent
huge pages (`jaxgen.host`; `JAXGEN_HOST_HUGEPAGES=0` turns it off); the PyTorch peer runs in the
same process, so both frameworks are measured with the same allocator.

Model FLOPs (stated so they can be checked): 6 x (matmul parameters) x (tokens they process) for
forward and backward, plus 12 x layers x (heads x head_dim) x (key length) per query token for
attention, counted in full for causal attention (not halved). BERT's MLM head (dense + vocabulary
projection) counts at the masked positions only; its encoder counts every layer at every token,
though jaxgen computes the last layer's queries, attention and MLP at the rows the heads read only
(so BERT's MFU is above what its step executes); embeddings lookups count 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import config as config_lib
from jaxgen import host, models, objectives, parallel
from jaxgen.train import optim
from jaxgen.train import step as step_lib

DEFAULT_CONFIGS = ("configs/bert.py:mini", "configs/gpt.py:mini", "configs/t5.py:mini",
                   "configs/finetune.py:sst2@mini")  # fmt: skip
LORA = ["lora.rank=8", "lora.alpha=16"]
# Published dense bf16 peaks, for MFU against the datasheet on accelerators.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "H100": 989e12,
    "H200": 989e12,
}


@dataclasses.dataclass
class Measurement:
    step_seconds: float
    tokens_per_step: int

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens_per_step / self.step_seconds


def matmul_flops_per_sec(n: int = 2048, repeats: int = 10) -> float:
    """Measured float32 FLOP/s of a large matmul on the default device (the MFU denominator)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def decoder_length(config: Any) -> int:
    """T5 target length for the config's encoder length (T5's random_spans_helper)."""
    return objectives.get("t5").sequence_lengths(config.data)["targets"]


def synthetic_batch(config: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch with the real keys and shapes of the config's objective (its synthetic_batch)."""
    objective = objectives.of_run(config)
    return objective.synthetic_batch(config.model, config.data, config.train.batch_size, rng)


def model_flops_per_step(config: Any) -> float:
    """Training FLOPs of one step by the formula in this file's docstring."""
    m, b, t = config.model, config.train.batch_size, config.data.seq_len
    d, attn, f, v = m.d_model, m.num_heads * m.head_dim, m.d_ff, m.vocab_size
    attn_params = 4 * d * attn
    if objectives.is_task(config):  # BERT classification: the encoder, pooler and classifier
        layer = attn_params + 2 * d * f
        return (
            6 * m.num_layers * layer * b * t
            + 12 * m.num_layers * attn * t * b * t
            + (6 * (d * d + d * m.num_labels) * b)
        )
    if m.family == "bert":
        layer = attn_params + 2 * d * f
        predictions = b * config.data.max_predictions
        return (
            6 * m.num_layers * layer * b * t
            + 12 * m.num_layers * attn * t * b * t
            + 6 * (d * d + d * v) * predictions
        )
    if m.family == "gpt":
        layer = attn_params + 2 * d * f
        return 6 * (m.num_layers * layer + d * v) * b * t + 12 * m.num_layers * attn * t * b * t
    td = decoder_length(config)
    ff = (3 if m.feed_forward == "gated-gelu" else 2) * d * f
    encoder = 6 * m.num_layers * (attn_params + ff) * b * t + 12 * m.num_layers * attn * t * b * t
    decoder = (
        6 * (m.num_decoder_layers * (2 * attn_params + ff) + d * v) * b * td
        + 12 * m.num_decoder_layers * attn * (td + t) * b * td
    )
    return encoder + decoder


def tokens_per_step(config: Any) -> int:
    """Tokens a step consumes: input tokens (encoder plus decoder for T5)."""
    b, t = config.train.batch_size, config.data.seq_len
    return b * (t + decoder_length(config)) if config.model.family == "t5" else b * t


def time_fn(fn, steps: int, warmup: int) -> float:
    """Median seconds per call after warmup calls (each call must block until done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_jaxgen(config: Any, steps: int, warmup: int) -> Measurement:
    """Steady-state seconds per jitted train step on the config's mesh."""
    mesh = parallel.make_mesh(config.mesh)
    module = models.build(config.model)
    objective = objectives.of_run(config)
    optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
    schedule = optim.make_schedule(config.optim, config.train.num_steps)
    batch = synthetic_batch(config, np.random.default_rng(0))
    state, shardings = step_lib.create_train_state(
        module, objective, optimizer, config.data, 0, mesh
    )
    train_step = step_lib.build_train_step(
        module, objective, optimizer, schedule, mesh, shardings,
        step_lib.StepOptions(grad_accum=config.train.grad_accum),
    )  # fmt: skip
    device_batch = parallel.global_batch(batch, mesh)
    holder = {"state": state}

    def run() -> None:
        holder["state"], metrics = train_step(holder["state"], device_batch)
        jax.block_until_ready(metrics["loss"])

    return Measurement(time_fn(run, steps, warmup), tokens_per_step(config))


def bench_fine_tuning(config: Any, steps: int, warmup: int) -> tuple[Measurement, int]:
    """(the train step's time, its optimizer state's bytes) of a fine-tuning config, with the
    trainer a run builds (LoRA's frozen base and adapters-only optimizer included)."""
    from jaxgen.train import loop

    mesh = parallel.make_mesh(config.mesh)
    trainer, state = loop.build_trainer(config, mesh)
    device_batch = parallel.global_batch(synthetic_batch(config, np.random.default_rng(0)), mesh)
    holder = {"state": state}

    def run() -> None:
        holder["state"], metrics = trainer.train_step(holder["state"], device_batch)
        jax.block_until_ready(metrics["loss"])

    opt_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state.opt_state))
    return Measurement(time_fn(run, steps, warmup), tokens_per_step(config)), opt_bytes


def bench_peer(config: Any, steps: int, warmup: int) -> Measurement | None:
    """The same step for HuggingFace's PyTorch model of the same size, or None without torch."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    m, b, t = config.model, config.train.batch_size, config.data.seq_len
    batch = synthetic_batch(config, np.random.default_rng(0))
    tensor = lambda key: torch.from_numpy(batch[key]).long()
    if objectives.is_task(config):
        model = transformers.BertForSequenceClassification(
            transformers.BertConfig(
                vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.num_layers,
                num_attention_heads=m.num_heads, intermediate_size=m.d_ff,
                max_position_embeddings=m.max_len, hidden_dropout_prob=m.dropout,
                attention_probs_dropout_prob=m.attention_dropout, num_labels=m.num_labels,
            )
        )  # fmt: skip
        inputs = dict(
            input_ids=tensor("input_ids"), token_type_ids=tensor("segment_ids"),
            attention_mask=tensor("attention_mask"), labels=tensor("label"),
        )  # fmt: skip
    elif m.family == "bert":
        model = transformers.BertForPreTraining(
            transformers.BertConfig(
                vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.num_layers,
                num_attention_heads=m.num_heads, intermediate_size=m.d_ff,
                max_position_embeddings=m.max_len, hidden_dropout_prob=m.dropout,
                attention_probs_dropout_prob=m.attention_dropout,
            )
        )  # fmt: skip
        labels = torch.full((b, t), -100, dtype=torch.long)
        labels.scatter_(1, tensor("masked_positions"), tensor("masked_ids"))
        inputs = dict(
            input_ids=tensor("input_ids"), token_type_ids=tensor("segment_ids"),
            attention_mask=tensor("attention_mask"), labels=labels,
            next_sentence_label=tensor("next_sentence_labels"),
        )  # fmt: skip
    elif m.family == "gpt":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=m.vocab_size, n_embd=m.d_model, n_layer=m.num_layers, n_head=m.num_heads,
                n_inner=m.d_ff, n_positions=m.max_len, resid_pdrop=m.dropout,
                embd_pdrop=m.dropout, attn_pdrop=m.attention_dropout,
            )
        )  # fmt: skip
        inputs = dict(input_ids=tensor("input_ids"), labels=tensor("input_ids"))
    else:
        model = transformers.T5ForConditionalGeneration(
            transformers.T5Config(
                vocab_size=m.vocab_size, d_model=m.d_model, d_kv=m.head_dim, d_ff=m.d_ff,
                num_layers=m.num_layers, num_decoder_layers=m.num_decoder_layers,
                num_heads=m.num_heads, dropout_rate=m.dropout,
                feed_forward_proj="gated-gelu" if m.feed_forward == "gated-gelu" else "relu",
                tie_word_embeddings=bool(m.tie_embeddings),
            )
        )  # fmt: skip
        inputs = dict(
            input_ids=tensor("encoder_input_ids"), attention_mask=tensor("encoder_mask"),
            decoder_input_ids=tensor("decoder_input_ids"), labels=tensor("decoder_target_ids"),
        )  # fmt: skip
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=config.optim.learning_rate, weight_decay=config.optim.weight_decay,
        eps=getattr(config.optim, "eps", 1e-8),
    )  # fmt: skip

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return Measurement(time_fn(run, steps, warmup), tokens_per_step(config))


def bench_pipeline(config: Any, batches: int) -> tuple[float, float]:
    """(examples/s, seconds to first batch) from raw text (trained tokenizer) to device batches."""
    from jaxgen.data.source import DataSource

    with tempfile.TemporaryDirectory() as tmp:
        run = config_lib.load_config(
            f"configs/{config.family}.py:mini", [f"data.cache_dir={os.path.join(tmp, 'cache')}"]
        )
        workdir = Path(tmp) / "run"
        workdir.mkdir()  # DataSource writes its tokenizer there
        source = DataSource(run, workdir)  # trains the tokenizer: not timed
        # Token arrays are cached per tokenizer; a fresh cache dir makes the timed part tokenize.
        source.cache_dir = Path(tmp) / "fresh-cache"
        mesh = parallel.make_mesh(run.mesh)
        start = time.perf_counter()
        iterator = source.dataset("train")
        jax.block_until_ready(parallel.global_batch(next(iterator), mesh))
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(batches):
            jax.block_until_ready(parallel.global_batch(next(iterator), mesh))
        steady = time.perf_counter() - start
    return batches * run.train.batch_size / steady, first


def report_fine_tuning(spec: str, args: argparse.Namespace, measured: float) -> str:
    """Prints a fine-tuning config's full and LoRA steps beside HF's; returns its RESULT line."""
    config = config_lib.load_config(spec)
    lora = config_lib.load_config(spec, LORA)
    full, full_bytes = bench_fine_tuning(config, args.steps, args.warmup)
    adapted, lora_bytes = bench_fine_tuning(lora, args.steps, args.warmup)
    peer = None if args.no_peer else bench_peer(config, args.steps, args.warmup)
    flops = model_flops_per_step(config)
    print(f"\n== {spec}: batch {config.train.batch_size} x seq {config.data.seq_len}, "
          f"{flops / 1e9:.1f} GFLOP/step, {config.model.num_labels} classes")  # fmt: skip
    print(f"jaxgen : {full.step_seconds * 1e3:8.1f} ms/step {full.tokens_per_sec:10.0f} tokens/s "
          f"MFU {flops / full.step_seconds / measured:.1%}, optimizer state "
          f"{full_bytes / 2**20:.1f} MiB")  # fmt: skip
    print(f"LoRA r8: {adapted.step_seconds * 1e3:8.1f} ms/step {adapted.tokens_per_sec:10.0f} "
          f"tokens/s, optimizer state {lora_bytes / 2**20:.2f} MiB "
          f"({full_bytes / lora_bytes:.0f}x smaller)")  # fmt: skip
    ratio = f"{full.tokens_per_sec / peer.tokens_per_sec:.2f}" if peer else "none"
    if peer:
        print(f"PyTorch: {peer.step_seconds * 1e3:8.1f} ms/step {peer.tokens_per_sec:10.0f} "
              f"tokens/s -> jaxgen is {ratio}x")  # fmt: skip
    return (
        f"RESULT family=bert-cls tokens_per_sec={full.tokens_per_sec:.0f} "
        f"peer_tokens_per_sec={f'{peer.tokens_per_sec:.0f}' if peer else 'none'} ratio={ratio} "
        f"lora_tokens_per_sec={adapted.tokens_per_sec:.0f} "
        f"lora_vs_full={adapted.tokens_per_sec / full.tokens_per_sec:.2f} "
        f"optimizer_state_ratio={full_bytes / lora_bytes:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", help="configs/<family>.py:<row> (repeatable)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--pipeline-batches", type=int, default=50)
    args = parser.parse_args()
    host.reexec_with_hugepages()  # as the `jaxgen` command does; the peer shares this process

    device = jax.devices()[0]
    measured = matmul_flops_per_sec()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in device.device_kind), None)
    print(
        f"device: {device.device_kind} x{jax.device_count()}  "
        f"matmul f32: {measured / 1e9:.0f} GFLOP/s"
    )
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    print(f"host malloc: GLIBC_TUNABLES={tunables or '(unset)'}, huge pages: {host.thp_mode()}")
    results = []
    for spec in args.config or DEFAULT_CONFIGS:
        config = config_lib.load_config(spec)
        if objectives.is_task(config):
            results.append(report_fine_tuning(spec, args, measured))
            continue
        family = config.model.family
        flops = model_flops_per_step(config)
        ours = bench_jaxgen(config, args.steps, args.warmup)
        peer = None if args.no_peer else bench_peer(config, args.steps, args.warmup)
        mfu = flops / ours.step_seconds / measured
        print(f"\n== {spec}: batch {config.train.batch_size} x seq {config.data.seq_len}, "
              f"{flops / 1e9:.1f} GFLOP/step")  # fmt: skip
        of_peak = f", {flops / ours.step_seconds / peak:.1%} of published peak" if peak else ""
        print(f"jaxgen : {ours.step_seconds * 1e3:8.1f} ms/step {ours.tokens_per_sec:10.0f} "
              f"tokens/s MFU {mfu:.1%} of measured matmul{of_peak}")  # fmt: skip
        if peer:
            print(f"PyTorch: {peer.step_seconds * 1e3:8.1f} ms/step {peer.tokens_per_sec:10.0f} "
                  "tokens/s "
                  f"-> jaxgen is {ours.tokens_per_sec / peer.tokens_per_sec:.2f}x")  # fmt: skip
        examples_per_sec, first = bench_pipeline(config, args.pipeline_batches)
        step_examples = config.train.batch_size / ours.step_seconds
        print(f"pipeline: {examples_per_sec:,.0f} examples/s (first batch after {first:.1f} s), "
              f"train step consumes {step_examples:,.0f}/s "
              f"-> headroom {examples_per_sec / step_examples:.1f}x")  # fmt: skip
        ratio = f"{ours.tokens_per_sec / peer.tokens_per_sec:.2f}" if peer else "none"
        results.append(
            f"RESULT family={family} tokens_per_sec={ours.tokens_per_sec:.0f} "
            f"peer_tokens_per_sec={f'{peer.tokens_per_sec:.0f}' if peer else 'none'} "
            f"ratio={ratio} mfu={mfu:.3f}"
        )
    print()
    for line in results:
        print(line)


if __name__ == "__main__":
    main()
