"""TFDS builders for MNIST, Fashion-MNIST, Omniglot and Tiny Shakespeare.

Each builder parses the original raw files (gzip IDX for MNIST and
Fashion-MNIST, PNG zips for Omniglot, a text file for Tiny Shakespeare) with
Python and NumPy only, writes ``array_record`` files and is read back with
``builder.as_data_source()``; none needs TensorFlow.
The raw files come either from a local directory (``raw_dir=`` or
``$METACF_RAW_DIR``, laid out as ``<raw_dir>/mnist/*.gz``,
``<raw_dir>/fashion_mnist/*.gz``, ``<raw_dir>/omniglot/*.zip``,
``<raw_dir>/tiny_shakespeare/input.txt``) or, when no directory is given,
from the original hosts through the tfds download manager, which checks them
against ``checksums.tsv`` (the URLs, sizes and sha256 that tfds registers for
its own ``mnist``, ``fashion_mnist``, ``omniglot`` and ``tiny_shakespeare``).
Both paths feed the same parser.

The builders are registered as ``metacf_mnist``, ``metacf_fashion_mnist``,
``metacf_omniglot`` and ``metacf_tiny_shakespeare`` so they never collide
with tfds's own builders. Examples are written in file order
(``disable_shuffling=True``).
"""

import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from metacf.data import _idx
from metacf.data import _omniglot
from metacf.data import _png
from metacf.data import _shakespeare

RAW_DIR_ENV = 'METACF_RAW_DIR'

_MNIST_CITATION = """\
@article{lecun1998gradient,
  title={Gradient-based learning applied to document recognition},
  author={LeCun, Yann and Bottou, L{\\'e}on and Bengio, Yoshua and Haffner, Patrick},
  journal={Proceedings of the IEEE},
  volume={86},
  number={11},
  pages={2278--2324},
  year={1998}
}
"""

_FASHION_MNIST_CITATION = """\
@article{xiao2017fashion,
  title={Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
         Algorithms},
  author={Xiao, Han and Rasul, Kashif and Vollgraf, Roland},
  journal={arXiv preprint arXiv:1708.07747},
  year={2017}
}
"""

_OMNIGLOT_CITATION = """\
@article{lake2015human,
  title={Human-level concept learning through probabilistic program induction},
  author={Lake, Brenden M and Salakhutdinov, Ruslan and Tenenbaum, Joshua B},
  journal={Science},
  volume={350},
  number={6266},
  pages={1332--1338},
  year={2015}
}
"""


_TINY_SHAKESPEARE_CITATION = """\
@misc{karpathy2015charrnn,
  author={Karpathy, Andrej},
  title={char-rnn},
  year={2015},
  howpublished={\\url{https://github.com/karpathy/char-rnn}}
}
"""


def resolve_raw_dir(raw_dir: os.PathLike[str] | str | None) -> str | None:
  """``raw_dir``, else ``$METACF_RAW_DIR``, else None (download)."""
  if raw_dir is None:
    raw_dir = os.environ.get(RAW_DIR_ENV) or None
  return None if raw_dir is None else os.fspath(raw_dir)


class _RawFileBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builder whose raw files come from ``raw_dir`` or from the internet.

  Subclasses set ``RAW_SUBDIR`` (folder under ``raw_dir``), ``URL`` (host
  folder of the files, registered in ``checksums.tsv``) and
  ``FILE_DESCRIPTION`` (for error messages), and call :meth:`_raw_paths`.
  """

  RAW_SUBDIR: str
  URL: str
  FILE_DESCRIPTION: str

  def __init__(self, *, raw_dir: os.PathLike[str] | str | None = None,
               **kwargs: Any):
    """Creates the builder.

    Args:
      raw_dir: Folder holding ``<RAW_SUBDIR>/<raw files>``. Defaults to
        ``$METACF_RAW_DIR``; if neither is set, the raw files are downloaded
        from their original hosts and checked against their registered
        sha256. Only read when the dataset is prepared.
      **kwargs: Forwarded to ``tfds.core.GeneratorBasedBuilder`` (``data_dir``,
        ``file_format``, ...).
    """
    self._raw_dir = resolve_raw_dir(raw_dir)
    super().__init__(**kwargs)
    # Keeps pickling (`__getstate__` re-calls `__init__`) faithful.
    self._original_state['raw_dir'] = self._raw_dir

  @property
  def raw_dir(self) -> str | None:
    """Local folder of raw files, or None to download them."""
    return self._raw_dir

  def _raw_paths(self, dl_manager: tfds.download.DownloadManager,
                 filenames: Mapping[str, str]) -> dict[str, str]:
    """Returns local paths of the raw files, keyed like ``filenames``.

    Offline (``raw_dir`` set) the files are taken as they are: no checksum,
    since e.g. the staged Omniglot zips are re-packed, not byte-identical.
    Online they are downloaded, and tfds verifies size and sha256.
    """
    if self._raw_dir is None:
      paths = dl_manager.download(
          {key: self.URL + fname for key, fname in filenames.items()})
      return {key: os.fspath(path) for key, path in paths.items()}
    folder = os.path.join(self._raw_dir, self.RAW_SUBDIR)
    paths = {}
    for key, fname in filenames.items():
      path = os.path.join(folder, fname)
      if not os.path.isfile(path):
        raise FileNotFoundError(
            f'{self.name}: {path} must exist (expected the '
            f'{self.FILE_DESCRIPTION} {fname} from raw_dir={self._raw_dir}, '
            f'laid out as <raw_dir>/{self.RAW_SUBDIR}/{fname}), got no such '
            'file.')
      paths[key] = path
    return paths


class _IdxBuilder(_RawFileBuilder, skip_registration=True):
  """Common code of MNIST and Fashion-MNIST: four gzip IDX files."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Parses the original IDX files without TF.'}
  FILE_DESCRIPTION = 'IDX file'
  IMAGE_SIZE = 28
  CLASS_NAMES: tuple[str, ...]
  _FILES = {
      'train_images': 'train-images-idx3-ubyte.gz',
      'train_labels': 'train-labels-idx1-ubyte.gz',
      'test_images': 't10k-images-idx3-ubyte.gz',
      'test_labels': 't10k-labels-idx1-ubyte.gz',
  }

  def _features(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        'image': tfds.features.Image(
            shape=(self.IMAGE_SIZE, self.IMAGE_SIZE, 1),
            encoding_format='png'),
        'label': tfds.features.ClassLabel(names=self.CLASS_NAMES),
    })

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    paths = self._raw_paths(dl_manager, self._FILES)
    splits = {}
    for split in ('train', 'test'):
      # Parsed here, before tfds opens any output, so a bad file fails fast.
      images, labels = _idx.read_idx_pair(
          paths[f'{split}_images'], paths[f'{split}_labels'],
          image_shape=(self.IMAGE_SIZE, self.IMAGE_SIZE),
          num_classes=len(self.CLASS_NAMES), context=self.name)
      splits[split] = self._generate_examples(images, labels)
    return splits

  def _generate_examples(
      self, images: np.ndarray,
      labels: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {'image': _png.encode_gray(image), 'label': int(label)}


class MetacfMnist(_IdxBuilder):
  """MNIST handwritten digits, parsed from the original IDX files.

  60,000 train and 10,000 test grayscale 28x28 images of the digits 0-9.
  Features: ``image`` (uint8 ``[28, 28, 1]``, 0 = background), ``label``.

  References:
    LeCun et al., `Gradient-based learning applied to document recognition
    <http://yann.lecun.com/exdb/publis/pdf/lecun-98.pdf>`_, Proceedings of
    the IEEE, 1998
  """

  RAW_SUBDIR = 'mnist'
  URL = 'https://storage.googleapis.com/cvdf-datasets/mnist/'
  FILE_DESCRIPTION = 'MNIST IDX file'
  CLASS_NAMES = tuple(str(i) for i in range(10))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='The MNIST database of handwritten digits (LeCun et al. '
        '1998), parsed from the original IDX files without TensorFlow.',
        features=self._features(),
        supervised_keys=('image', 'label'),
        homepage='http://yann.lecun.com/exdb/mnist/',
        citation=_MNIST_CITATION,
        disable_shuffling=True,
    )


class MetacfFashionMnist(_IdxBuilder):
  """Fashion-MNIST, parsed from the original IDX files.

  60,000 train and 10,000 test grayscale 28x28 images of 10 kinds of
  Zalando articles, in MNIST's file format.

  References:
    Xiao et al., `Fashion-MNIST: a Novel Image Dataset for Benchmarking
    Machine Learning Algorithms <https://arxiv.org/abs/1708.07747>`_, 2017
  """

  RAW_SUBDIR = 'fashion_mnist'
  URL = 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'
  FILE_DESCRIPTION = 'Fashion-MNIST IDX file'
  CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Fashion-MNIST (Xiao et al. 2017): 28x28 grayscale '
        'images of 10 kinds of Zalando articles, parsed from the original '
        'IDX files without TensorFlow.',
        features=self._features(),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
        citation=_FASHION_MNIST_CITATION,
        disable_shuffling=True,
    )


# split -> (zip stem, number of characters).
OMNIGLOT_SPLITS = {
    'background': ('images_background', 964),
    'evaluation': ('images_evaluation', 659),
    'small1': ('images_background_small1', 136),
    'small2': ('images_background_small2', 156),
}


class MetacfOmniglot(_RawFileBuilder):
  """Omniglot handwritten characters, parsed from the original zips.

  1623 characters from 50 alphabets, each drawn once by 20 people, as
  105x105 binary images. Splits: ``background`` (30 alphabets, 964
  characters, 19,280 images), ``evaluation`` (20 alphabets, 659 characters,
  13,180 images) and the reduced background sets ``small1`` (5 alphabets,
  136 characters) and ``small2`` (5 alphabets, 156 characters).
  Examples are ordered by character number, then drawer.

  Features:

  * ``image``: uint8 ``[105, 105, 1]``, 255 for the white background and 0
    for the stroke (the original 1-bit PNGs, as 8-bit grayscale).
  * ``label``: Omniglot's global character number minus one, in
    ``[0, 1623)`` (the ``XXXX`` in ``XXXX_YY.png``; background characters
    are 0..963, evaluation characters 964..1622).
  * ``alphabet``: Index into the 50 alphabet names, sorted.
  * ``alphabet_char_id``: Character number inside its alphabet minus one.
  * ``drawer``: Drawer minus one, in ``[0, 20)``.

  References:
    Lake et al., `Human-level concept learning through probabilistic program
    induction <https://doi.org/10.1126/science.aab3050>`_, Science, 2015
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Parses the original zips without TF.'}
  RAW_SUBDIR = 'omniglot'
  URL = 'https://github.com/brendenlake/omniglot/raw/master/python/'
  FILE_DESCRIPTION = 'Omniglot zip'

  def _info(self) -> tfds.core.DatasetInfo:
    size = _omniglot.IMAGE_SIZE
    return tfds.core.DatasetInfo(
        builder=self,
        description='Omniglot (Lake et al. 2015): 1623 handwritten '
        'characters from 50 alphabets, 20 drawers each, parsed from the '
        'original zips without TensorFlow.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 1),
                                         encoding_format='png'),
            'label': tfds.features.ClassLabel(
                num_classes=_omniglot.NUM_CHARACTERS),
            'alphabet': tfds.features.ClassLabel(names=_omniglot.ALPHABETS),
            'alphabet_char_id': np.int32,
            'drawer': np.int32,
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/brendenlake/omniglot',
        citation=_OMNIGLOT_CITATION,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    paths = self._raw_paths(
        dl_manager,
        {split: f'{stem}.zip' for split, (stem, _) in OMNIGLOT_SPLITS.items()})
    splits = {}
    for split, (stem, num_characters) in OMNIGLOT_SPLITS.items():
      # Listed and validated here, before tfds opens any output.
      entries = _omniglot.list_zip(paths[split], top=stem,
                                   num_characters=num_characters,
                                   context=self.name)
      splits[split] = self._generate_examples(paths[split], entries)
    return splits

  def _generate_examples(
      self, path: str, entries: list[_omniglot.Entry]
  ) -> Iterator[tuple[int, dict[str, Any]]]:
    images = _omniglot.read_images(path, entries, context=self.name)
    for index, (entry, image) in enumerate(images):
      yield index, {
          'image': _png.encode_gray(image),
          'label': entry.character,
          'alphabet': entry.alphabet,
          'alphabet_char_id': entry.alphabet_char_id,
          'drawer': entry.drawer,
      }


class MetacfTinyShakespeare(_RawFileBuilder):
  """Tiny Shakespeare, one example per speech.

  Karpathy's ``input.txt`` (1,115,394 characters, 40,000 lines from
  Shakespeare's plays; the file tfds's own ``tiny_shakespeare`` downloads,
  same URL and sha256) is a sequence of blocks separated by blank lines,
  each a line ``SPEAKER:`` followed by the speech. It holds 7,222 speeches
  by 309 speakers; 125 are empty (a speaker line directly followed by a
  blank line: the speech's lines are missing from the corpus).

  Features:

  * ``speaker``: Text, the speaker line without its colon
    (``'First Citizen'``, ``'KING RICHARD III'``).
  * ``text``: Text, the speech's lines joined by ``'\\n'``, without the
    speaker line and without a final newline (``''`` for an empty speech).
  * ``index``: int32, the speech's position among the file's speeches,
    0-based (also the example's key).

  Splits are contiguous, by speech: 6,283 ``train``, 440 ``validation``
  and 499 ``test`` speeches. A speech goes to the split of tfds's
  ``tiny_shakespeare`` (the first 90 % of the characters, the next 5 %,
  the last 5 %) in which its speaker line starts. Contiguous splits keep
  the plays of one split out of the others, but for the play the cuts fall
  in: train holds every play up to the start of *The Taming of the
  Shrew*, validation the middle of the Shrew, test its end and the first
  scenes of *The Tempest*. That limits the leakage a random split by
  speech would have (the neighbouring lines of the same scene, the same
  speaker's running thought); cutting where tfds cuts keeps the text
  comparable with character-level results on tfds's splits. The price:
  most speakers appear in one split only (of the 10 most frequent, all
  but PETRUCHIO are train-only), so a speaker-attribution task draws its
  own examples per speaker (from ``metacf.data.load_speeches('all')``).

  References:
    Karpathy, `char-rnn <https://github.com/karpathy/char-rnn>`_, 2015;
    `The Unreasonable Effectiveness of Recurrent Neural Networks
    <https://karpathy.github.io/2015/05/21/rnn-effectiveness/>`_, 2015
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Speeches of the original input.txt, no TF.'}
  RAW_SUBDIR = 'tiny_shakespeare'
  URL = ('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/'
         'tinyshakespeare/')
  FILE_DESCRIPTION = 'Tiny Shakespeare text file'
  _FILENAME = 'input.txt'

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Tiny Shakespeare (Karpathy 2015), the char-rnn corpus '
        'of 40,000 lines from Shakespeare\'s plays, as speeches: speaker, '
        'text and position in the file. Parsed without TensorFlow.',
        features=tfds.features.FeaturesDict({
            'speaker': tfds.features.Text(),
            'text': tfds.features.Text(),
            'index': np.int32,
        }),
        supervised_keys=('text', 'speaker'),
        homepage='https://github.com/karpathy/char-rnn/blob/master/data/'
        'tinyshakespeare/input.txt',
        citation=_TINY_SHAKESPEARE_CITATION,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    path = self._raw_paths(dl_manager, {'text': self._FILENAME})['text']
    context = f'{self.name}: {path}'
    # Parsed here, before tfds opens any output, so a bad file fails fast.
    with open(path, 'rb') as f:
      data = f.read()
    try:
      text = data.decode('utf-8')
    except UnicodeDecodeError as e:
      raise ValueError(
          f'{context} must be UTF-8 text, got undecodable bytes ({e}).'
      ) from e
    speeches = _shakespeare.parse_speeches(text, context=context)
    indices = _shakespeare.assign_splits(speeches, len(text))
    counts = {split: len(ids) for split, ids in indices.items()}
    if not all(counts.values()):  # tfds cannot write an empty split.
      raise ValueError(
          f'{context} must hold speeches starting in each split (the first '
          f'90 %, the next 5 % and the last 5 % of its characters), got '
          f'{counts} from {len(speeches)} speeches.')
    return {split: self._generate_examples(speeches, indices[split])
            for split in _shakespeare.SPLITS}

  def _generate_examples(
      self, speeches: list[_shakespeare.Speech],
      indices: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    for index in indices:
      speech = speeches[index]
      yield index, {'speaker': speech.speaker, 'text': speech.text,
                    'index': index}
