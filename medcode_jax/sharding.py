"""Mesh construction and logical-axis -> mesh-axis sharding of the training state.

Model code only names logical axes (parameter metadata `out_sharding`, DESIGN.md §3); the
config's rules table (`config.mesh.rules`) maps them to the mesh axes ("data", "fsdp",
"tensor"). State is born sharded: `eval_shape` -> shardings -> `jit(init, out_shardings=...)`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # documents are split over both data-parallel axes

Rules = Sequence[tuple[str, str | None]]


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replace the (at most one) -1 by the remaining devices; check the product."""
    shape = tuple(int(s) for s in shape)
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"config.mesh.shape {shape}: sizes must be positive, with at most one "
                         f"-1 meaning 'the remaining devices'")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"config.mesh.shape {shape}: {num_devices} devices do not divide by "
                             f"the fixed sizes (product {known})")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"config.mesh.shape {shape} needs {math.prod(shape)} devices, "
                         f"{num_devices} are available; use -1 for one axis to take the rest")
    return shape


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The device mesh, all axes Auto (JAX's Explicit default rejects ordinary einsums)."""
    if tuple(axis_names) != MESH_AXES:
        raise ValueError(f"config.mesh.axis_names must be {MESH_AXES}, got {tuple(axis_names)}")
    devices = list(devices) if devices is not None else jax.devices()
    sizes = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def _rules_dict(rules: Rules) -> dict[str, str | None]:
    table = {}
    for entry in rules:
        if len(entry) != 2:
            raise ValueError(f"config.mesh.rules entry {entry!r} must be (logical, mesh_axis)")
        logical, mesh_axis = entry
        if mesh_axis is not None and mesh_axis not in MESH_AXES:
            raise ValueError(f"config.mesh.rules maps {logical!r} to unknown mesh axis "
                             f"{mesh_axis!r}; use one of {MESH_AXES} or None")
        table[logical] = mesh_axis
    return table


def logical_to_mesh_spec(logical: P | Sequence[str | None], shape: Sequence[int],
                         mesh: jax.sharding.Mesh, rules: Rules) -> P:
    """Map one parameter's logical names to a mesh PartitionSpec.

    A mesh axis is used once per parameter (later dimensions asking for it stay replicated),
    axes of size 1 are dropped, and a dimension that the mesh axis does not divide stays
    replicated (logged) instead of failing deep inside XLA.
    """
    table = _rules_dict(rules)
    used: set[str] = set()
    out: list[str | None] = []
    for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no entry in config.mesh.rules "
                             f"({sorted(table)}); add ('{name}', None) or a mesh axis")
        axis = table[name]
        size = mesh.shape[axis] if axis is not None else 1
        if axis is None or axis in used or size == 1:
            out.append(None)
        elif dim % size:
            logging.warning("dimension %d (%s) does not divide by mesh axis %s=%d: replicated",
                            dim, name, axis, size)
            out.append(None)
        else:
            used.add(axis)
            out.append(axis)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def logical_to_mesh_sharding(abstract_state: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """NamedShardings for an (eval_shape'd) state whose Variables carry `out_sharding` names.

    Leaves without logical names (scalars, rng keys, optimiser counters) are replicated.
    """
    specs = nnx.get_partition_spec(abstract_state)

    def one(spec: Any, leaf: Any) -> NamedSharding:
        logical = spec if isinstance(spec, P) else P()
        return NamedSharding(mesh, logical_to_mesh_spec(logical, tuple(leaf.shape), mesh, rules))

    return jax.tree.map(one, specs, abstract_state, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Rows (documents) over ("data", "fsdp"); other dimensions replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_devices(mesh: jax.sharding.Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def create_sharded(init_fn: Callable[[], Any], mesh: jax.sharding.Mesh,
                   rules: Rules) -> tuple[Any, Any, Any]:
    """Run `init_fn` (no arguments, returns a pytree of nnx State) born sharded.

    Returns (state, shardings, abstract state). Model constructors run with eager sharding
    off, so the logical names are only metadata until the jit boundary applies `out_shardings`.
    """
    def init() -> Any:
        with nnx.use_eager_sharding(False):
            return init_fn()

    abstract = nnx.eval_shape(init)
    shardings = logical_to_mesh_sharding(abstract, mesh, rules)
    state = jax.jit(init, out_shardings=shardings)()
    return state, shardings, abstract


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: the restore target of a sharded checkpoint."""
    def one(a: Any, s: NamedSharding) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

    return jax.tree.map(one, abstract, shardings)


def per_device_bytes(tree: Any) -> dict[jax.Device, int]:
    """Bytes each device holds of `tree` (for the FSDP 1/N check and memory logging)."""
    out: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
