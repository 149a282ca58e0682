"""Tiny Shakespeare as speeches: parsing, splits and the cached loader.

The corpus (Karpathy's ``input.txt``, 40,000 lines from Shakespeare's plays)
is a sequence of blocks separated by blank lines; each block is a line
``SPEAKER:`` followed by the lines of the speech. :func:`parse_speeches`
turns the text into speeches with Python alone; the ``metacf_tiny_shakespeare``
builder (in :mod:`metacf.data._builders`) stores them, and
:func:`load_speeches` reads a split back and caches it like
:func:`metacf.data.load_arrays`, so that a cached split loads without
tensorflow-datasets.
"""

import bisect
import collections
import os
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from metacf.data import _arrays

if TYPE_CHECKING:
  import tensorflow_datasets as tfds

NAME = 'tiny_shakespeare'
SPLITS = ('train', 'validation', 'test')
"""The builder's splits, in file order."""

# tfds's own `tiny_shakespeare` builder cuts the text at these fractions of
# its characters (train / validation / test = 90 / 5 / 5 %).
_TRAIN_FRACTION = 0.9
_VALIDATION_FRACTION_OF_REST = 0.5


class Speech(NamedTuple):
  """One parsed speech (see :func:`parse_speeches`)."""
  speaker: str
  text: str   # The speech's lines joined by '\n', without the speaker line.
  start: int  # Character offset of the speaker line in the file.
  line: int   # 1-based line number of the speaker line.


class Speeches(NamedTuple):
  """Speeches of Tiny Shakespeare, in file order.

  Attributes:
    speakers: ``[N]`` NumPy unicode strings, the speaker line without its
      colon (``'GLOUCESTER'``, ``'First Citizen'``, ``'KING RICHARD III'``).
    texts: ``[N]`` NumPy object array of Python ``str``: each speech's lines
      joined by ``'\\n'``, without the speaker line and without a final
      newline. 125 speeches of the file are empty (``''``): a speaker line
      directly followed by a blank line (the speech's lines are missing
      from the corpus).
    index: ``[N]`` int32, the speech's position among all the file's
      speeches (0-based; consecutive within a split).
  """
  speakers: np.ndarray  # shape=[N], dtype=str (numpy '<U').
  texts: np.ndarray     # shape=[N], dtype=object (Python str).
  index: np.ndarray     # shape=[N], dtype=int32.


def parse_speeches(text: str, *, context: str = 'parse_speeches: text'
                   ) -> list[Speech]:
  """Splits Tiny Shakespeare's text into speeches.

  A speech is a maximal run of non-empty lines (blocks are separated by one
  or more empty lines; ``input.txt`` has two places with two). Its first
  line must be ``SPEAKER:``, a non-empty name without surrounding spaces
  followed by a colon; the other lines are the speech, which may be empty.
  A last block without a final newline is a speech like any other.

  Args:
    text: The whole file, decoded.
    context: Start of error messages (the builder passes its name and the
      file's path).

  Returns:
    The speeches, in file order. Joining ``speaker + ':'`` and the text's
    lines with ``'\\n'``, and the speeches with ``'\\n\\n'``, gives ``text``
    with runs of empty lines collapsed to one and no leading or trailing
    newlines.

  Raises:
    ValueError: if a block does not start with a speaker line, or ``text``
      holds no speech.
  """
  speeches = []
  block: list[str] = []
  block_start = block_line = 0
  offset = 0
  lines = text.split('\n')
  # A sentinel empty line closes the last block.
  for number, line in enumerate(lines + [''], start=1):
    if line:
      if not block:
        block_start, block_line = offset, number
      block.append(line)
    elif block:
      head = block[0]
      name = head[:-1]
      if not head.endswith(':') or not name or name != name.strip():
        raise ValueError(
            f'{context} must start each speech with a line "SPEAKER:", got '
            f'{head!r} on line {block_line}.')
      speeches.append(Speech(speaker=name, text='\n'.join(block[1:]),
                             start=block_start, line=block_line))
      block = []
    offset += len(line) + 1
  if not speeches:
    raise ValueError(f'{context} must hold at least one speech "SPEAKER:\\n'
                     '...", got none.')
  return speeches


def split_bounds(num_chars: int) -> tuple[int, int]:
  """tfds ``tiny_shakespeare``'s cut points for a text of ``num_chars``.

  Its train split is ``text[:i]``, validation ``text[i:j]`` and test
  ``text[j:]``, with ``i = int(0.9 n)``, ``j = i + int(0.5 (n - i))``.
  """
  i = int(num_chars * _TRAIN_FRACTION)
  return i, i + int((num_chars - i) * _VALIDATION_FRACTION_OF_REST)


def assign_splits(speeches: list[Speech],
                  num_chars: int) -> dict[str, list[int]]:
  """Indices of the speeches of each split: contiguous, cut as tfds cuts.

  A speech belongs to the split of tfds's ``tiny_shakespeare`` (90 / 5 / 5 %
  of the characters, :func:`split_bounds`) in which its speaker line starts,
  so the splits are the same contiguous stretches of text as tfds's, moved
  to the next speech boundary. Contiguous splits keep plays apart (the
  validation and test speeches come from the last plays of the file), which
  limits leakage between splits, and the same cut as tfds keeps the text
  comparable with character-level results on tfds's splits. Speeches are
  never cut.

  Args:
    speeches: From :func:`parse_speeches`, in file order.
    num_chars: Length of the parsed text.

  Returns:
    ``{'train': [...], 'validation': [...], 'test': [...]}``, indices into
    ``speeches``, disjoint and together covering all of them.
  """
  starts = [s.start for s in speeches]
  i, j = split_bounds(num_chars)
  a, b = bisect.bisect_left(starts, i), bisect.bisect_left(starts, j)
  n = len(speeches)
  return {'train': list(range(a)), 'validation': list(range(a, b)),
          'test': list(range(b, n))}


def _read_split(builder: 'tfds.core.GeneratorBasedBuilder',
                split: str) -> dict[str, np.ndarray]:
  """Reads a prepared split through its data source, as the cache's arrays."""
  features = _arrays.raw_features(builder, split)
  speakers = [f['speaker'].bytes_list.value[0].decode('utf-8')
              for f in features]
  texts = [f['text'].bytes_list.value[0] for f in features]
  return {
      'speakers': np.array(speakers, dtype=np.str_),
      'text_utf8': np.frombuffer(b''.join(texts), np.uint8),
      'text_ends': np.cumsum([len(t) for t in texts], dtype=np.int64),
      'index': np.array([f['index'].int64_list.value[0] for f in features],
                        np.int32),
  }


def _speeches(arrays: dict[str, np.ndarray]) -> Speeches:
  data = arrays['text_utf8'].tobytes()
  ends = arrays['text_ends'].tolist()
  texts = np.empty(len(ends), dtype=object)
  texts[:] = [data[a:b].decode('utf-8')
              for a, b in zip([0] + ends[:-1], ends)]
  return Speeches(speakers=arrays['speakers'], texts=texts,
                  index=arrays['index'])


def load_speeches(split: str, *,
                  raw_dir: os.PathLike[str] | str | None = None,
                  data_dir: os.PathLike[str] | str | None = None
                  ) -> Speeches:
  """Loads the speeches of a Tiny Shakespeare split.

  The first call prepares the ``metacf_tiny_shakespeare`` builder with tfds
  (``array_record`` files in ``data_dir``, from ``input.txt``) and caches the
  split as ``arrays_<split>.v1.npz`` next to the prepared files, as
  :func:`metacf.data.load_arrays` does; later calls read the cache with
  NumPy alone (tensorflow-datasets need not be installed then).

  The file holds 7,222 speeches: 6,283 train, 440 validation, 499 test
  (contiguous, cut where tfds's own ``tiny_shakespeare`` cuts its 90 / 5 /
  5 % character splits, moved to the next speech; see
  :class:`metacf.data.MetacfTinyShakespeare`).

  Args:
    split: ``'train'``, ``'validation'``, ``'test'``, or ``'all'`` (the
      three, concatenated in file order).
    raw_dir: Folder with ``tiny_shakespeare/input.txt``, only read if the
      dataset is not yet prepared in ``data_dir``. Defaults to
      ``$METACF_RAW_DIR``; without either, the file is downloaded from
      Karpathy's char-rnn repository and checked against the sha256 that
      tfds registers for its ``tiny_shakespeare``.
    data_dir: tfds data folder. Defaults to ``$METACF_DATA_DIR``, else
      tfds's default.

  Returns:
    A :class:`Speeches`, in file order.

  Raises:
    ValueError: if ``split`` is not one of the above, or the raw file is not
      speeches (the message names the file and line).
    FileNotFoundError: if ``input.txt`` is missing from ``raw_dir``, or the
      split's cache is missing and tensorflow-datasets is not installed to
      build it (the message names the cache file).

  References:
    Karpathy, `char-rnn <https://github.com/karpathy/char-rnn>`_, 2015
    (the corpus).
  """
  fn = 'load_speeches'
  if not isinstance(split, str) or split not in SPLITS + ('all',):
    raise ValueError(
        f"{fn}: split must be one of {list(SPLITS) + ['all']}, got "
        f'{split!r}.')
  if split == 'all':
    parts = [load_speeches(s, raw_dir=raw_dir, data_dir=data_dir)
             for s in SPLITS]
    return Speeches(*(np.concatenate(field) for field in zip(*parts)))
  arrays = _arrays.load_cached(
      NAME, split, fn=fn,
      read_split=lambda builder: _read_split(builder, split),
      raw_dir=raw_dir, data_dir=data_dir,
      build_hint='load_speeches(split, data_dir=...) there')
  return _speeches(arrays)


def top_speakers(speeches: Speeches, n: int = 10) -> list[tuple[str, int]]:
  """The ``n`` speakers with the most non-empty speeches, with their counts.

  Empty speeches (a speaker line with no lines after it) are not counted.
  Sorted by count, most first, then by name. On the whole file
  (``load_speeches('all')``) the top 10 are GLOUCESTER (211), DUKE VINCENTIO
  (189), MENENIUS (161), ROMEO (160), PETRUCHIO (155), CORIOLANUS (148),
  KING RICHARD III (137), ISABELLA (127), JULIET (124) and LEONTES (124):
  1,536 speeches.

  Args:
    speeches: From :func:`load_speeches`.
    n: How many speakers, ``>= 1``.

  Returns:
    ``[(speaker, count), ...]``, at most ``n`` pairs.

  Raises:
    ValueError: if ``n < 1``.
  """
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f'top_speakers: n must be an int >= 1, got {n!r}.')
  counts = collections.Counter(
      str(speaker) for speaker, text in zip(speeches.speakers, speeches.texts)
      if text)
  return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]
