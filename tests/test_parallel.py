"""Mesh construction and the logical-axis sharding rules."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxgen import parallel


def test_mesh_shape_fills_the_minus_one_axis():
    assert parallel.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1)
    assert parallel.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)


@pytest.mark.parametrize(
    "mesh, match",
    [
        ({"data": 3, "fsdp": 1, "tensor": 1}, "3 devices but 8 are available"),
        ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one mesh axis"),
        ({"data": -1, "fsdp": 3, "tensor": 1}, "does not divide 8"),
    ],
)
def test_bad_mesh_shapes(mesh, match):
    with pytest.raises(ValueError, match=match):
        parallel.mesh_shape(mesh, 8)


def test_make_mesh_uses_every_device():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.devices.size == jax.device_count() == 8


def test_fit_spec_replicates_dimensions_an_axis_does_not_divide():
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    assert parallel.fit_spec(P("fsdp", "tensor"), (4, 6), sizes) == P("fsdp", "tensor")
    assert parallel.fit_spec(P("fsdp", "tensor"), (4, 3), sizes) == P("fsdp", None)
    assert parallel.fit_spec(P(("data", "fsdp")), (2,), sizes) == P("data")
    assert parallel.fit_spec(P("fsdp"), (), sizes) == P()
