"""The policy to evaluate: a transformers-format Qwen3-VL folder, or the model parameters of an orbax checkpoint
written during training (`axpo_jax.train.checkpoints.Checkpointer`) on top of the folder it was trained from.

The folder always supplies the architecture (config.json) and the processor (tokenizer, chat template, image
processor). With an orbax directory the model is built abstractly from the config and its parameters are read
from the checkpoint only (no optimizer state, no second read of the folder's weights).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from axpo_jax.data.processor import load_processor
from axpo_jax.models import qwen3_vl
from axpo_jax.models.qwen3_vl.checkpoint import abstract_model, named_parameters
from axpo_jax.models.qwen3_vl.config import Qwen3VLConfig
from axpo_jax.parallel.sharding import param_sharding
from axpo_jax.train.checkpoints import restore_model_params


def load_policy(folder: str, *, orbax_dir: str = "", orbax_step: int | None = None, dtype=jnp.bfloat16,
                mesh=None, max_image_pixels: int = 0):
    """(model, processor, description): the folder's model, or with `orbax_dir` the parameters of its step
    `orbax_step` (None: the latest); `description` says which, for the results. `max_image_pixels` > 0: the
    processor's largest image area (`load_processor`)."""
    if not folder or not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"checkpoint folder {folder!r} has no config.json: it must be a transformers-format "
                                f"Qwen3-VL folder (for an orbax checkpoint, the folder it was trained from)")
    folder = os.path.abspath(folder)
    processor = load_processor(folder, max_image_pixels)
    if not orbax_dir:
        return qwen3_vl.from_pretrained(folder, dtype=dtype, mesh=mesh), processor, {"checkpoint": folder}
    graphdef, state = nnx.split(abstract_model(Qwen3VLConfig.from_pretrained(folder), dtype))
    # each parameter is restored straight onto the sharding from_pretrained would give it
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
    names = [name for name, _ in named_parameters(nnx.merge(graphdef, state))]  # the same (tree) order
    target = treedef.unflatten([jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                     sharding=param_sharding(name, leaf.shape, mesh))
                                for name, leaf in zip(names, leaves, strict=True)])
    step, params = restore_model_params(orbax_dir, target, step=orbax_step)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), processor, {"checkpoint": folder, "orbax_dir": os.path.abspath(orbax_dir),
                                                   "orbax_step": step}
