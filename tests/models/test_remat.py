"""`model.remat` recomputes activations in the backward pass, changing no outputs or gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import config as config_lib
from jaxgen import models

TINY = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.head_dim=16",
        "model.d_ff=64", "model.vocab_size=64"]  # fmt: skip


def inputs(family):
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 8)), jnp.int32)
    if family == "bert":
        return (ids, jnp.zeros_like(ids), jnp.ones_like(ids))
    if family == "gpt":
        return (ids,)
    return (ids, ids[:, :5])


@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
def test_remat_matches_plain(family):
    extra = ["model.num_decoder_layers=1"] if family == "t5" else []
    results = []
    for remat in (False, True):
        config = config_lib.load_config(
            f"configs/{family}.py:smoke", TINY + extra + [f"model.remat={remat}"]
        )
        module = models.build(config.model)
        args = inputs(family)
        params = module.init(jax.random.key(0), *args)

        def loss(p, module=module, args=args):
            out = module.apply(p, *args)
            out = out["mlm_logits"] if isinstance(out, dict) else out
            return jnp.sum(out**2)

        results.append(jax.value_and_grad(loss)(params))
    (l0, g0), (l1, g1) = results
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
