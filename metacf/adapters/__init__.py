"""Parameter-efficient adaptation: LoRA, soft prompts, freezing.

* LoRA (Hu et al. 2021): :func:`lora_init` builds low-rank adapters next to
  any params pytree (dense, conv and attention kernels), :func:`lora_merge`
  folds them into the weights, :func:`with_lora` wraps an ``apply_fn`` so
  that ``jax.grad`` w.r.t. the adapters trains them alone, :func:`lora_dense`
  is the unmerged dense layer. A kernel's layout, how many of its leading
  axes are input axes, is ``fan_in_axes=``: by default 1 for 2-D kernels and
  3 for 4-D (conv HWIO) ones, and any other rank raises; for flax attention
  (3-D ``DenseGeneral`` kernels: ``query``/``key``/``value`` ``[d_model,
  heads, head_dim]``, ``out`` ``[heads, head_dim, d_model]``) pass
  ``fan_in_axes=flax_fan_in_axes``. equinox's ``[out, in]`` weights are
  adapted transposed (recipe in :func:`lora_init`).
* Prompt tuning (Lester et al. 2021): :func:`soft_prompt_init` and
  :func:`prepend_prompt`; deep prompts (VPT-deep) are built from these inside
  a model.
* Freezing: :func:`freeze` wraps an optax optimizer so that only the
  ``trainable`` leaves move and hold optimizer state (built on
  ``optax.transforms.selective_transform``), :func:`trainable_labels` gives
  ``optax.partition`` labels, :func:`count_params` counts elements.

``targets=`` and ``trainable=`` take the one leaf-selection form of
:mod:`metacf.masks`: ``None``, a pytree of bools, a callable ``(path, leaf) ->
bool``, or a regex searched in the ``/``-joined path.

Examples:
  LoRA on a flax nnx model (for attention kernels, add
  ``fan_in_axes=metacf.adapters.flax_fan_in_axes``):

  >>> import jax
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import metacf
  >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
  ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
  >>> graphdef, params = nnx.split(model, nnx.Param)
  >>> apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)
  >>> lora_params = metacf.adapters.lora_init(
  ...     jax.random.key(0), params, rank=2)  # kernels, not biases
  >>> apply_lora = metacf.adapters.with_lora(apply_fn, alpha=4.0)
  >>> x, y = jnp.ones((3, 4)), jnp.zeros((3, 2))
  >>> loss = lambda lp, x, y: jnp.mean((apply_lora(params, lp, x) - y) ** 2)
  >>> grads = jax.grad(loss)(lora_params, x, y)
  >>> metacf.adapters.count_params(grads)   # (4 + 8) * 2 + (8 + 2) * 2
  44
"""

from metacf.adapters._freeze import count_params
from metacf.adapters._freeze import freeze
from metacf.adapters._freeze import trainable_labels
from metacf.adapters._layouts import flax_fan_in_axes
from metacf.adapters._lora import lora_dense
from metacf.adapters._lora import lora_init
from metacf.adapters._lora import lora_merge
from metacf.adapters._lora import with_lora
from metacf.adapters._prompts import prepend_prompt
from metacf.adapters._prompts import soft_prompt_init

__all__ = [
    'count_params',
    'flax_fan_in_axes',
    'freeze',
    'lora_dense',
    'lora_init',
    'lora_merge',
    'prepend_prompt',
    'soft_prompt_init',
    'trainable_labels',
    'with_lora',
]
