"""The flash kernel compiled by the real TPU compiler (Mosaic) for compile-only TPU devices.

libtpu runs here without a TPU (`pip install '.[tpu-compile]'`): `get_topology_desc` gives
compile-only devices, and lowering under a mesh of them picks the Mosaic flavour. Interpret mode
(test_flash_attention.py) shows the kernel computes the right thing; this shows it fits: every
operand is a tile, so VMEM does not grow with length, and 128k tokens compile. The full matrix
(v3, v4, v5e, v5p, v6e x 512..131072 x head dims x dtypes x features) is
`experiments/compile_kernel.py`.
"""

from __future__ import annotations

import jax
import pytest
from jax.sharding import Mesh

from jaxgen import parallel
from tests.scripts import load_script

compile_kernel = load_script("compile_kernel")


@pytest.fixture(scope="module")
def v5e() -> Mesh:
    return compile_kernel.target_mesh("v5e")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(
    ("length", "feature"), [(32768, "features"), (131072, "plain"), (131072, "window")]
)
def test_long_sequences_compile_for_v5e(v5e: Mesh, length: int, feature: str, causal: bool):
    compiled = compile_kernel.compile_case(v5e, length, 128, "bfloat16", causal, feature)
    text = compiled.as_text()
    assert "jaxgen_flash_dkv" in text and "jaxgen_flash_dq" in text
    # HBM temporaries stay linear in length: a T x S float32 array alone would be 64 GiB at 128k.
    assert compiled.memory_analysis().temp_size_in_bytes < length * 2**13


def test_v3_compiles_with_float32_matmul_operands() -> None:
    mesh = compile_kernel.target_mesh("v3")
    with jax.set_mesh(mesh):
        assert parallel.tpu_generation() == "v3"
    compile_kernel.compile_case(mesh, 8192, 128, "bfloat16", True, "features")
