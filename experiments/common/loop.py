"""One resumable loop for every experiment (STYLE.md section 14).

A study's ``train.py`` says *what* one step of a run is (a jitted chunk of
iterations, an epoch, a task) and what it records; :func:`resumable_loop`
says *how* the run restores from its checkpoints, checks that they were
written by the same recipe, shows a progress bar, logs, saves on an interval
or where a time budget stops it, and returns what the run recorded.
:func:`resumable_records` does the same for studies whose resumable unit is a
JSON record (one file per item) rather than a training state.

A run is ``total`` units of work (iterations, epochs, tasks), ``stride`` of
them per call of the study's ``step``. The checkpoint of a run is numbered by
the units done, so the number of the latest checkpoint is where a resumed run
starts. Beside the state, a checkpoint holds the run's ``meta``: a JSON-able
dict that ``step`` updates in place (history, timings), saved as
``{**meta, 'recipe': recipe}``.

Example (an epoch loop)::

  meta = {'history': [], 'train_time_s': 0.0}

  def step(state, epoch):  # epoch: epochs done before this one
    state, loss = train_epoch(state, epoch)
    meta['history'].append({'epoch': epoch + 1, 'loss': loss})
    return state, f'loss {loss:.4f}'

  state, meta, _ = loop.resumable_loop(
      os.path.join(workdir, 'checkpoints', 'net'), name='net', unit='epoch',
      total=num_epochs, init=lambda: init_state(key), step=step,
      recipe={'seed': seed, 'lr': lr}, meta=meta)
"""

from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
import json
import logging
import os
import time
from typing import Any, NamedTuple, TypeVar

from experiments.common import utils

State = Any
Item = TypeVar('Item')
logger = logging.getLogger(__name__)


class LoopResult(NamedTuple):
  """What :func:`resumable_loop` returns."""
  state: State          # The state after the last unit done.
  meta: dict[str, Any]  # The run's record (the ``meta`` passed in).
  stopped: bool         # Whether the time budget stopped the run early.


def resumable_loop(
    directory: str | os.PathLike[str], *,
    name: str,
    unit: str,
    total: int,
    init: Callable[[], State],
    step: Callable[[State, int], tuple[State, str]],
    recipe: Any,
    meta: dict[str, Any],
    stride: int = 1,
    state_like: Callable[[], Any] | None = None,
    start: Callable[[State], None] | None = None,
    checkpoint_every: int | None = None,
    time_budget_s: float | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    max_to_keep: int | None = 2,
    progress_bar: bool = True,
    log_every_s: float | None = None,
) -> LoopResult:
  """Runs ``step`` until ``total`` units are done, resuming from checkpoints.

  A run killed at any point and started again resumes from its latest
  checkpoint; since ``step`` gets the number of units done and the state, a
  deterministic ``step`` then gives bitwise the numbers of an uninterrupted
  run.

  Args:
    directory: The run's checkpoint directory (created if missing).
    name: The run's name, in the progress bar and the log lines.
    unit: What ``total`` counts, e.g. ``'iteration'``, ``'epoch'``,
      ``'task'`` (log lines read ``'<name> <unit> 20/60: <summary>'``).
    total: Units the complete run has; a multiple of ``stride``.
    init: Returns the fresh state. Called only when there is no checkpoint
      (and, when ``state_like`` is None, as the restore template).
    step: ``step(state, done) -> (state, summary)`` does units ``done`` to
      ``done + stride - 1`` and updates ``meta`` in place; ``summary`` is a
      short line (e.g. ``'loss 0.1234'``) for the bar and the log.
    recipe: Everything that changes the run's numbers (JSON-able). Saved
      with every checkpoint; a checkpoint of another recipe raises.
    meta: The run's JSON-able record, initial values for a fresh run. On a
      resume its contents are replaced, in place, by the checkpoint's (so
      closures over it in ``step`` and ``start`` see the restored record).
    stride: Units done by one call of ``step``.
    state_like: Returns the restore template: a pytree with the saved
      structure, shapes, dtypes and shardings (e.g. of
      ``jax.ShapeDtypeStruct``); None: ``init()``. Restored arrays take the
      template's shardings.
    start: Called as ``start(state)`` once per session, before the first
      ``step``, if any unit remains (compile, evaluate the initial state).
    checkpoint_every: Units between checkpoints, a multiple of ``stride``
      (None: after every ``step``). The last unit is always checkpointed.
    time_budget_s: If set, no ``step`` is started once the time since this
      call plus the duration of the previous ``step`` (its checkpoint
      included) exceeds it; at least one ``step`` runs per call. The state
      is checkpointed where it stopped.
    on_checkpoint: Called as ``on_checkpoint(done)`` after each checkpoint
      at an interval (tests raise from it to simulate a kill).
    max_to_keep: Checkpoints kept (None: all).
    progress_bar: Show a tqdm bar, in units (off anyway when not on a TTY).
    log_every_s: If set, the summary is also logged between checkpoints, at
      most this often; otherwise only at checkpoints.

  Returns:
    ``LoopResult(state, meta, stopped)``.

  Raises:
    ValueError: on a ``total`` or ``checkpoint_every`` that is not a
      multiple of ``stride``, or if the checkpoints in ``directory`` were
      written by another recipe.
  """
  session_start = time.perf_counter()
  every = stride if checkpoint_every is None else checkpoint_every
  if stride < 1 or total < 0 or total % stride or every < 1 or every % stride:
    raise ValueError(
        f'resumable_loop: total ({total}) and checkpoint_every ({every}) must '
        f'be multiples of stride ({stride}) >= 1.')
  recipe = utils.jsonable(recipe)
  stopped = False
  with utils.Checkpointer(directory, max_to_keep=max_to_keep) as ckpt:
    done = ckpt.latest_step
    if done is None:
      state, done = init(), 0
    else:
      template = init() if state_like is None else state_like()
      state, saved_meta = ckpt.restore(template, recipe=recipe)
      saved_meta.pop('recipe', None)
      meta.clear()
      meta.update(saved_meta)
      logger.info('%s: resumed after %s %d', name, unit, done)

    def save():
      ckpt.save(done, state, {**meta, 'recipe': recipe})

    if done < total and start is not None:
      start(state)
    bar = utils.progress_bar(total=total, desc=name, initial=done,
                             enabled=progress_bar)
    try:
      steps_run, saved, last_step_s = 0, done, 0.0
      last_log = time.perf_counter()
      while done < total:
        elapsed = time.perf_counter() - session_start
        if (time_budget_s is not None and steps_run
            and elapsed + last_step_s > time_budget_s):
          stopped = True
          break
        step_start = time.perf_counter()
        state, summary = step(state, done)
        done += stride
        steps_run += 1
        bar.update(stride)
        bar.set_postfix_str(summary)
        checkpoint = done % every == 0 or done == total
        if checkpoint or (log_every_s is not None
                          and time.perf_counter() - last_log >= log_every_s):
          logger.info('%s %s %d/%d: %s', name, unit, done, total, summary)
          last_log = time.perf_counter()
        if checkpoint:
          save()
          saved = done
          if on_checkpoint is not None:
            on_checkpoint(done)
        last_step_s = time.perf_counter() - step_start
      if saved != done:  # Stopped between checkpoints.
        save()
    finally:
      bar.close()
  if stopped:
    logger.info('%s: time budget of %.0fs spent after %s %d/%d; '
                'checkpointed, run again to continue', name, time_budget_s,
                unit, done, total)
  return LoopResult(state, meta, stopped)


def resumable_records(
    items: Sequence[Item], *,
    path: Callable[[Item], str],
    recipe: Callable[[Item], Any],
    compute: Callable[[Item], Mapping[str, Any]],
    summary: Callable[[Mapping[str, Any]], str],
    desc: str,
    progress_bar: bool = True,
    workers: int = 1,
) -> list[dict[str, Any]]:
  """One JSON record per item, computed once: read back when on disk.

  The record of ``item`` is written to ``path(item)`` as ``{'recipe':
  recipe(item), 'record': record}`` as soon as it is computed, so a run
  started again skips what is done.

  Args:
    items: What to compute a record of, in order.
    path: Where an item's record goes.
    recipe: Everything that changes an item's record (JSON-able, compared
      with the saved one).
    compute: Computes an item's record (JSON-able after ``utils.jsonable``).
    summary: A short line about a record, for the bar and (when computed)
      the log.
    desc: The progress bar's label.
    progress_bar: Show a tqdm bar (off anyway when not on a TTY).
    workers: Items computed at the same time, by threads (``compute`` must
      then be thread-safe; jitted JAX functions release the GIL while they
      run). Records do not depend on it.

  Returns:
    The records, in the order of ``items``.

  Raises:
    ValueError: if a record on disk was written by another recipe.
  """
  bar = utils.progress_bar(total=len(items), desc=desc, enabled=progress_bar)

  def one(item: Item) -> dict[str, Any]:
    item_path, item_recipe = path(item), utils.jsonable(recipe(item))
    record = load_record(item_path, item_recipe)
    if record is None:
      record = utils.jsonable(compute(item))
      utils.write_json(item_path, {'recipe': item_recipe, 'record': record})
      logger.info('%s', summary(record))
    return record

  def done(record: dict[str, Any]) -> None:
    bar.update(1)
    bar.set_postfix_str(summary(record))

  try:
    if workers == 1:
      records = []
      for item in items:
        records.append(one(item))
        done(records[-1])
      return records
    with futures.ThreadPoolExecutor(workers) as pool:
      pending = [pool.submit(one, item) for item in items]
      for future in futures.as_completed(pending):
        done(future.result())
      return [future.result() for future in pending]
  finally:
    bar.close()


def load_record(path: str, recipe: Any) -> dict[str, Any] | None:
  """The record saved at ``path`` by :func:`resumable_records`, or None.

  Raises:
    ValueError: if it was written for another recipe.
  """
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  if saved['recipe'] != recipe:
    raise ValueError(
        f'load_record: {path} was written by another recipe '
        f'({saved["recipe"]}, now {recipe}); use a fresh workdir.')
  return saved['record']
