"""What the experiments' tests share: the raw data, and a test case that runs
an experiment's smoke config once per class."""

import os
import shutil
import tempfile
from typing import Any

from absl.testing import parameterized

# Real raw datasets, staged beside the project (see ../shared/data/README.md):
# $METACF_RAW_DIR, else ../shared/data if it exists, else None.
_DEFAULT_RAW = os.path.join(os.path.dirname(__file__), '..', '..', 'shared',
                            'data')
RAW_DIR = os.environ.get('METACF_RAW_DIR') or (
    os.path.abspath(_DEFAULT_RAW) if os.path.isdir(_DEFAULT_RAW) else None)


class SmokeRunTestCase(parameterized.TestCase):
  """Runs ``run_once(workdir)`` once in ``setUpClass``; ``cls.results`` holds it.

  Tests that write to the run directory work on :meth:`_copy_of_run`.
  """

  @classmethod
  def run_once(cls, workdir: str) -> Any:
    raise NotImplementedError

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp()
    cls.results = cls.run_once(cls.workdir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.workdir)
    super().tearDownClass()

  def _tempdir(self) -> str:
    path = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, path)
    return path

  def _copy_of_run(self) -> str:
    """A copy of the run's workdir, for tests that write to it."""
    path = os.path.join(self._tempdir(), 'run')
    shutil.copytree(self.workdir, path)
    return path
