"""The command line every experiment's ``main.py`` shares.

``main.py`` is one call of :func:`run`:

  def main(argv=None):
    cli.run(__doc__, configs, train, 'runs/<name>', argv)

which parses ``--config``, ``--workdir``, ``--raw_dir`` and ``--data_dir``
(plus a study's own flags), builds the named config, applies the
command-line overrides, runs ``train.train_and_evaluate(config, workdir)``
with log lines kept whole around progress bars, and prints the results
table and where the results went.

Config overrides
----------------
Any field of the config (a frozen dataclass) can be set from the command
line, as flax's examples do with ``ml_collections`` config flags::

  python -m experiments.maml_sinusoid.main --config=smoke --config.seed=3
  python -m experiments.maml_omniglot.main --config.settings.0.inner_lr=0.2
  python -m experiments.forgetting.main --config.seeds='(0, 1)'

``--config.<field>=<value>`` (or ``--config.<field> <value>``) replaces one
field; a dotted path reaches into nested dataclasses and, with an integer,
into tuples (``settings.0.ways``). The value is a Python literal
(``ast.literal_eval``: ``3``, ``0.5``, ``None``, ``(1, 2)``, ``'adam'``);
a bare word is a string (``--config.optimizer=adam``), and ``true``/
``false`` work for booleans. It is checked against the field's annotated
type (an int for a float field becomes a float) before the config is rebuilt
with ``dataclasses.replace``, so the config's own checks run. Overrides apply
in order, after ``--config`` picked the base config and before a study's own
flags (``--strategies``, ``--settings``).

Why not ``ml_collections.config_flags``: its ``DEFINE_config_dataclass``
(ml_collections 1.1.0) sets overridden fields with ``setattr``, which raises
``FrozenInstanceError`` on our frozen dataclass configs, refuses ``None`` for
``int | None`` fields, and parses through absl flags rather than the
argparse parsers our mains and tests use. The override syntax here is the
same as its, so the commands read the same as flax's.
"""

import argparse
import ast
from collections.abc import Callable, Mapping, Sequence
import dataclasses
import logging
import os
import types
import typing
from typing import Any

from tqdm.contrib import logging as tqdm_logging

from experiments.common import utils

PREFIX = '--config.'


# ------------------------------------------------------------ overrides


def parse_overrides(args: Sequence[str]) -> tuple[list[tuple[str, str]],
                                                  list[str]]:
  """Splits ``--config.<path>=<value>`` arguments from the others.

  Args:
    args: Command-line arguments (e.g. what ``parse_known_args`` left).

  Returns:
    ``(overrides, rest)``: ``(path, text)`` pairs in order, and the
    arguments that are not overrides. ``--config.<path> <value>`` (value as
    the next argument) is accepted too.
  """
  overrides, rest = [], []
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith(PREFIX):
      path, eq, text = arg[len(PREFIX):].partition('=')
      if not eq:
        if i + 1 >= len(args):
          raise ValueError(f'{arg}: no value; write {arg}=<value>.')
        i += 1
        text = args[i]
      overrides.append((path, text))
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def override_config(config: Any, overrides: Sequence[tuple[str, str]]) -> Any:
  """``config`` with each ``(path, text)`` override applied, in order.

  Args:
    config: A (frozen) dataclass instance.
    overrides: ``('seed', '3')``, ``('settings.0.ways', '20')``, ...: a
      dotted path of field names (and tuple indices) and the value's text.

  Returns:
    A new config, rebuilt with ``dataclasses.replace`` (its
    ``__post_init__`` checks run); ``config`` is unchanged.

  Raises:
    ValueError: on a path that names no field (the message lists the valid
      ones) or a value that does not parse as the field's type.
  """
  for path, text in overrides:
    if not path or any(not part for part in path.split('.')):
      raise ValueError(f'{PREFIX}{path}: empty field name in the path.')
    config = _replace_path(config, path.split('.'), text,
                           where=f'{PREFIX}{path}', owner_type=None)
  return config


def _replace_path(obj: Any, parts: list[str], text: str, *, where: str,
                  owner_type: Any) -> Any:
  """``obj`` with ``parts`` (field names / tuple indices) set to ``text``."""
  name, rest = parts[0], parts[1:]
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    fields = {f.name: f for f in dataclasses.fields(obj) if f.init}
    if name not in fields:
      raise ValueError(
          f'{where}: {type(obj).__name__} has no field {name!r}; valid '
          f'fields: {", ".join(fields)}.')
    field_type = typing.get_type_hints(type(obj))[name]
    current = getattr(obj, name)
    if rest:
      value = _replace_path(current, rest, text, where=where,
                            owner_type=field_type)
    else:
      value = _parse_value(text, field_type, where)
    return dataclasses.replace(obj, **{name: value})
  if isinstance(obj, tuple):
    if not name.lstrip('-').isdigit() or not -len(obj) <= int(name) < len(
        obj):
      raise ValueError(
          f'{where}: {name!r} is not an index of a tuple of {len(obj)}; use '
          f'0 to {len(obj) - 1}.')
    index = int(name) % len(obj)
    item_type = _tuple_item_type(owner_type, index)
    if rest:
      item = _replace_path(obj[index], rest, text, where=where,
                           owner_type=item_type)
    else:
      item = _parse_value(text, item_type, where)
    return obj[:index] + (item,) + obj[index + 1:]
  raise ValueError(
      f'{where}: {name!r} is inside a {type(obj).__name__} value, which has '
      f'no fields; set the whole value instead.')


def _tuple_item_type(tuple_type: Any, index: int) -> Any:
  args = typing.get_args(tuple_type)
  if len(args) == 2 and args[1] is Ellipsis:
    return args[0]
  if args and index < len(args):
    return args[index]
  return Any


def _parse_value(text: str, field_type: Any, where: str) -> Any:
  """``text`` as a value of ``field_type`` (ValueError if it is not one)."""
  candidates = []
  try:
    candidates.append(ast.literal_eval(text))
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    pass
  candidates.append(text)  # A bare word: a string (or true/false).
  for candidate in candidates:
    try:
      return _check(candidate, field_type)
    except TypeError:
      continue
  raise ValueError(
      f'{where}: must be {_type_name(field_type)}, got {text!r}.')


def _check(value: Any, tp: Any) -> Any:
  """``value`` as ``tp`` (int -> float widened), else TypeError."""
  if tp is Any:
    return value
  if tp is None or tp is type(None):
    if value is None:
      return None
    raise TypeError
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    for arm in typing.get_args(tp):
      try:
        return _check(value, arm)
      except TypeError:
        continue
    raise TypeError
  if origin is tuple:
    if not isinstance(value, (tuple, list)):
      raise TypeError
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_check(v, args[0]) for v in value)
    if args and len(args) != len(value):
      raise TypeError
    return tuple(_check(v, a) for v, a in zip(value, args or
                                               [Any] * len(value)))
  if tp is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ('true', 'false'):
      return value.lower() == 'true'
    raise TypeError
  if tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise TypeError
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    raise TypeError
  if tp is str:
    if isinstance(value, str):
      return value
    raise TypeError
  if dataclasses.is_dataclass(tp):
    raise TypeError  # Set its fields one by one: --config.a.b=...
  if isinstance(tp, type) and isinstance(value, tp):
    return value
  raise TypeError


def _type_name(tp: Any) -> str:
  if dataclasses.is_dataclass(tp):
    return (f'a {tp.__name__} (set its fields one by one, '
            f'{PREFIX}<field>.<subfield>=...)')
  if isinstance(tp, type):
    return tp.__name__
  return str(tp).replace('typing.', '')


# --------------------------------------------------------------- parser


def experiment_parser(doc: str, default_workdir: str, *,
                      data_flags: bool = True,
                      config_fields: Sequence[str] = ()
                      ) -> argparse.ArgumentParser:
  """The flags every experiment takes: --config, --workdir (+ data dirs).

  Args:
    doc: The experiment's module docstring; its first line describes the
      command in ``--help``.
    default_workdir: ``--workdir``'s default.
    data_flags: Add ``--raw_dir`` and ``--data_dir`` (studies on datasets).
    config_fields: The config's field names, listed in ``--help``.
  """
  epilog = (f'Override any config field with {PREFIX}<field>=<value> '
            f'(a Python literal; nested: {PREFIX}<field>.<subfield>=..., '
            f'tuples by index: {PREFIX}<field>.0.<subfield>=...).')
  if config_fields:
    epilog += f' Fields: {", ".join(config_fields)}.'
  parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                   epilog=epilog)
  parser.add_argument('--config', default='default', choices=utils.CONFIG_NAMES,
                      help='config name (configs/<name>.py)')
  parser.add_argument('--workdir', default=default_workdir,
                      help='results, figures and checkpoints go here')
  if data_flags:
    parser.add_argument('--raw_dir', default=os.environ.get('METACF_RAW_DIR'),
                        help='raw dataset files (default: $METACF_RAW_DIR; '
                        'unset: tfds downloads them)')
    parser.add_argument('--data_dir', default=None,
                        help='tensorflow-datasets data dir (default: '
                        '$METACF_DATA_DIR, else tfds\'s)')
  return parser


def experiment_logger() -> logging.Logger:
  """The 'experiments' logger, printing timestamped lines once."""
  log = logging.getLogger('experiments')
  if not log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
  return log


def print_run_summary(table: str, results: Mapping[str, Any],
                      results_path: str) -> None:
  """Prints an experiment's results table and where its results went."""
  print(table)
  print(f'{results["device"]}; this run {results["wall_time_s"]:.0f}s; '
        f'results in {results_path}')


# ------------------------------------------------------------------ run


def parse_args(doc: str, configs: types.ModuleType, default_workdir: str,
               argv: Sequence[str] | None = None, *,
               data_flags: bool = True,
               add_flags: Callable[[argparse.ArgumentParser], None]
               | None = None) -> tuple[argparse.Namespace, Any]:
  """Parses an experiment's command line into ``(args, config)``.

  ``config`` is ``configs.get_config(args.config)`` with the
  ``--config.<path>=<value>`` overrides applied. A malformed command line
  (an unknown flag, an unknown field, a value of the wrong type) exits with
  argparse's usage message and status 2.
  """
  base_fields = [f.name for f in dataclasses.fields(
      configs.get_config('default')) if f.init]
  parser = experiment_parser(doc, default_workdir, data_flags=data_flags,
                             config_fields=base_fields)
  if add_flags is not None:
    add_flags(parser)
  args, extra = parser.parse_known_args(argv)
  try:
    overrides, rest = parse_overrides(extra)
  except ValueError as e:
    parser.error(str(e))
  if rest:
    parser.error(f'unrecognized arguments: {" ".join(rest)}')
  try:
    config = override_config(configs.get_config(args.config), overrides)
  except ValueError as e:
    parser.error(str(e))
  return args, config


def run(doc: str, configs: types.ModuleType, train: types.ModuleType,
        default_workdir: str, argv: Sequence[str] | None = None, *,
        data_flags: bool = True,
        add_flags: Callable[[argparse.ArgumentParser], None] | None = None,
        select: Callable[[Any, argparse.Namespace], Any] | None = None,
        format_table: Callable[[Mapping[str, Any]], str] | None = None
        ) -> dict[str, Any]:
  """An experiment's ``main``: parse flags, train and evaluate, print.

  Args:
    doc: The ``main.py`` module docstring (``--help``'s description).
    configs: The study's ``configs`` package (``get_config(name)``).
    train: The study's driver module: ``train_and_evaluate(config, workdir,
      *, raw_dir, data_dir)`` (without the data arguments if ``data_flags``
      is False), ``format_table(results)`` and ``RESULTS_JSON``.
    default_workdir: ``--workdir``'s default, e.g. ``'runs/forgetting'``.
    argv: Arguments (without the program name); None reads ``sys.argv``.
    data_flags: Whether the study reads a dataset (``--raw_dir``,
      ``--data_dir``).
    add_flags: Adds the study's own flags to the parser.
    select: ``select(config, args) -> config``: applies those flags to the
      config (after the ``--config.*`` overrides).
    format_table: The printed table; default ``train.format_table``.

  Returns:
    What ``train.train_and_evaluate`` returned.
  """
  args, config = parse_args(doc, configs, default_workdir, argv,
                            data_flags=data_flags, add_flags=add_flags)
  log = experiment_logger()  # progress lines from train.py
  if select is not None:
    config = select(config, args)
  data = ({'raw_dir': args.raw_dir, 'data_dir': args.data_dir}
          if data_flags else {})
  with tqdm_logging.logging_redirect_tqdm(loggers=[log]):  # Keep bars whole.
    results = train.train_and_evaluate(config, args.workdir, **data)
  table = (train.format_table if format_table is None else format_table)(
      results)
  print_run_summary(table, results,
                    os.path.join(args.workdir, train.RESULTS_JSON))
  return results

