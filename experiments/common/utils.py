"""Training utilities shared by the experiments.

PRNG keys derived from names, batching with explicit randomness, input
jitter, optimiser updates that run under strict dtype promotion, a progress
bar that is quiet off a terminal, orbax checkpoints for resumable runs, and
result files. Nothing here is specific to a device: the same code runs on CPU
and GPU. The experiments' training loops go through
``loop.resumable_loop``, which is built on ``Checkpointer``; by hand, a
resumable loop reads:

  # Committed to a device like restored arrays, so train_step compiles once.
  state = jax.device_put(init_state(key), jax.devices()[0])
  with utils.Checkpointer(os.path.join(workdir, 'checkpoints', 'net')) as ckpt:
    start = 0
    if ckpt.latest_step is not None:
      state, meta = ckpt.restore(state)
      start = ckpt.latest_step
    for epoch in range(start, num_epochs):
      rng = utils.numpy_rng(jax.random.fold_in(data_key, epoch))
      for batch in utils.batches(arrays, batch_size, rng=rng):
        state = train_step(state, batch)
      ckpt.save(epoch + 1, state, {'epoch': epoch + 1})
"""

from collections.abc import Iterator, Mapping, Sequence
import datetime
import importlib
import json
import os
import platform
import sys
import tempfile
from typing import Any
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm


# ------------------------------------------------------------------- keys


def name_key(key: jax.Array, *parts: str | int,
             full_crc32: bool = False) -> jax.Array:
  """Folds names (by CRC32) and ints into ``key``, in order.

  Keys derived by name rather than by position: adding or removing a run,
  model or task leaves the keys of the others unchanged.

  Each string is folded in as its CRC32 (``zlib.crc32`` of its UTF-8 bytes)
  with the top bit cleared (``& 0x7FFFFFFF``), each int as itself, one
  ``jax.random.fold_in`` after the other. ``full_crc32=True`` folds the
  whole CRC32 instead (no mask), the derivation of ``maml_omniglot``,
  ``maml_sinusoid`` and ``distill_mnist``; ``forgetting`` and
  ``predict_forgetting`` use the default. The two differ for names whose
  CRC32 is >= 2**31, so each study keeps its own to keep its numbers.

  Args:
    key: A typed PRNG key, or an array of them (e.g. one per seed, ``[S]``):
      every key gets the same parts.
    *parts: Names and non-negative ints (< 2**32).
    full_crc32: Fold the whole CRC32 of each name (see above).

  Returns:
    Keys of the shape of ``key``.

  Raises:
    ValueError: on an int part outside ``[0, 2**32)``.
  """
  mask = 0xFFFFFFFF if full_crc32 else 0x7FFFFFFF
  data = []
  for part in parts:
    if isinstance(part, str):
      data.append(zlib.crc32(part.encode()) & mask)
    elif not 0 <= part < 2**32:
      raise ValueError(
          f'name_key: int parts must be in [0, 2**32), got {part}.')
    else:
      data.append(int(part))
  if not data:
    return key
  return _fold_in_all(key, jnp.asarray(np.asarray(data, np.uint32)))


@jax.jit
def _fold_in_all(key: jax.Array, data: jax.Array) -> jax.Array:
  def fold_one(k):
    for i in range(data.shape[0]):
      k = jax.random.fold_in(k, data[i])
    return k

  fold = fold_one
  for _ in range(key.ndim):
    fold = jax.vmap(fold)
  return fold(key)


# ------------------------------------------------------------------ batching


def numpy_rng(key: jax.Array) -> np.random.Generator:
  """Returns a numpy Generator seeded from a JAX PRNG key.

  Host-side randomness (shuffling) then follows the experiment's key tree:
  ``numpy_rng(jax.random.fold_in(key, epoch))`` is reproducible per epoch.

  Args:
    key: A typed JAX PRNG key (``jax.random.key``), shape ``()``.
  """
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())


def num_batches(num_examples: int, batch_size: int, *,
                drop_remainder: bool = True) -> int:
  """Number of batches ``batches`` yields for ``num_examples`` examples."""
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


def batches(arrays: Mapping[str, np.ndarray], batch_size: int, *,
            rng: np.random.Generator | None = None,
            drop_remainder: bool = True,
            max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Yields dicts of fixed-size batches taken along the leading axis.

  Args:
    arrays: Arrays with the same leading dimension ``num_examples``.
    batch_size: Examples per batch.
    rng: If given, examples are visited in ``rng.permutation`` order;
      otherwise in order.
    drop_remainder: Drop the last partial batch, so every batch has exactly
      ``batch_size`` examples (one compiled step). If False the last batch is
      smaller; use ``padded_batches`` for fixed shapes instead.
    max_batches: Stop after this many batches (None: one full pass).

  Yields:
    ``{name: array[batch_size, ...]}`` for each name in ``arrays``.

  Raises:
    ValueError: if the arrays disagree on ``num_examples`` or
      ``batch_size < 1``.
  """
  num_examples = _num_examples(arrays, 'batches')
  if batch_size < 1:
    raise ValueError(f'batches: batch_size must be >= 1, got {batch_size}.')
  order = (np.arange(num_examples) if rng is None
           else rng.permutation(num_examples))
  count = num_batches(num_examples, batch_size, drop_remainder=drop_remainder)
  if max_batches is not None:
    count = min(count, max_batches)
  for i in range(count):
    idx = order[i * batch_size:(i + 1) * batch_size]
    yield {name: a[idx] for name, a in arrays.items()}


def padded_batches(arrays: Mapping[str, np.ndarray], batch_size: int
                   ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
  """Yields every example once, in order, in batches of exactly ``batch_size``.

  The last batch is padded with zeros, so a jitted evaluation compiles once.

  Args:
    arrays: Arrays with the same leading dimension ``num_examples``.
    batch_size: Examples per batch.

  Yields:
    ``(batch, mask)``: ``batch`` as in ``batches``; ``mask`` is a bool array
    ``[batch_size]``, False on padding.
  """
  num_examples = _num_examples(arrays, 'padded_batches')
  for start in range(0, num_examples, batch_size):
    stop = min(start + batch_size, num_examples)
    pad = batch_size - (stop - start)
    batch = {
        name: np.concatenate([a[start:stop],
                              np.zeros((pad,) + a.shape[1:], a.dtype)])
        for name, a in arrays.items()
    }
    mask = np.arange(batch_size) < stop - start
    yield batch, mask


def _num_examples(arrays: Mapping[str, np.ndarray], fn: str) -> int:
  sizes = {name: len(a) for name, a in arrays.items()}
  if not sizes or len(set(sizes.values())) != 1:
    raise ValueError(
        f'{fn}: arrays must be non-empty with one leading dimension, got '
        f'{sizes}.')
  return next(iter(sizes.values()))


def random_translate(key: jax.Array, images: jax.typing.ArrayLike,
                     max_shift: int) -> jax.Array:
  """Shifts each image by its own random offset, filling with zeros.

  Offsets are drawn uniformly from ``{-max_shift, ..., max_shift}`` for each
  axis independently ("jittered by up to two pixels in any direction",
  Hinton et al. 2015, with ``max_shift=2``).

  Args:
    key: PRNG key.
    images: ``[batch, height, width, channels]``.
    max_shift: Largest shift in pixels (static).

  Returns:
    Shifted images, same shape and dtype as ``images``.
  """
  images = jnp.asarray(images)
  if max_shift == 0:
    return images
  batch, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (max_shift, max_shift),
                            (max_shift, max_shift), (0, 0)))
  offsets = jax.random.randint(key, (batch, 2), 0, 2 * max_shift + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(
        image, (offset[0], offset[1], jnp.zeros([], offset.dtype)),
        (height, width, channels))

  return jax.vmap(crop)(padded, offsets)


# ------------------------------------------------------------- optimisers


def optimizer_update(optimizer: optax.GradientTransformation, grads: Any,
                     opt_state: optax.OptState, params: Any = None
                     ) -> tuple[Any, optax.OptState]:
  """``optimizer.update(grads, opt_state, params)`` under standard promotion.

  Our tests run under ``jax_numpy_dtype_promotion='strict'``
  (``tests/conftest.py``), where optax's Adam fails: ``scale_by_adam``
  bias-corrects with ``optax.tree.bias_correction``, which computes
  ``1 - decay**count``, a Python float to the power of the int32 step count
  (``optax/tree_utils/_tree_math.py`` in optax 0.2.8), and strict promotion
  has no float ** int32 rule::

    jax.dtypes.TypePromotionError: Input dtypes ("<class 'float'>", 'int32')
    have no available implicit dtype promotion path when
    jax_numpy_dtype_promotion=strict. Try explicitly casting inputs to the
    desired output type, or set jax_numpy_dtype_promotion=standard.

  A schedule fails the same way (``optax.cosine_decay_schedule`` starts
  with ``jnp.minimum(count, decay_steps)``: int32 count, float steps). Only
  the update is traced under standard promotion; the loss and its gradients
  stay under the caller's setting. Under standard promotion (the
  experiments' ``main.py``) this changes nothing, and under strict promotion
  nothing that strict promotion would not reject: the numbers are the same
  either way. (``metacf.maml.make_meta_train_step`` does the same for its
  optimisers.)

  Returns:
    ``(updates, opt_state)``, as ``optimizer.update``.
  """
  with jax.numpy_dtype_promotion('standard'):
    return optimizer.update(grads, opt_state, params)


# ------------------------------------------------------------ progress bars


def progress_bar(*, total: int, desc: str, initial: int = 0,
                 enabled: bool = True) -> tqdm.tqdm:
  """Returns a tqdm bar, disabled when ``enabled`` is False or off a TTY.

  A disabled bar still accepts ``update``/``set_postfix``/``close``, so the
  training loop needs no branches.

  Args:
    total: Number of steps.
    desc: Label shown left of the bar.
    initial: Steps already done (for a resumed run).
    enabled: Set False to silence the bar (e.g. in tests).
  """
  disable = not enabled or not sys.stderr.isatty()
  return tqdm.tqdm(total=total, desc=desc, initial=initial, disable=disable,
                   dynamic_ncols=True, leave=True)


# ------------------------------------------------------------- checkpoints


class Checkpointer:
  """Numbered checkpoints of one pytree plus JSON metadata, via orbax.

  Saves are synchronous (a step is on disk when ``save`` returns) and atomic
  (orbax writes to a temporary directory and renames it), so a run killed at
  any point resumes from its last complete step.

  Attributes:
    directory: Absolute path of the checkpoint directory.
  """

  def __init__(self, directory: str | os.PathLike[str], *,
               max_to_keep: int | None = 2):
    """Opens (and creates) a checkpoint directory.

    Args:
      directory: Where the numbered step directories go.
      max_to_keep: How many most recent steps to keep (None: all).
    """
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  @property
  def latest_step(self) -> int | None:
    """The newest complete step, or None if there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All complete steps on disk, in increasing order."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, metadata: Mapping[str, Any]) -> None:
    """Writes ``state`` (a pytree of arrays) and JSON ``metadata`` as ``step``.

    Args:
      step: Step number, e.g. epochs completed.
      state: Pytree of arrays.
      metadata: JSON-serialisable mapping stored beside the arrays.
    """
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        metadata=ocp.args.JsonSave(dict(metadata))))
    self._manager.wait_until_finished()

  def restore(self, state_like: Any, step: int | None = None, *,
              recipe: Any = None) -> tuple[Any, dict[str, Any]]:
    """Reads a step back.

    Args:
      state_like: A pytree with the saved structure, shapes and dtypes (e.g.
        a freshly initialised state); its values are not used.
      step: Which step; the latest if None.
      recipe: If given, the JSON-able description of what is being trained;
        it must equal the ``'recipe'`` saved in the metadata.

    Returns:
      ``(state, metadata)``. The arrays come back committed to a device: a
      jitted function called with them compiles again unless it was first
      called with committed arrays too (``jax.device_put(x, device)``).

    Raises:
      FileNotFoundError: if there is no checkpoint to restore.
      ValueError: if ``recipe`` differs from the saved one (a workdir reused
        for another configuration).
    """
    step = self.latest_step if step is None else step
    if step is None:
      raise FileNotFoundError(
          f'Checkpointer.restore: no checkpoint in {self.directory}.')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        metadata=ocp.args.JsonRestore()))
    metadata = dict(restored.metadata)
    if recipe is not None and metadata.get('recipe') != jsonable(recipe):
      raise ValueError(
          f'Checkpointer.restore: checkpoints in {self.directory} are for '
          f'another recipe ({metadata.get("recipe")}, now {recipe}); use a '
          f'fresh workdir.')
    return restored.state, metadata

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def check_positive_multiples(config: Any, names: Sequence[str], unit: str,
                             fn: str) -> None:
  """Raises ValueError unless each field in ``names`` is k * ``unit``, k>0."""
  step = getattr(config, unit)
  for name in names:
    value = getattr(config, name)
    if value <= 0 or value % step:
      raise ValueError(
          f'{fn}: {name} must be a positive multiple of {unit} ({step}), got '
          f'{value}.')


# ------------------------------------------------------------------ results


def jsonable(obj: Any) -> Any:
  """Tuples -> lists, keys -> str, recursively: equal to its JSON round trip."""
  if isinstance(obj, Mapping):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  return obj


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
  """Writes ``obj`` as indented JSON, atomically (temp file + rename)."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile('w', dir=directory, suffix='.tmp',
                                   delete=False) as f:
    json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
    f.write('\n')
  os.replace(f.name, path)


def _json_default(obj: Any) -> Any:
  if isinstance(obj, (np.generic, jax.Array)) and np.ndim(obj) == 0:
    return np.asarray(obj).item()
  if isinstance(obj, (np.ndarray, jax.Array)):
    return np.asarray(obj).tolist()
  if isinstance(obj, tuple):
    return list(obj)
  raise TypeError(f'write_json: cannot serialise {type(obj).__name__}.')


def device_description() -> str:
  """Describes the default JAX backend, e.g. ``'cpu: 2 cores (x86_64 ...)'``."""
  devices = jax.devices()
  backend = jax.default_backend()
  if backend == 'cpu':
    return (f'cpu: {os.cpu_count()} cores ({_cpu_model()}), '
            f'{len(devices)} jax device(s)')
  kinds = sorted({d.device_kind for d in devices})
  return f'{backend}: {len(devices)} x {", ".join(kinds)}'


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def run_info() -> dict[str, str]:
  """Date (UTC, ISO 8601), device, and library versions for result files."""
  return {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'device': device_description(),
      'jax_version': jax.__version__,
      'python_version': platform.python_version(),
  }


# ---------------------------------------------------------------------------
# Config selection shared by every experiment's configs (the command line is
# in ``cli.py``).

CONFIG_NAMES = ('default', 'smoke')


def load_config(package: str, name: str) -> Any:
  """``<package>.<name>.get_config()``: the config module of that name.

  Raises:
    ValueError: if ``name`` is not one of ``CONFIG_NAMES``.
  """
  if name not in CONFIG_NAMES:
    raise ValueError(
        f'get_config: name must be one of {CONFIG_NAMES}, got {name!r}.')
  return importlib.import_module(f'{package}.{name}').get_config()


def load_image_splits(dataset: str, *, num_train: int | None = None,
                      num_test: int | None = None,
                      raw_dir: str | None = None,
                      data_dir: str | None = None
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Train and test ``{'image': uint8 [N, H, W, 1], 'label': int32 [N]}``.

  Real data through :func:`metacf.data.load_arrays` (imported here, so that
  only the experiments that need a dataset import tensorflow-datasets); the
  first ``num_train`` / ``num_test`` examples when given.
  """
  import metacf.data  # pylint: disable=g-import-not-at-top  # needs tfds
  out = []
  for split, limit in (('train', num_train), ('test', num_test)):
    arrays = metacf.data.load_arrays(dataset, split, raw_dir=raw_dir,
                                     data_dir=data_dir)
    images, labels = np.asarray(arrays.images), np.asarray(arrays.labels)
    if limit is not None:
      images, labels = images[:limit], labels[:limit]
    out.append({'image': images, 'label': labels.astype(np.int32)})
  return out[0], out[1]
