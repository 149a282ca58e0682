"""Tiny Shakespeare as the text experiment reads it: characters, speeches,
pre-training text, task B's speaker-attribution sets.

Tokeniser: characters. The vocabulary is the characters of the training
split's text (speaker lines included), after five special ids and before the
sentinels::

  0 PAD, 1 BOS (decoder start), 2 EOS, 3 MASK, 4 UNK,
  5 .. 5 + C - 1   the C characters, in code-point order,
  V - 64 .. V - 1  64 T5 sentinels (span i gets V - 1 - i).

Why characters: the corpus is 1.1 MB with 65 distinct characters, so a
character vocabulary is small and complete without a trained tokeniser, adds
no dependency, and spells every speaker name exactly, which the zero- and
few-shot scoring of names needs; a BPE vocabulary would shorten sequences
(about 3x at a few hundred merges) but split names into corpus-dependent
pieces.

Task B's split is drawn once, by speech, from all of the file's speeches of
the ten most frequent speakers (``metacf.data.top_speakers`` of ``'all'``):
``b_test_per_speaker`` speeches per speaker are B's test set and never appear
in the pre-training text; the rest is B's training pool. Pre-training reads
the training split's speeches in the file's own format (``NAME:\\nlines\\n\\n``)
minus B's test speeches; the validation split is the denoising validation
text.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from experiments.common import utils
import metacf.data

PAD, BOS, EOS, MASK, UNK = 0, 1, 2, 3, 4
NUM_SPECIAL = 5
NUM_SENTINELS = 64
NUM_SPEAKERS = 10


class Vocab(NamedTuple):
  """A character vocabulary (see the module docstring)."""
  chars: str

  @property
  def size(self) -> int:
    return NUM_SPECIAL + len(self.chars) + NUM_SENTINELS

  @property
  def sentinel_start(self) -> int:
    """T5's first sentinel: span ``i`` gets ``sentinel_start - i``."""
    return self.size - 1

  def encode(self, text: str) -> np.ndarray:
    """Token ids ``[len(text)]`` (int32); unknown characters are UNK."""
    table = {c: NUM_SPECIAL + i for i, c in enumerate(self.chars)}
    return np.array([table.get(c, UNK) for c in text], np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of ids (special ids and sentinels as ``<k>``)."""
    out = []
    for i in ids:
      i = int(i)
      if NUM_SPECIAL <= i < NUM_SPECIAL + len(self.chars):
        out.append(self.chars[i - NUM_SPECIAL])
      else:
        out.append(f'<{i}>')
    return ''.join(out)


def speech_text(speaker: str, text: str) -> str:
  """A speech in the file's format: ``'NAME:\\nlines\\n\\n'``."""
  return f'{speaker}:\n{text}\n\n'


class TextData(NamedTuple):
  """Everything the experiment reads, as arrays.

  Attributes:
    vocab: The character vocabulary.
    pretrain_tokens: The pre-training text, ``[n]`` int32.
    valid_tokens: The validation split's text, ``[m]`` int32.
    speakers: The ten speaker names, most frequent first.
    b_train: ``{'text': object [N] str, 'label': int32 [N], 'tokens':
      int32 [N, b_length], 'mask': bool [N, b_length]}``, B's pool.
    b_test: The same for B's test set.
  """
  vocab: Vocab
  pretrain_tokens: np.ndarray
  valid_tokens: np.ndarray
  speakers: tuple[str, ...]
  b_train: Mapping[str, np.ndarray]
  b_test: Mapping[str, np.ndarray]


def _pad(ids: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
  out = np.full([length], PAD, np.int32)
  ids = ids[:length]
  out[:len(ids)] = ids
  mask = np.zeros([length], bool)
  mask[:len(ids)] = True
  return out, mask


def _b_set(vocab: Vocab, texts: Sequence[str], labels: Sequence[int],
           length: int) -> dict[str, np.ndarray]:
  pairs = [_pad(vocab.encode(t), length) for t in texts]
  return {'text': np.array(list(texts), dtype=object),
          'label': np.asarray(labels, np.int32),
          'tokens': np.stack([p[0] for p in pairs]),
          'mask': np.stack([p[1] for p in pairs])}


def load(*, b_test_per_speaker: int, b_length: int, split_seed: int = 0,
         raw_dir: str | None = None, data_dir: str | None = None
         ) -> TextData:
  """Loads Tiny Shakespeare through ``metacf.data.load_speeches``.

  Args:
    b_test_per_speaker: Test speeches of each of the ten speakers.
    b_length: B's inputs are a speech's first ``b_length`` characters.
    split_seed: Key of B's train/test draw.
    raw_dir, data_dir: As ``metacf.data.load_speeches``.
  """
  kwargs = {'raw_dir': raw_dir, 'data_dir': data_dir}
  every = metacf.data.load_speeches('all', **kwargs)
  train = metacf.data.load_speeches('train', **kwargs)
  valid = metacf.data.load_speeches('validation', **kwargs)
  speakers = tuple(s for s, _ in metacf.data.top_speakers(every,
                                                          NUM_SPEAKERS))
  rng = utils.numpy_rng(utils.name_key(jax.random.key(split_seed), 'b_split'))
  test_index, b = set(), {'train': ([], []), 'test': ([], [])}
  for label, speaker in enumerate(speakers):
    rows = np.flatnonzero((every.speakers == speaker)
                          & np.array([bool(t) for t in every.texts]))
    rows = rows[rng.permutation(len(rows))]
    if len(rows) <= b_test_per_speaker:
      raise ValueError(f'load: {speaker} has {len(rows)} speeches, not more '
                       f'than b_test_per_speaker={b_test_per_speaker}.')
    for part, chosen in (('test', rows[:b_test_per_speaker]),
                         ('train', np.sort(rows[b_test_per_speaker:]))):
      for r in chosen:
        b[part][0].append(every.texts[r])
        b[part][1].append(label)
      if part == 'test':
        test_index.update(int(every.index[r]) for r in chosen)
  chars = sorted(set(''.join(speech_text(s, t) for s, t in
                             zip(train.speakers, train.texts))))
  vocab = Vocab(''.join(chars))
  pretrain = ''.join(speech_text(s, t) for s, t, i in
                     zip(train.speakers, train.texts, train.index)
                     if int(i) not in test_index)
  valid_text = ''.join(speech_text(s, t) for s, t in
                       zip(valid.speakers, valid.texts))
  return TextData(
      vocab=vocab, pretrain_tokens=vocab.encode(pretrain),
      valid_tokens=vocab.encode(valid_text), speakers=speakers,
      b_train=_b_set(vocab, *b['train'], b_length),
      b_test=_b_set(vocab, *b['test'], b_length))


def shot_indices(labels: np.ndarray, shots: int | None,
                 key: jax.Array) -> np.ndarray:
  """K training examples per speaker (all when ``shots`` is None), nested:
  the K-shot set of a seed is the first K of its per-speaker order."""
  rng = utils.numpy_rng(key)
  out = []
  for c in range(NUM_SPEAKERS):
    rows = np.flatnonzero(labels == c)
    rows = rows[rng.permutation(len(rows))]
    out.append(rows if shots is None else rows[:shots])
  return np.sort(np.concatenate(out))


def name_targets(vocab: Vocab, speakers: Sequence[str]
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Each name's tokens then EOS, ``[10, T]`` padded, and its mask."""
  ids = [np.concatenate([vocab.encode(s), [EOS]]) for s in speakers]
  length = max(len(i) for i in ids)
  pairs = [_pad(np.asarray(i, np.int32), length) for i in ids]
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def windows(tokens: np.ndarray, length: int, count: int,
            key: jax.Array) -> np.ndarray:
  """``count`` windows ``[count, length]`` at uniform random offsets."""
  rng = utils.numpy_rng(key)
  starts = rng.integers(0, len(tokens) - length + 1, size=count)
  return np.stack([tokens[s:s + length] for s in starts])


def cloze_prompts(vocab: Vocab, query: str, demos: Sequence[tuple[str, str]],
                  *, length: int, query_chars: int, demo_chars: int
                  ) -> tuple[np.ndarray, int]:
  """The text a denoiser fills in: ``'<?>:\\nquery\\n\\nNAME:\\ndemo\\n\\n...'``.

  The speaker of ``query`` is the one masked span, at position 0 (the
  caller puts MASK, ``len(name)`` MASKs or a sentinel there); demos follow,
  as many whole ones as fit in ``length`` tokens. Returns the tokens after
  the masked name (``[n]``, no padding) and the number of demos used.
  """
  ids = list(vocab.encode(':\n' + query[:query_chars] + '\n\n'))
  used = 0
  for speaker, text in demos:
    demo = vocab.encode(speech_text(speaker, text[:demo_chars]))
    if len(ids) + len(demo) > length:
      break
    ids.extend(demo)
    used += 1
  return np.asarray(ids[:length], np.int32), used


def check_labels(data: TextData) -> dict[str, Any]:
  """Counts per speaker of B's sets (for the results file)."""
  return {s: {'train': int(np.sum(data.b_train['label'] == c)),
              'test': int(np.sum(data.b_test['label'] == c))}
          for c, s in enumerate(data.speakers)}
