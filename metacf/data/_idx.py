"""Parser for the gzip-compressed IDX files of MNIST and Fashion-MNIST.

The IDX format (LeCun et al. 1998) is a big-endian header followed by raw
values: a 4-byte magic number ``0x0000TTNN`` (``TT`` the value type, ``0x08``
for unsigned bytes; ``NN`` the number of dimensions), then one 4-byte size per
dimension, then ``prod(sizes)`` values in row-major order. Only Python's
``gzip`` and NumPy are used, so no TensorFlow is needed.

Every check raises ``ValueError`` naming the file and what was expected, so a
corrupt or truncated download never becomes a silently wrong dataset.
"""

import gzip
import os
import zlib

import numpy as np

_UBYTE = 0x08
_IMAGES_NDIM = 3
_LABELS_NDIM = 1


def _read_gzip(path: os.PathLike[str] | str, context: str) -> bytes:
  """Returns the decompressed bytes of ``path``."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{context}: {os.fspath(path)} must exist, got no such file.')
  try:
    with gzip.open(path, 'rb') as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(
        f'{context}: {os.fspath(path)} must be a gzip-compressed IDX file, '
        f'got a file gzip cannot read ({e}).') from e


def read_idx(path: os.PathLike[str] | str, *, ndim: int,
             context: str) -> np.ndarray:
  """Reads a gzip-compressed IDX file of unsigned bytes.

  Args:
    path: Path to the ``.gz`` file.
    ndim: Expected number of dimensions (3 for images, 1 for labels).
    context: Prefix of error messages (the calling builder's name).

  Returns:
    A read-only ``uint8`` array whose shape is the one in the file's header.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: if the file is not gzip, has the wrong magic number, or holds
      fewer or more values than its header announces.
  """
  data = _read_gzip(path, context)
  path = os.fspath(path)
  expected_magic = (_UBYTE << 8) | ndim
  if len(data) < 4:
    raise ValueError(
        f'{context}: {path} must start with the 4-byte IDX magic number '
        f'0x{expected_magic:08x}, got only {len(data)} bytes.')
  magic = int.from_bytes(data[:4], 'big')
  if magic != expected_magic:
    raise ValueError(
        f'{context}: {path} must start with the IDX magic number '
        f'0x{expected_magic:08x} (unsigned bytes, {ndim} dimensions), got '
        f'0x{magic:08x}.')
  header_size = 4 + 4 * ndim
  if len(data) < header_size:
    raise ValueError(
        f'{context}: {path} must have a {header_size}-byte IDX header, got '
        f'{len(data)} bytes.')
  shape = tuple(
      int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  num_values = int(np.prod(shape, dtype=np.int64))
  if len(data) - header_size != num_values:
    raise ValueError(
        f'{context}: {path} must hold {num_values} values after its '
        f'{header_size}-byte header (shape {shape}), got '
        f'{len(data) - header_size}.')
  return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape)


def read_idx_pair(images_path: os.PathLike[str] | str,
                  labels_path: os.PathLike[str] | str, *,
                  image_shape: tuple[int, int], num_classes: int,
                  context: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads matching image and label IDX files.

  Args:
    images_path: ``*-images-idx3-ubyte.gz``.
    labels_path: ``*-labels-idx1-ubyte.gz``.
    image_shape: Expected ``(rows, cols)`` of every image.
    num_classes: Labels must lie in ``[0, num_classes)``.
    context: Prefix of error messages.

  Returns:
    ``(images, labels)``: ``uint8`` arrays of shapes ``[N, rows, cols]`` and
    ``[N]``.

  Raises:
    FileNotFoundError: if a file does not exist.
    ValueError: if a file is corrupt, or the two files do not match.
  """
  images = read_idx(images_path, ndim=_IMAGES_NDIM, context=context)
  if images.shape[1:] != tuple(image_shape):
    raise ValueError(
        f'{context}: {os.fspath(images_path)} must hold images of shape '
        f'{image_shape[0]}x{image_shape[1]}, got '
        f'{images.shape[1]}x{images.shape[2]}.')
  labels = read_idx(labels_path, ndim=_LABELS_NDIM, context=context)
  if labels.shape[0] != images.shape[0]:
    raise ValueError(
        f'{context}: {os.fspath(labels_path)} must hold one label per image '
        f'of {os.fspath(images_path)} ({images.shape[0]}), got '
        f'{labels.shape[0]}.')
  if labels.size and int(labels.max()) >= num_classes:
    raise ValueError(
        f'{context}: {os.fspath(labels_path)} must hold labels in '
        f'[0, {num_classes - 1}], got {int(labels.max())}.')
  return images, labels
