"""Tests for Tiny Shakespeare in metacf.data: speeches, splits, cache.

The parser and the splits are checked on small inline texts; the builder's
offline and cache paths on a tiny ``input.txt`` written here. The real file
(staged in ``conftest.RAW_DIR``: ``$METACF_RAW_DIR`` or ../shared/data) is
prepared once per session, offline, and compared with an independent
regex-based parse; it is also prepared through the online path (tfds's
download manager, its HTTP layer serving the staged file), which checks the
registered URL, size and sha256. The no-tfds cases run in a subprocess whose
``PYTHONPATH`` starts with a ``tensorflow_datasets`` that raises ImportError,
as in ``tests/test_data_cache.py``.
"""

import hashlib
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import _fake_http
from _smoke_run import RAW_DIR
import metacf.data
from metacf.data import _arrays
from metacf.data import _shakespeare

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RAW_FILE = (None if RAW_DIR is None else
             os.path.join(RAW_DIR, 'tiny_shakespeare', 'input.txt'))
requires_raw = pytest.mark.skipif(
    _RAW_FILE is None or not os.path.isfile(_RAW_FILE),
    reason='tiny_shakespeare/input.txt not found: set METACF_RAW_DIR or stage '
    'it in ../shared/data (see its README.md)')

# Karpathy's input.txt, as tfds registers it for its own tiny_shakespeare.
_SIZE = 1115394
_SHA256 = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'
# Non-empty speeches of the 10 most frequent speakers, counted on the file
# (the list of issue 30; "about 1,500 speeches").
_TOP10 = [('GLOUCESTER', 211), ('DUKE VINCENTIO', 189), ('MENENIUS', 161),
          ('ROMEO', 160), ('PETRUCHIO', 155), ('CORIOLANUS', 148),
          ('KING RICHARD III', 137), ('ISABELLA', 127), ('JULIET', 124),
          ('LEONTES', 124)]


# ---------------------------------------------------------------------------
# Helpers.


def _oracle_blocks(text):
  """Independent parse: (start, speaker, speech) of each blank-line block."""
  blocks = []
  for m in re.finditer(r'[^\n]+(?:\n[^\n]+)*', text):
    head, _, speech = m.group().partition('\n')
    assert head.endswith(':'), head
    blocks.append((m.start(), head[:-1], speech))
  return blocks


def _tfds_cuts(text):
  """tfds tiny_shakespeare's split code, verbatim but for the names."""
  i = int(len(text) * 0.9)
  train_text, rest = text[:i], text[i:]
  i = int(len(rest) * 0.5)
  validation_text = rest[:i]
  return len(train_text), len(train_text) + len(validation_text)


def _join(speakers, texts):
  """The text the speeches were parsed from, blank-line runs collapsed."""
  return '\n\n'.join('\n'.join([f'{s}:'] + ([t] if t else []))
                     for s, t in zip(speakers, texts))


def _synthetic_text(num=40):
  """Speeches of a few speakers, with every edge case the parser meets."""
  speakers = ['First Citizen', 'KING RICHARD III', 'ROMEO', 'Senators, &C']
  blocks = []
  for i in range(num):
    lines = [f'{speakers[i % 4]}:']
    if i % 7 != 3:  # Some empty speeches.
      lines += [f'Line {k} of speech {i}, ending in a colon:'
                if k == 0 else f'line {k} of {i}' for k in range(1 + i % 3)]
    blocks.append('\n'.join(lines))
  return '\n\n'.join(blocks)  # No final newline.


def _write_raw(raw_dir, text):
  folder = os.path.join(raw_dir, 'tiny_shakespeare')
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, 'input.txt')
  with open(path, 'w', encoding='utf-8', newline='') as f:
    f.write(text)
  return path


def _serve_raw_file(path, requested):
  """Serves every URL the file ``path`` (see ``_fake_http``)."""
  return _fake_http.serve_files(lambda url: path, requested)


def _run_without_tfds(tmp_path, code, **env):
  folder = tmp_path / 'blocked' / 'tensorflow_datasets'
  folder.mkdir(parents=True)
  (folder / '__init__.py').write_text(
      'raise ImportError("tensorflow_datasets is blocked by the test")\n')
  full_env = {**os.environ, **env, 'PYTHONPATH': os.pathsep.join(
      [str(tmp_path / 'blocked'), _ROOT])}
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code)],
                        cwd=_ROOT, env=full_env, capture_output=True,
                        text=True, timeout=120)


# ---------------------------------------------------------------------------
# Parsing and splits, on inline text.


def test_parse_inline_text_with_edge_cases():
  text = ('\n\nFirst Citizen:\nBefore we proceed any further, hear me speak.'
          '\n\nKING RICHARD III:\nA horse! a horse!\nMy kingdom for a horse!'
          '\n\n\nTITUS:\n\nSenators, &C:\nCome:\nWeapons, weapons!\n\n'
          'ANTONIO:\nWhiles thou art waking.')  # No final newline.
  speeches = _shakespeare.parse_speeches(text)
  assert [(s.speaker, s.text, s.line) for s in speeches] == [
      ('First Citizen', 'Before we proceed any further, hear me speak.', 3),
      ('KING RICHARD III', 'A horse! a horse!\nMy kingdom for a horse!', 6),
      ('TITUS', '', 11),
      ('Senators, &C', 'Come:\nWeapons, weapons!', 13),
      ('ANTONIO', 'Whiles thou art waking.', 17),
  ]
  for s in speeches:
    assert text[s.start:].startswith(s.speaker + ':')
  assert _join([s.speaker for s in speeches],
               [s.text for s in speeches]) == re.sub(
                   r'\n{3,}', '\n\n', text.strip('\n'))
  # A final newline, or several, changes nothing.
  assert _shakespeare.parse_speeches(text + '\n\n') == speeches


def test_parse_agrees_with_the_regex_oracle():
  text = _synthetic_text()
  speeches = _shakespeare.parse_speeches(text)
  assert [(s.start, s.speaker, s.text) for s in speeches] == _oracle_blocks(
      text)


@pytest.mark.parametrize(
    'text, message',
    [
        ('ROMEO:\nHe jests at scars.\n\nthat never felt a wound.\n',
         "must start each speech with a line \"SPEAKER:\", got 'that never "
         "felt a wound.' on line 4."),
        ('ROMEO: He jests at scars.\n',
         "must start each speech with a line \"SPEAKER:\", got 'ROMEO: He "
         "jests at scars.' on line 1."),
        (' ROMEO:\nx\n',
         "must start each speech with a line \"SPEAKER:\", got ' ROMEO:' on "
         'line 1.'),
        ('A:\nb\n\n:\nx\n',
         "must start each speech with a line \"SPEAKER:\", got ':' on line 4."),
        ('ROMEO:\r\nx\r\n',
         "must start each speech with a line \"SPEAKER:\", got 'ROMEO:\\r' on "
         'line 1.'),
        ('\n\n\n', 'must hold at least one speech "SPEAKER:\\n...", got none.'),
    ],
    ids=['no_speaker', 'same_line', 'space', 'empty_name', 'crlf', 'empty'])
def test_parse_rejects_non_speeches(text, message):
  with pytest.raises(ValueError, match=re.escape('ctx ' + message)):
    _shakespeare.parse_speeches(text, context='ctx')


@pytest.mark.parametrize('num', [40, 41, 97, 200])
def test_splits_cut_where_tfds_cuts(num):
  text = _synthetic_text(num)
  speeches = _shakespeare.parse_speeches(text)
  splits = _shakespeare.assign_splits(speeches, len(text))
  # Disjoint, covering all speeches, in order.
  assert sum(splits.values(), []) == list(range(num))
  i, j = _tfds_cuts(text)
  for split, lo, hi in (('train', 0, i), ('validation', i, j),
                        ('test', j, len(text))):
    assert splits[split]
    for k in splits[split]:
      assert lo <= speeches[k].start < hi
  assert _shakespeare.split_bounds(len(text)) == (i, j)


def test_splits_agree_with_the_builder_registry():
  assert _arrays.SPLITS['tiny_shakespeare'] == _shakespeare.SPLITS
  assert metacf.data.SPLITS['tiny_shakespeare'] == (
      'train', 'validation', 'test')


def test_top_speakers_counts_non_empty_speeches_and_breaks_ties_by_name():
  speeches = metacf.data.Speeches(
      speakers=np.array(['B', 'A', 'C', 'B', 'A', 'C', 'C', 'D']),
      texts=np.array(['x', 'y', '', 'z', 'w', '', '', 'v'], dtype=object),
      index=np.arange(8, dtype=np.int32))
  assert metacf.data.top_speakers(speeches) == [('A', 2), ('B', 2), ('D', 1)]
  assert metacf.data.top_speakers(speeches, 1) == [('A', 2)]
  for n in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match=re.escape(
        f'top_speakers: n must be an int >= 1, got {n!r}.')):
      metacf.data.top_speakers(speeches, n)


# ---------------------------------------------------------------------------
# The builder and the cache, on a small input.txt.


def test_synthetic_round_trip_offline_and_cache(tmp_path):
  text = _synthetic_text(40)
  raw_dir, data_dir = str(tmp_path / 'raw'), str(tmp_path / 'tfds')
  _write_raw(raw_dir, text)
  parts = {split: metacf.data.load_speeches(split, raw_dir=raw_dir,
                                            data_dir=data_dir)
           for split in _shakespeare.SPLITS}
  speeches = _shakespeare.parse_speeches(text)
  expected = _shakespeare.assign_splits(speeches, len(text))
  for split, part in parts.items():
    assert part.index.dtype == np.int32
    assert part.index.tolist() == expected[split]
    assert part.speakers.dtype.kind == 'U'
    assert part.texts.dtype == object
    assert all(isinstance(t, str) for t in part.texts)
  everything = metacf.data.load_speeches('all', data_dir=data_dir)
  assert everything.index.tolist() == list(range(40))
  assert everything.speakers.tolist() == [s.speaker for s in speeches]
  assert everything.texts.tolist() == [s.text for s in speeches]
  assert _join(everything.speakers, everything.texts) == text
  # The tfds data source holds the same examples.
  builder = metacf.data.get_builder('tiny_shakespeare', data_dir=data_dir)
  example = builder.as_data_source('test')[0]
  k = expected['test'][0]
  assert example['index'] == k
  assert example['speaker'].decode() == speeches[k].speaker
  assert example['text'].decode() == speeches[k].text
  # A hit reads only the cache: neither raw file nor records are needed.
  version_dir = tmp_path / 'tfds' / 'metacf_tiny_shakespeare' / '1.0.0'
  assert sorted(p.name for p in version_dir.glob('arrays_*')) == [
      'arrays_test.v1.npz', 'arrays_train.v1.npz', 'arrays_validation.v1.npz']
  for records in version_dir.glob('*.array_record-*'):
    records.unlink()
  os.remove(os.path.join(raw_dir, 'tiny_shakespeare', 'input.txt'))
  again = metacf.data.load_speeches('train', data_dir=data_dir)
  for got, want in zip(again, parts['train']):
    np.testing.assert_array_equal(got, want)


def test_cache_hit_needs_no_tfds_and_a_miss_names_the_cache(tmp_path):
  text = _synthetic_text(40)
  raw_dir, data_dir = str(tmp_path / 'raw'), str(tmp_path / 'tfds')
  _write_raw(raw_dir, text)
  for split in ('train', 'validation'):
    metacf.data.load_speeches(split, raw_dir=raw_dir, data_dir=data_dir)
  expected = _shakespeare.parse_speeches(text)
  missing = _arrays.cache_path('tiny_shakespeare', 'test', data_dir)
  result = _run_without_tfds(tmp_path, f'''
      import sys
      import metacf.data
      s = metacf.data.load_speeches('validation')
      t = metacf.data.load_speeches('train', data_dir={data_dir!r})
      print('SPEAKERS', repr(t.speakers.tolist() + s.speakers.tolist()))
      print('TEXTS', repr(t.texts.tolist() + s.texts.tolist()))
      print('TOP', repr(metacf.data.top_speakers(t, 2)))
      assert 'tensorflow_datasets' not in sys.modules
      try:
        metacf.data.load_speeches('all')
      except FileNotFoundError as e:
        print('MESSAGE', e)
      ''', METACF_DATA_DIR=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = dict(line.split(' ', 1) for line in result.stdout.splitlines())
  num = len(eval(lines['SPEAKERS']))  # pylint: disable=eval-used
  assert num < len(expected)  # The test split is not cached.
  # pylint: disable-next=eval-used
  assert eval(lines['SPEAKERS']) == [s.speaker for s in expected[:num]]
  # pylint: disable-next=eval-used
  assert eval(lines['TEXTS']) == [s.text for s in expected[:num]]
  assert lines['TOP'].startswith('[(')
  message = lines['MESSAGE']
  assert message.startswith(f'load_speeches: {missing} must hold the cached '
                            "tiny_shakespeare 'test' arrays")
  assert "pip install 'metacf[data]'" in message
  assert 'load_speeches(split, data_dir=...) there' in message
  assert 'METACF_DATA_DIR' in message


def test_too_short_a_file_raises_before_writing(tmp_path):
  raw_dir = str(tmp_path / 'raw')
  path = _write_raw(raw_dir, 'A B:\nhello\n\nC:\nworld')
  message = (
      f'metacf_tiny_shakespeare: {path} must hold speeches starting in each '
      'split (the first 90 %, the next 5 % and the last 5 % of its '
      "characters), got {'train': 2, 'validation': 0, 'test': 0} from 2 "
      'speeches.')
  with pytest.raises(ValueError, match=re.escape(message)):
    metacf.data.load_speeches('train', raw_dir=raw_dir,
                              data_dir=str(tmp_path / 'tfds'))
  assert not (tmp_path / 'tfds' / 'metacf_tiny_shakespeare' /
              '1.0.0').exists()


def test_bad_raw_file_raises(tmp_path):
  raw_dir = str(tmp_path / 'raw')
  path = _write_raw(raw_dir, _synthetic_text(40) + '\n\nnot a speaker\nx\n')
  with pytest.raises(ValueError, match=re.escape(
      f'metacf_tiny_shakespeare: {path} must start each speech with a line '
      "\"SPEAKER:\", got 'not a speaker' on line")):
    metacf.data.load_speeches('test', raw_dir=raw_dir,
                              data_dir=str(tmp_path / 'tfds'))
  with open(path, 'wb') as f:
    f.write(b'ROMEO:\n\xff\xfe\n')
  with pytest.raises(ValueError, match=re.escape(
      f'metacf_tiny_shakespeare: {path} must be UTF-8 text, got undecodable '
      'bytes')):
    metacf.data.load_speeches('test', raw_dir=raw_dir,
                              data_dir=str(tmp_path / 'tfds'))
  os.remove(path)
  with pytest.raises(FileNotFoundError, match=re.escape(
      f'metacf_tiny_shakespeare: {path} must exist (expected the Tiny '
      f'Shakespeare text file input.txt from raw_dir={raw_dir}, laid out as '
      '<raw_dir>/tiny_shakespeare/input.txt), got no such file.')):
    metacf.data.load_speeches('test', raw_dir=raw_dir,
                              data_dir=str(tmp_path / 'tfds'))


@pytest.mark.parametrize('split', ['valid', 'TRAIN', None, 'train[:10]'])
def test_bad_split_raises_before_anything_is_prepared(tmp_path, split):
  with pytest.raises(ValueError, match=re.escape(
      "load_speeches: split must be one of ['train', 'validation', 'test', "
      f"'all'], got {split!r}.")):
    metacf.data.load_speeches(split, data_dir=str(tmp_path))
  assert not os.listdir(tmp_path)


def test_load_arrays_rejects_the_text_dataset(tmp_path):
  with pytest.raises(ValueError, match=re.escape(
      "load_arrays: name must be one of ['fashion_mnist', 'mnist', "
      "'omniglot'], got 'tiny_shakespeare'.")):
    metacf.data.load_arrays('tiny_shakespeare', 'train',
                            data_dir=str(tmp_path))


# ---------------------------------------------------------------------------
# The real file.


@pytest.fixture(scope='session')
def shakespeare_dir(tmp_path_factory):
  if _RAW_FILE is None or not os.path.isfile(_RAW_FILE):
    pytest.skip('tiny_shakespeare/input.txt not found')
  data_dir = str(tmp_path_factory.mktemp('tfds_tiny_shakespeare'))
  for split in _shakespeare.SPLITS:
    metacf.data.load_speeches(split, raw_dir=RAW_DIR, data_dir=data_dir)
  return data_dir


@pytest.fixture(scope='session')
def shakespeare(shakespeare_dir):
  return {split: metacf.data.load_speeches(split, data_dir=shakespeare_dir)
          for split in _shakespeare.SPLITS + ('all',)}


@pytest.fixture(scope='session')
def raw_text():
  with open(_RAW_FILE, encoding='utf-8') as f:
    return f.read()


@requires_raw
def test_staged_file_matches_the_registered_checksum():
  with open(_RAW_FILE, 'rb') as f:
    data = f.read()
  assert len(data) == _SIZE
  assert hashlib.sha256(data).hexdigest() == _SHA256
  info = metacf.data.MetacfTinyShakespeare.url_infos[
      metacf.data.MetacfTinyShakespeare.URL + 'input.txt']
  assert (info.size, info.checksum) == (_SIZE, _SHA256)


@requires_raw
def test_real_speech_and_split_counts(shakespeare):
  assert {split: len(shakespeare[split].index)
          for split in _shakespeare.SPLITS} == {
              'train': 6283, 'validation': 440, 'test': 499}
  everything = shakespeare['all']
  # Disjoint and covering: together the positions 0..7221, once each.
  np.testing.assert_array_equal(everything.index,
                                np.arange(7222, dtype=np.int32))
  assert len(set(everything.speakers.tolist())) == 309
  assert sum(1 for t in everything.texts if not t) == 125


@requires_raw
def test_real_speeches_reproduce_the_file(shakespeare, raw_text):
  everything = shakespeare['all']
  # Blank lines between speeches: single, except in two places.
  assert raw_text.count('\n\n\n') == 2
  assert _join(everything.speakers, everything.texts) + '\n' == re.sub(
      r'\n{3,}', '\n\n', raw_text)
  blocks = _oracle_blocks(raw_text)
  assert everything.speakers.tolist() == [b[1] for b in blocks]
  assert everything.texts.tolist() == [b[2] for b in blocks]
  # The splits are tfds's cuts, moved to the next speech.
  i, j = _tfds_cuts(raw_text)
  starts = np.array([b[0] for b in blocks])
  for split, lo, hi in (('train', 0, i), ('validation', i, j),
                        ('test', j, len(raw_text))):
    chosen = starts[shakespeare[split].index]
    assert lo <= chosen.min() and chosen.max() < hi
    assert shakespeare[split].texts.tolist() == [
        blocks[k][2] for k in shakespeare[split].index]


@requires_raw
def test_real_top_10_speakers(shakespeare):
  top = metacf.data.top_speakers(shakespeare['all'])
  assert top == _TOP10
  assert sum(count for _, count in top) == 1536
  # With the empty speeches, GLOUCESTER has 229 and ROMEO passes MENENIUS.
  everything = shakespeare['all']
  counts = {name: int(np.sum(everything.speakers == name))
            for name, _ in _TOP10}
  assert counts['GLOUCESTER'] == 229
  assert (counts['ROMEO'], counts['MENENIUS']) == (163, 162)
  # Contiguous splits: of the ten, only PETRUCHIO speaks outside train.
  for split in ('validation', 'test'):
    names = {n for n, _ in metacf.data.top_speakers(shakespeare[split], 400)}
    assert names & {n for n, _ in _TOP10} == {'PETRUCHIO'}


@requires_raw
def test_real_data_source_agrees(shakespeare, shakespeare_dir):
  builder = metacf.data.get_builder('tiny_shakespeare',
                                    data_dir=shakespeare_dir)
  source = builder.as_data_source('validation')
  assert len(source) == 440
  for i in (0, 17, 439):
    example = source[i]
    assert example['speaker'].decode() == shakespeare['validation'].speakers[i]
    assert example['text'].decode() == shakespeare['validation'].texts[i]
    assert example['index'] == shakespeare['validation'].index[i]


@requires_raw
def test_online_path_downloads_the_registered_url(shakespeare, tmp_path):
  requested = []
  with _serve_raw_file(_RAW_FILE, requested):
    builder = metacf.data.get_builder('tiny_shakespeare',
                                      data_dir=str(tmp_path))
    assert builder.raw_dir is None
    test = metacf.data.load_speeches('test', data_dir=str(tmp_path))
  assert requested == [
      'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/'
      'tinyshakespeare/input.txt']
  for got, want in zip(test, shakespeare['test']):
    np.testing.assert_array_equal(got, want)
