"""Real MNIST, Fashion-MNIST and Omniglot through tfds, without TensorFlow.

The builders ``metacf_mnist``, ``metacf_fashion_mnist`` and
``metacf_omniglot`` parse the original raw files (gzip IDX files; Omniglot's
PNG zips) with Python, NumPy and Pillow, write ``array_record`` files and are
read back with ``builder.as_data_source()``. Raw files come from a local
folder (``raw_dir=`` or ``$METACF_RAW_DIR``)::

  <raw_dir>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
  <raw_dir>/fashion_mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
  <raw_dir>/omniglot/images_{background,evaluation}.zip
  <raw_dir>/omniglot/images_background_small{1,2}.zip

or, without one, from the original hosts through the tfds download manager,
checked against the sha256 that tfds registers for its own builders. This is
the only ``metacf`` module that imports ``tensorflow_datasets``;
``import metacf`` does not import it.

Example::

  import numpy as np
  import metacf.data

  train = metacf.data.load_arrays('mnist', 'train', raw_dir='/data/raw',
                                  dtype=np.float32)
  train.images.shape, train.labels.shape   # (60000, 28, 28, 1), (60000,)

  omniglot = metacf.data.load_arrays('omniglot', 'background')
  images = omniglot.images.reshape(964, 20, 105, 105)  # [character, drawer]

  # Random access without loading a whole split:
  builder = metacf.data.get_builder('fashion_mnist', data_dir='/data/tfds')
  builder.download_and_prepare()
  example = builder.as_data_source('test')[0]   # {'image': ..., 'label': ...}

References:
  LeCun et al., `Gradient-based learning applied to document recognition
  <http://yann.lecun.com/exdb/publis/pdf/lecun-98.pdf>`_, Proceedings of the
  IEEE, 1998 (MNIST)

  Xiao et al., `Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
  Learning Algorithms <https://arxiv.org/abs/1708.07747>`_, 2017

  Lake et al., `Human-level concept learning through probabilistic program
  induction <https://doi.org/10.1126/science.aab3050>`_, Science, 2015
  (Omniglot)
"""

try:
  import tensorflow_datasets as _tfds  # pylint: disable=unused-import
except ImportError as e:  # pragma: no cover - exercised in a bare install
  raise ImportError(
      'metacf.data needs tensorflow-datasets, pillow, importlib_resources and '
      "array_record: pip install 'metacf[data]'.") from e

from metacf.data import _arrays
from metacf.data._arrays import DatasetArrays as DatasetArrays
from metacf.data._arrays import get_builder as get_builder
from metacf.data._arrays import load_arrays as load_arrays
from metacf.data._builders import MetacfFashionMnist as MetacfFashionMnist
from metacf.data._builders import MetacfMnist as MetacfMnist
from metacf.data._builders import MetacfOmniglot as MetacfOmniglot

#: Dataset names accepted by :func:`load_arrays`, with their splits
#: (``{'mnist': ('train', 'test'), 'fashion_mnist': ..., 'omniglot': ...}``).
SPLITS = _arrays.SPLITS

__all__ = [
    'DatasetArrays',
    'MetacfFashionMnist',
    'MetacfMnist',
    'MetacfOmniglot',
    'SPLITS',
    'get_builder',
    'load_arrays',
]
