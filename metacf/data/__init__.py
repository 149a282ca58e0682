"""Real MNIST, Fashion-MNIST, Omniglot and Tiny Shakespeare through tfds.

The builders ``metacf_mnist``, ``metacf_fashion_mnist``, ``metacf_omniglot``
and ``metacf_tiny_shakespeare`` parse the original raw files (gzip IDX files;
Omniglot's PNG zips; Karpathy's ``input.txt``) with Python, NumPy and Pillow,
write ``array_record`` files and are read back with
``builder.as_data_source()``, without TensorFlow. Raw files come from a local
folder (``raw_dir=`` or ``$METACF_RAW_DIR``)::

  <raw_dir>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
  <raw_dir>/fashion_mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
  <raw_dir>/omniglot/images_{background,evaluation}.zip
  <raw_dir>/omniglot/images_background_small{1,2}.zip
  <raw_dir>/tiny_shakespeare/input.txt

or, without one, from the original hosts through the tfds download manager,
checked against the sha256 that tfds registers for its own builders. This is
the only ``metacf`` module that imports ``tensorflow_datasets``, and only to
prepare a dataset (a builder, or :func:`load_arrays` or
:func:`load_speeches` without its cache); ``import metacf`` does not import
it.

:func:`load_arrays` returns a whole split as arrays:
``load_arrays('mnist', 'train', dtype=np.float32)`` gives ``images`` of
shape ``(60000, 28, 28, 1)`` in ``[0, 1]`` and ``labels`` of shape
``(60000,)``; Omniglot's ``'background'`` split has 964 characters of 20
drawers each (``images.reshape(964, 20, 105, 105)``). For random access
without loading a whole split, :func:`get_builder` returns the tfds builder;
``download_and_prepare()`` then ``as_data_source(split)[i]`` reads one
example (``{'image': ..., 'label': ...}``).

Tiny Shakespeare comes as speeches: :func:`load_speeches` returns a split's
:class:`Speeches` (``speakers``, ``texts``, ``index``), cached like
:func:`load_arrays`; ``load_speeches('train')`` has 6,283 of the file's
7,222 speeches (validation 440, test 499: contiguous, cut where tfds's own
``tiny_shakespeare`` cuts). :func:`top_speakers` counts the non-empty
speeches per speaker: ``top_speakers(load_speeches('all'))[0]`` is
``('GLOUCESTER', 211)``.

The example below runs without any data (nothing is read until a builder is
prepared).

Examples:
  >>> import tempfile
  >>> import metacf.data
  >>> metacf.data.SPLITS['mnist'], metacf.data.SPLITS['omniglot']
  (('train', 'test'), ('background', 'evaluation', 'small1', 'small2'))
  >>> metacf.data.SPLITS['tiny_shakespeare']
  ('train', 'validation', 'test')
  >>> builder = metacf.data.get_builder('mnist', data_dir=tempfile.mkdtemp())
  >>> builder.name, builder.info.features['image'].shape
  ('metacf_mnist', (28, 28, 1))

References:
  LeCun et al., `Gradient-based learning applied to document recognition
  <http://yann.lecun.com/exdb/publis/pdf/lecun-98.pdf>`_, Proceedings of the
  IEEE, 1998 (MNIST)

  Xiao et al., `Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
  Learning Algorithms <https://arxiv.org/abs/1708.07747>`_, 2017

  Lake et al., `Human-level concept learning through probabilistic program
  induction <https://doi.org/10.1126/science.aab3050>`_, Science, 2015
  (Omniglot)

  Karpathy, `char-rnn <https://github.com/karpathy/char-rnn>`_, 2015 (Tiny
  Shakespeare)
"""

from typing import Any

from metacf.data import _arrays
from metacf.data._arrays import DatasetArrays as DatasetArrays
from metacf.data._arrays import get_builder as get_builder
from metacf.data._arrays import load_arrays as load_arrays
from metacf.data._shakespeare import Speeches as Speeches
from metacf.data._shakespeare import load_speeches as load_speeches
from metacf.data._shakespeare import top_speakers as top_speakers

#: Dataset names with their splits, e.g. ``SPLITS['mnist'] == ('train',
#: 'test')``: :func:`load_arrays` loads the image datasets, and
#: :func:`load_speeches` loads ``tiny_shakespeare``.
SPLITS = _arrays.SPLITS

# The builders import tensorflow-datasets: loaded on first use, so that the
# cached arrays load without it (see load_arrays).
_LAZY_BUILDERS = ('MetacfFashionMnist', 'MetacfMnist', 'MetacfOmniglot',
                  'MetacfTinyShakespeare')


def __getattr__(name: str) -> Any:
  if name in _LAZY_BUILDERS:
    return getattr(_arrays.import_builders(), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    'DatasetArrays',
    'MetacfFashionMnist',
    'MetacfMnist',
    'MetacfOmniglot',
    'MetacfTinyShakespeare',
    'SPLITS',
    'Speeches',
    'get_builder',
    'load_arrays',
    'load_speeches',
    'top_speakers',
]
