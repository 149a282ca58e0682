"""A stand-in for tfds's HTTP layer, shared by the data tests: the online
download path runs, offline, on files served from disk."""

from collections.abc import Callable
import contextlib
import os

import pytest
from tensorflow_datasets.core.download import downloader


class _Response:
  """What tfds's downloader reads from a `requests` response."""

  def __init__(self, url, size):
    self.url = url
    self.headers = {'Content-length': str(size)}


@contextlib.contextmanager
def serve_files(path_of: Callable[[str], str], requested: list[str]):
  """Replaces tfds's ``_open_url``: URL ``u`` is served the file
  ``path_of(u)`` and appended to ``requested``; ``$METACF_RAW_DIR`` is
  unset meanwhile, so the builders take the online path."""

  @contextlib.contextmanager
  def open_url(url, **kwargs):
    del kwargs
    requested.append(url)
    path = path_of(url)
    with open(path, 'rb') as f:
      yield _Response(url, os.path.getsize(path)), iter(
          lambda: f.read(1 << 20), b'')

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(downloader, '_open_url', open_url)
    mp.delenv('METACF_RAW_DIR', raising=False)
    yield
