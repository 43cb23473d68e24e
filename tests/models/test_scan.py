"""`model.scan_layers` and `model.remat_policy`: a scanned model given the unrolled model's params
(stacked) gives the same loss and gradients, decodes the same tokens, shards its stacked params
on a `layers` axis, and every remat policy compiles and changes nothing but what is saved."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from jaxgen import models, parallel, sample
from jaxgen.config import ConfigError
from jaxgen.models import ModelConfig, scan
from tests.models.tiny_models import COMMON, F32_ATOL, config

B, T, V = 2, 8, COMMON["vocab_size"]
GPT3 = {"sparse_attention": "alternating", "local_window": 3, "num_layers": 4}
# name: (family, overrides); T5's stacks differ in depth so that each stack reads its own key.
VARIANTS = {
    "bert": ("bert", {}),
    "gpt": ("gpt", {}),
    "gpt-alternating": ("gpt", GPT3),
    "t5": ("t5", {"num_decoder_layers": 3, "feed_forward": "gated-gelu", "tie_embeddings": False}),
}


def _ids(seed: int, length: int = T) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, length), 2, V)


def _inputs(family: str) -> dict[str, jax.Array]:
    """Random ids with padding or packing, so masks and segment ids reach every layer."""
    ids = _ids(1)
    if family == "bert":
        mask = jnp.array([[1] * T, [1] * 5 + [0] * 3], jnp.int32)
        segments = jnp.array([[0] * 4 + [1] * 4] * B, jnp.int32)
        return {"input_ids": ids, "segment_ids": segments, "attention_mask": mask}
    if family == "gpt":
        segments = jnp.array([[1] * 5 + [2] * 3] * B, jnp.int32)
        positions = jnp.array([list(range(5)) + list(range(3))] * B, jnp.int32)
        return {"input_ids": ids, "positions": positions, "segment_ids": segments}
    enc_mask = jnp.array([[1] * T, [1] * 6 + [0] * 2], jnp.int32)
    return {"encoder_input_ids": ids, "decoder_input_ids": _ids(2, 5), "encoder_mask": enc_mask}


def _loss(module: nn.Module, family: str):
    """Jitted (params -> (loss, grads)): cross-entropy of every output against fixed targets."""
    inputs = _inputs(family)

    def loss(params: Any) -> jax.Array:
        out = module.apply({"params": params}, **inputs)
        logits = [out["mlm_logits"], out["nsp_logits"]] if family == "bert" else [out]
        total = 0.0
        for i, x in enumerate(logits):
            targets = jax.random.randint(jax.random.key(10 + i), x.shape[:-1], 0, x.shape[-1])
            logp = jax.nn.log_softmax(x.astype(jnp.float32))
            total += -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
        return total

    return jax.jit(jax.value_and_grad(loss))


def _params(cfg: ModelConfig) -> Any:
    """Unrolled params of `cfg`'s model (plain arrays)."""
    module = models.build(dataclasses.replace(cfg, scan_layers=False))
    inputs = _inputs(cfg.family)
    rng = jax.random.key(0, impl="unsafe_rbg")
    return nn.meta.unbox(jax.jit(lambda r: module.init(r, **inputs)["params"])(rng))


def _assert_grads_close(got: Any, want: Any) -> None:
    # One tolerance for the whole tree: some gradients (key biases) are zero up to roundoff.
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want))
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    for path, value in jax.tree_util.tree_flatten_with_path(got)[0]:
        np.testing.assert_allclose(
            value, flat_want[path], rtol=F32_ATOL, atol=F32_ATOL * scale, err_msg=str(path)
        )


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, Any]]:
    """Per variant: configs, params and (loss, grads) of the unrolled and the scanned model."""
    out = {}
    for name, (family, overrides) in VARIANTS.items():
        unrolled = config(family, **overrides)
        scanned = dataclasses.replace(unrolled, scan_layers=True)
        params = _params(unrolled)
        stacked = scan.stack_layers(params, scanned)
        out[name] = dict(
            family=family,
            unrolled=unrolled,
            scanned=scanned,
            params=params,
            stacked=stacked,
            want=_loss(models.build(unrolled), family)(params),
            got=_loss(models.build(scanned), family)(stacked),
        )
    return out


# ------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("name", list(VARIANTS))
def test_scanned_model_gives_the_unrolled_loss_and_gradients(runs, name):
    run = runs[name]
    (want_loss, want_grads), (got_loss, got_grads) = run["want"], run["got"]
    np.testing.assert_allclose(got_loss, want_loss, rtol=F32_ATOL)
    assert scan.is_stacked(got_grads, run["scanned"])
    _assert_grads_close(scan.unstack_layers(got_grads, run["scanned"]), want_grads)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_stacked_params_have_the_scanned_models_shapes(runs, name):
    run = runs[name]
    module = models.build(run["scanned"])
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), **_inputs(run["family"])))
    want = jax.tree.map(lambda x: x.shape, nn.meta.unbox(shapes["params"]))
    assert jax.tree.map(lambda x: x.shape, run["stacked"]) == want


def test_the_period_keeps_layer_order():
    """GPT-3's even layers are the pair's dense block, the odd ones its banded block."""
    cfg = config("gpt", **GPT3, scan_layers=True)
    params = {f"layers_{i}": {"w": np.full((3,), float(i))} for i in range(4)}
    stacked = scan.stack_layers({**params, "final_norm": {}}, cfg)
    np.testing.assert_array_equal(stacked["layers"]["dense"]["w"][:, 0], [0.0, 2.0])
    np.testing.assert_array_equal(stacked["layers"]["local"]["w"][:, 0], [1.0, 3.0])
    again = scan.unstack_layers(stacked, cfg)
    assert sorted(again) == ["final_norm", *sorted(params)]
    for key, value in params.items():
        np.testing.assert_array_equal(again[key]["w"], value["w"])


def test_layout_mismatches_are_named():
    cfg = config("t5", num_decoder_layers=3, scan_layers=True)
    layer = {"mlp": {"wo": {"kernel": np.zeros((4, 2))}}}
    params = {
        "encoder": {f"layers_{i}": layer for i in range(2)},
        "decoder": {f"layers_{i}": layer for i in range(2)},
    }
    with pytest.raises(scan.LayerLayoutError, match=r"of decoder: model.num_decoder_layers=3 .*"
                                                    "layers_2 is missing"):  # fmt: skip
        scan.stack_layers(params, cfg)
    with pytest.raises(scan.LayerLayoutError, match="no 'layers' entry .*unrolled layers_0"):
        scan.unstack_layers(params, cfg)
    encoder_only = dataclasses.replace(cfg, num_decoder_layers=2)
    stacked = scan.stack_layers(params, encoder_only)
    assert scan.match_layers(stacked, encoder_only) is stacked
    with pytest.raises(scan.LayerLayoutError, match="leading axis of 3"):
        scan.unstack_layers(stacked, cfg)
    with pytest.raises(TypeError, match="unbox"):
        boxed = nn.LogicallyPartitioned(np.zeros(2), ("embed",))
        scan.stack_layers({f"layers_{i}": {"w": boxed} for i in range(2)}, config("bert"))


def test_period_needs_a_multiple_of_its_length():
    cfg = config("gpt", **{**GPT3, "num_layers": 3}, scan_layers=True)
    with pytest.raises(scan.LayerLayoutError, match=r"model.num_layers must be a multiple of 2; "
                                                    "got 3"):  # fmt: skip
        models.build(cfg).init(jax.random.key(0), _ids(0))


# --------------------------------------------------------------------------------- sharding


def _unrolled_path(path: str) -> str:
    """The unrolled path of a stacked leaf's first layer (a period's k-th block: layer k)."""
    return (
        path.replace("layers/dense/", "layers_0/")
        .replace("layers/local/", "layers_1/")
        .replace("layers/", "layers_0/")
    )


@pytest.mark.parametrize("name", ["gpt-alternating", "t5"])
def test_stacked_params_carry_the_layers_axis_and_shard_like_one_layer(runs, name):
    run = runs[name]
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sizes = dict(mesh.shape)

    def specs(cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        module = models.build(cfg)
        init = lambda: module.init(jax.random.key(0), **_inputs(run["family"]))["params"]
        boxed = jax.eval_shape(init)
        flat = lambda tree: traverse_util.flatten_dict(tree, sep="/")
        names = flat(nn.get_partition_spec(boxed))
        return names, flat(parallel.logical_partition_specs(boxed, sizes)), flat(nn.unbox(boxed))

    names, scanned, shapes = specs(run["scanned"])
    _, unrolled, _ = specs(run["unrolled"])
    stacked = [path for path in scanned if "layers/" in path]
    period = len(run["scanned"].layer_period) or 1
    firsts = {p for p in unrolled if any(f"layers_{k}/" in p for k in range(period))}
    assert {_unrolled_path(path) for path in stacked} == firsts
    for path in stacked:
        assert names[path][0] == "layers", path
        # Nothing on the stacked axis; every other dimension shards as the layer it stacks.
        assert tuple(scanned[path]) == (None, *unrolled[_unrolled_path(path)]), path
        jax.sharding.NamedSharding(mesh, scanned[path]).shard_shape(shapes[path].shape)


def test_scanned_gradients_are_the_same_on_a_mesh(runs):
    """Sharded stacked params and the activation constraints inside the scan body compile."""
    run = runs["gpt-alternating"]
    mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    module = models.build(run["scanned"])
    with parallel.mesh_context(mesh):
        boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), **_inputs("gpt")))
        shardings = parallel.logical_shardings(boxed["params"], mesh)
        assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings))
        loss, grads = _loss(module, "gpt")(jax.device_put(run["stacked"], shardings))
    want_loss, want_grads = run["got"]
    np.testing.assert_allclose(loss, want_loss, rtol=F32_ATOL)
    _assert_grads_close(grads, want_grads)


# ------------------------------------------------------------------------------------ remat

POLICIES = list(scan.REMAT_POLICIES)


@pytest.mark.parametrize(
    ("name", "policy"),
    [("gpt-alternating", p) for p in POLICIES] + [("bert", "minimal"), ("t5", "minimal")],
)
def test_every_remat_policy_compiles_and_changes_no_number(runs, name, policy):
    run = runs[name]
    cfg = dataclasses.replace(run["scanned"], remat=True, remat_policy=policy)
    loss, grads = _loss(models.build(cfg), run["family"])(run["stacked"])
    want_loss, want_grads = run["got"]
    np.testing.assert_allclose(loss, want_loss, rtol=F32_ATOL)
    _assert_grads_close(grads, want_grads)


def _residuals(cfg: ModelConfig, capsys: pytest.CaptureFixture) -> list[str]:
    """What jax.checkpoint keeps of the model for its backward pass, one line per array."""
    module = models.build(cfg)
    ids = _ids(0)
    params = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), ids))["params"])
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(
        lambda p: jnp.sum(module.apply({"params": p}, ids)), params
    )
    return [
        line for line in capsys.readouterr().out.splitlines() if "from the argument" not in line
    ]


def test_policies_save_what_they_name(capsys):
    """`minimal` keeps the named projections (layers.py's tags), `full` only layer inputs."""
    cfg = config("gpt", remat=True)
    named = lambda lines: {n for line in lines for n in scan.PROJECTIONS if f"'{n}'" in line}
    assert named(_residuals(cfg, capsys)) == set()
    # mlp_wo's output feeds only the residual add: the backward pass never needs it.
    minimal = dataclasses.replace(cfg, remat_policy="minimal")
    assert named(_residuals(minimal, capsys)) == set(scan.PROJECTIONS) - {"mlp_wo"}
    # Scanned: the policy reaches the scan body (stacked residuals, one per saved array).
    counts = {
        policy: sum(
            "output of scan" in line
            for line in _residuals(
                dataclasses.replace(cfg, scan_layers=True, remat_policy=policy), capsys
            )
        )
        for policy in ("full", "minimal", "dots_saveable")
    }
    assert counts["full"] == 1  # the layer inputs
    assert counts["full"] < counts["minimal"] < counts["dots_saveable"], counts


def test_invalid_remat_policy_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match="model.remat_policy must be one of full, minimal, "
                                          "dots_with_no_batch_dims_saveable, dots_saveable; "
                                          "got 'some'"):  # fmt: skip
        config("gpt", remat=True, remat_policy="some")


# ----------------------------------------------------------------------------------- decode


def test_scanned_gpt_samples_the_unrolled_tokens(runs):
    """The KV cache is stacked like the params (variable_axes 'cache': 0)."""
    run = runs["gpt-alternating"]
    cfg = run["unrolled"]
    prompt = np.asarray(_ids(3, 5))
    got = sample.sample_gpt(
        models.build(dataclasses.replace(cfg, scan_layers=True)), run["stacked"], prompt,
        max_new_tokens=6, temperature=0.0,
    )  # fmt: skip
    want = sample.sample_gpt(
        models.build(cfg), run["params"], prompt, max_new_tokens=6, temperature=0.0
    )
    np.testing.assert_array_equal(got, want)


def test_scanned_t5_decodes_the_unrolled_tokens(runs):
    run = runs["t5"]
    enc = np.asarray(_ids(4))
    kwargs = dict(max_decode_len=6, eos_id=None, temperature=0.0)
    got = sample.decode_t5(models.build(run["scanned"]), run["stacked"], enc, **kwargs)
    want = sample.decode_t5(models.build(run["unrolled"]), run["params"], enc, **kwargs)
    np.testing.assert_array_equal(got, want)
