"""The experiments' shared command line: ``--config.<field>=<value>``."""

import contextlib
import dataclasses
import importlib
import io

from absl.testing import absltest
from absl.testing import parameterized

from experiments.common import cli
from experiments.common import utils
from experiments.maml_omniglot import configs as omniglot_configs
from experiments.maml_sinusoid import configs as sinusoid_configs

STUDIES = ('distill_mnist', 'finetune_paradigms', 'forgetting',
           'lwf_observability', 'maml_omniglot', 'maml_sinusoid',
           'predict_forgetting', 'prevent_forgetting')


def _parse(argv, configs=sinusoid_configs, **kwargs):
  return cli.parse_args('Doc.', configs, 'runs/x', argv, **kwargs)


class OverrideConfigTest(parameterized.TestCase):

  def test_override_changes_only_that_field(self):
    config = sinusoid_configs.get_config('smoke')
    new = cli.override_config(config, [('seed', '3')])
    self.assertEqual(new.seed, 3)
    self.assertEqual(dataclasses.replace(new, seed=config.seed), config)
    self.assertEqual(config.seed, sinusoid_configs.get_config('smoke').seed)

  def test_values_are_parsed_as_the_field_type(self):
    config = omniglot_configs.get_config('smoke')
    new = cli.override_config(config, [
        ('outer_lr', '1'),                 # float field: int widened
        ('num_query', '4'),                # int | None
        ('task_chunk_size', 'None'),
        ('rotations', 'false'),            # bool, bare word
        ('eval_schedule', '((5, 1), (10, 5))'),
        ('time_budget_s', '60'),           # float | None
    ])
    self.assertEqual(new.outer_lr, 1.0)
    self.assertIsInstance(new.outer_lr, float)
    self.assertEqual(new.num_query, 4)
    self.assertIsNone(new.task_chunk_size)
    self.assertIs(new.rotations, False)
    self.assertEqual(new.eval_schedule, ((5, 1), (10, 5)))
    self.assertEqual(new.time_budget_s, 60.0)
    self.assertIsInstance(new.time_budget_s, float)

  def test_nested_dataclass_in_tuple_by_index(self):
    config = omniglot_configs.get_config('default')
    new = cli.override_config(config, [('settings.2.inner_lr', '0.2'),
                                       ('settings.-1.ways', '10')])
    self.assertEqual(new.settings[2].inner_lr, 0.2)
    self.assertEqual(new.settings[3].ways, 10)
    self.assertEqual(new.settings[:2], config.settings[:2])

  def test_later_override_wins(self):
    config = sinusoid_configs.get_config('smoke')
    new = cli.override_config(config, [('seed', '3'), ('seed', '5')])
    self.assertEqual(new.seed, 5)

  @parameterized.named_parameters(
      ('unknown_field', [('sed', '3')],
       r"--config.sed: Config has no field 'sed'; valid fields: seed, "),
      ('unknown_nested_field', [('settings.0.way', '3')],
       r"Setting has no field 'way'; valid fields: ways, shots"),
      ('wrong_type', [('seed', 'abc')],
       r"--config.seed: must be int, got 'abc'"),
      ('float_for_int', [('num_iterations', '1.5')], r'must be int'),
      ('bad_index', [('settings.7.ways', '3')],
       r"'7' is not an index of a tuple of 4"),
      ('whole_dataclass', [('settings.0', '3')], r'one by one'),
      ('tuple_length', [('eval_schedule', '((1, 2, 3),)')],
       r'eval_schedule: must be'),
      ('empty_part', [('seed.', '3')], r'empty field name'),
  )
  def test_bad_override_raises_clearly(self, overrides, message):
    with self.assertRaisesRegex(ValueError, message):
      cli.override_config(omniglot_configs.get_config('default'), overrides)

  @parameterized.parameters(*STUDIES)
  def test_every_field_round_trips_through_its_repr(self, study):
    configs = importlib.import_module(f'experiments.{study}.configs')
    for name in utils.CONFIG_NAMES:
      config = configs.get_config(name)
      overrides = [(f.name, repr(getattr(config, f.name)))
                   for f in dataclasses.fields(config)
                   if f.init and not _has_dataclass(getattr(config, f.name))]
      self.assertNotEmpty(overrides)
      with self.subTest(config=name):
        self.assertEqual(cli.override_config(config, overrides), config)


def _has_dataclass(value):
  if isinstance(value, tuple):
    return any(_has_dataclass(v) for v in value)
  return dataclasses.is_dataclass(value)


class ParseArgsTest(absltest.TestCase):

  def test_named_config_then_overrides(self):
    args, config = _parse(['--config=smoke', '--config.seed=3',
                           '--workdir=/tmp/w'])
    self.assertEqual(args.config, 'smoke')
    self.assertEqual(args.workdir, '/tmp/w')
    self.assertEqual(config, dataclasses.replace(
        sinusoid_configs.get_config('smoke'), seed=3))

  def test_value_as_next_argument(self):
    _, config = _parse(['--config', 'smoke', '--config.seed', '7'])
    self.assertEqual(config.seed, 7)

  def test_no_overrides_gives_the_named_config(self):
    _, config = _parse([])
    self.assertEqual(config, sinusoid_configs.get_config('default'))

  def test_study_flags_still_parse(self):
    def add_flags(parser):
      parser.add_argument('--settings', default=None)
    args, config = _parse(['--settings=5way1shot', '--config.seed=2'],
                          omniglot_configs, add_flags=add_flags)
    self.assertEqual(args.settings, '5way1shot')
    self.assertEqual(config.seed, 2)

  def _error(self, argv, **kwargs):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as e:
      _parse(argv, **kwargs)
    self.assertEqual(e.exception.code, 2)
    return err.getvalue()

  def test_bad_field_exits_with_usage_and_valid_fields(self):
    err = self._error(['--config=smoke', '--config.sead=3'])
    self.assertIn('usage:', err)
    self.assertIn("Config has no field 'sead'; valid fields: seed,", err)

  def test_unknown_flag_exits(self):
    self.assertIn('unrecognized arguments: --bogus',
                  self._error(['--bogus']))

  def test_missing_value_exits(self):
    self.assertIn('no value', self._error(['--config.seed']))

  def test_data_flags_only_where_asked(self):
    args, _ = _parse(['--raw_dir=/r'], omniglot_configs)
    self.assertEqual(args.raw_dir, '/r')
    self.assertIn('unrecognized arguments: --raw_dir=/r',
                  self._error(['--raw_dir=/r'], data_flags=False))

  def test_help_lists_the_fields(self):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), self.assertRaises(SystemExit):
      _parse(['--help'])
    self.assertIn('--config.<field>=<value>', out.getvalue())
    self.assertIn('num_iterations', out.getvalue())


if __name__ == '__main__':
  absltest.main()
