"""Mesh shapes from a config against the devices this process sees."""

import jax
import pytest

from axpo_jax.parallel.mesh import make_mesh, mesh_from_config


def test_a_shape_the_devices_cannot_hold_is_refused_even_on_one_device():
    devices = len(jax.devices())
    with pytest.raises(ValueError, match=f"needs {devices + 1} devices, have {devices}"):
        mesh_from_config({"data": 1, "fsdp": devices + 1, "tensor": 1})
    fitting = mesh_from_config({"data": 1, "fsdp": -1, "tensor": 1})
    if devices == 1:
        assert fitting is None  # one device: the unsharded code path
    else:
        assert fitting.shape["fsdp"] == devices


def test_minus_one_takes_the_devices_the_other_axes_leave():
    devices = len(jax.devices())
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": devices, "tensor": 1}
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 2})
