"""Reading and writing transformers-format Qwen3-VL checkpoint folders.

`from_pretrained` builds the model abstractly (no memory), then fills each parameter tensor by tensor: every
device reads only its own shard straight from the safetensors file (`get_slice`), so an 8B or 32B checkpoint
never has a whole copy in host memory. `save_pretrained` writes safetensors shards, the index and config.json in
the layout transformers loads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from axpo_jax.models.qwen3_vl.config import CheckpointError, Qwen3VLConfig
from axpo_jax.models.qwen3_vl.model import Qwen3VL
from axpo_jax.parallel.sharding import param_sharding

# the parameter dtypes a run's config may name ("" = float32: exact on the CPU, and what parity is checked in)
DTYPES = {"": jnp.float32, "float32": jnp.float32, "bfloat16": jnp.bfloat16}

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_GENERATION_FILE = "generation_config.json"
# the weight files this module and transformers write: a new save removes them first (see save_pretrained)
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def _param_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def abstract_model(config: Qwen3VLConfig, dtype=jnp.float32) -> Qwen3VL:
    """The model with ShapeDtypeStructs for parameters: shapes and names, no memory."""
    return nnx.eval_shape(lambda: Qwen3VL(config, dtype=dtype, rngs=nnx.Rngs(0)))


class SafetensorsFolder:
    """Maps tensor names to the safetensors file holding them; opens each file once."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index_path = os.path.join(self.path, _INDEX_FILE)
        if os.path.isfile(index_path) and os.path.isfile(os.path.join(self.path, _SINGLE_FILE)):
            # transformers loads the single file and ignores the index; which one is meant is only a guess
            raise CheckpointError(
                f"{self.path} holds both {_SINGLE_FILE} and {_INDEX_FILE} (two saves into one folder?): "
                f"remove the stale one"
            )
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    self.weight_map: dict[str, str] = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path} is not a valid safetensors index: {e!r}") from None
        elif os.path.isfile(os.path.join(self.path, _SINGLE_FILE)):
            self.weight_map = {name: _SINGLE_FILE for name in self._open(_SINGLE_FILE).keys()}
        else:
            raise CheckpointError(f"{self.path} has no {_SINGLE_FILE} or {_INDEX_FILE}: no weights to load")
        self._handles: dict[str, object] = {}

    def _open(self, filename: str):
        handle = getattr(self, "_handles", {}).get(filename)
        if handle is not None:
            return handle
        file_path = os.path.join(self.path, filename)
        if not os.path.isfile(file_path):
            raise CheckpointError(f"missing safetensors shard {file_path} (named by {_INDEX_FILE})")
        try:
            handle = safe_open(file_path, framework="numpy")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {file_path} (truncated or corrupt safetensors file?): {e}") from None
        if hasattr(self, "_handles"):
            self._handles[filename] = handle
        return handle

    def names(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.weight_map[name]).get_slice(name).get_shape())

    def read(self, name: str, index=()) -> np.ndarray:
        """The tensor `name`, or only the part `index` (a tuple of slices) of it."""
        filename = self.weight_map[name]
        try:
            return np.asarray(self._open(filename).get_slice(name)[index])
        except SafetensorError as e:
            raise CheckpointError(f"cannot read tensor {name} from {os.path.join(self.path, filename)}: {e}") from None


def dtype_named(name: str):
    """The parameter dtype `config.dtype` names (one of DTYPES)."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected float32 or bfloat16 ('' = float32)")
    return DTYPES[name]


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, mesh=None) -> Qwen3VL:
    """Loads a transformers Qwen3-VL checkpoint folder, placing each tensor on its sharding over `mesh`."""
    config = Qwen3VLConfig.from_pretrained(path)
    folder = SafetensorsFolder(path)
    graphdef, abstract_state = nnx.split(abstract_model(config, dtype))
    expected = {_param_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract_state))}

    available = folder.names()
    if config.tie_word_embeddings and "lm_head.weight" in available:
        _check_tied_head(folder, os.fspath(path))
        available.discard("lm_head.weight")  # some exporters write the tied copy too
    missing = sorted(set(expected) - available)
    unexpected = sorted(available - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{os.fspath(path)} does not match the Qwen3-VL layout of its config.json: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )

    np_dtype = np.dtype(jnp.dtype(dtype))

    def load(key_path, leaf):
        name = _param_name(key_path)
        shape = folder.shape(name)
        if shape != tuple(leaf.shape):
            raise CheckpointError(f"tensor {name} has shape {shape} in the checkpoint, config implies {leaf.shape}")
        sharding = param_sharding(name, shape, mesh)
        return jax.make_array_from_callback(
            shape, sharding, lambda index: folder.read(name, index).astype(np_dtype, copy=False)
        )

    loaded = jax.tree_util.tree_map_with_path(load, nnx.to_pure_dict(abstract_state))
    nnx.replace_by_pure_dict(abstract_state, loaded)
    return nnx.merge(graphdef, abstract_state)


def _check_tied_head(folder: SafetensorsFolder, path: str, rows_per_read: int = 8192) -> None:
    """A tied config's lm_head.weight must equal embed_tokens: transformers unties a head that differs and uses
    it. Refused rather than loaded untied: an untied model from a tied config.json would save back a config that
    transformers ties again. Compared in row blocks, so no whole [V, D] copy is held in host memory."""
    head, embed = "lm_head.weight", "model.language_model.embed_tokens.weight"
    if embed not in folder.names():
        return  # the layout check that follows names the missing tensor
    shape = folder.shape(head)
    blocks = [(slice(start, min(start + rows_per_read, shape[0])),) for start in range(0, shape[0], rows_per_read)]
    same = shape == folder.shape(embed) and all(
        np.array_equal(folder.read(head, block), folder.read(embed, block)) for block in blocks
    )
    if not same:
        raise CheckpointError(
            f"{path}: config.json has tie_word_embeddings=true but the checkpoint's {head} differs from {embed} "
            f"(its head is not tied to its embeddings): set tie_word_embeddings to false in config.json"
        )


def named_parameters(model: Qwen3VL) -> Iterator[tuple[str, jax.Array]]:
    """(transformers name, array) for every parameter, in a stable order."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(pure):
        yield _param_name(key_path), leaf


def _host_copy(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_pretrained(model: Qwen3VL, path: str | os.PathLike, *, max_shard_bytes: int = 4 << 30) -> None:
    """Writes config.json and safetensors shards (+ index when there are several) that transformers loads, and the
    source checkpoint's generation_config.json; the weight files of an earlier save into `path` are removed."""
    path = os.fspath(path)
    is_writer = jax.process_index() == 0
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    dtype_name = None
    for name, value in named_parameters(model):
        array = _host_copy(value)  # every process takes part in the gather; only process 0 writes
        if not is_writer:
            continue  # ... and only process 0 keeps the host copies: the others free each one at once
        dtype_name = dtype_name or str(jnp.dtype(array.dtype))
        if shard_bytes and shard_bytes + array.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = np.ascontiguousarray(array)
        shard_bytes += array.nbytes
    if not is_writer:
        return
    os.makedirs(path, exist_ok=True)
    # Weights of an earlier save would outlive this one (e.g. its shards next to a new single file, which
    # transformers prefers to the index), so the folder would load as two different models.
    for name in os.listdir(path):
        if _WEIGHT_FILE.fullmatch(name) and os.path.isfile(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    if model.config.generation_config is None:  # nor an earlier save's: the folder is this save's alone
        if os.path.isfile(os.path.join(path, _GENERATION_FILE)):
            os.remove(os.path.join(path, _GENERATION_FILE))
    else:
        # the source checkpoint's stop ids and sampling defaults, which transformers' generate reads from here
        with open(os.path.join(path, _GENERATION_FILE), "w") as f:
            json.dump(model.config.generation_config, f, indent=2, sort_keys=True)
    config = dict(model.config.hf_config)
    config.setdefault("architectures", ["Qwen3VLForConditionalGeneration"])
    config["dtype"] = dtype_name
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, _SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})
        total += sum(a.nbytes for a in shard.values())
    with open(os.path.join(path, _INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
