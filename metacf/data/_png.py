"""Minimal grayscale PNG codec, fast for the small images of this package.

Pillow's Python overhead per image dominates for 28x28 digits (see the
benchmarks page). :func:`encode_gray` writes a standard 8-bit grayscale PNG with filter
type 0 (None) on every row, so :func:`decode_gray` can read such files with one
``zlib.decompress``. Any other PNG (other bit depths, filters, colour types,
interlacing) is decoded with Pillow, so every valid PNG is accepted.
"""

import io
import struct
import zlib

import numpy as np
from PIL import Image

_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# IHDR fields after width and height: bit depth 8, colour type 0 (grayscale),
# compression 0, filter method 0, no interlace.
_GRAY8 = b'\x08\x00\x00\x00\x00'


def _chunk(kind: bytes, data: bytes) -> bytes:
  return (struct.pack('>I', len(data)) + kind + data +
          struct.pack('>I', zlib.crc32(kind + data)))


def encode_gray(image: np.ndarray) -> bytes:
  """Encodes a ``uint8 [H, W]`` array as an 8-bit grayscale PNG.

  zlib level 1: faster than level 6 on 105x105 Omniglot images, for files
  about twice as large (see the benchmarks page).
  """
  height, width = image.shape
  rows = np.zeros((height, width + 1), np.uint8)  # Leading 0: filter None.
  rows[:, 1:] = image
  return b''.join((
      _SIGNATURE,
      _chunk(b'IHDR', struct.pack('>II', width, height) + _GRAY8),
      _chunk(b'IDAT', zlib.compress(rows.tobytes(), 1)),
      _chunk(b'IEND', b''),
  ))


def _decode_fast(png: bytes) -> np.ndarray | None:
  """Decodes what :func:`encode_gray` writes; None for anything else."""
  # Signature (8) + IHDR chunk (8 + 13 + 4) + IDAT length and type (8).
  if len(png) < 45 or png[:8] != _SIGNATURE or png[12:16] != b'IHDR':
    return None
  width, height = struct.unpack('>II', png[16:24])
  if png[24:29] != _GRAY8 or png[37:41] != b'IDAT':
    return None
  (idat_len,) = struct.unpack('>I', png[33:37])
  if png[41 + idat_len + 8:41 + idat_len + 12] != b'IEND':
    return None  # Several IDAT chunks or ancillary chunks: let Pillow do it.
  try:
    raw = zlib.decompress(png[41:41 + idat_len])
  except zlib.error:
    return None
  if len(raw) != height * (width + 1):
    return None
  rows = np.frombuffer(raw, np.uint8).reshape(height, width + 1)
  if rows[:, 0].any():
    return None  # Some row uses a filter other than None.
  return rows[:, 1:]


def decode_gray(png: bytes) -> np.ndarray:
  """Decodes a grayscale PNG to ``uint8 [H, W]``.

  1-bit images decode to {0, 255}, as Pillow's conversion to mode ``'L'``.
  """
  image = _decode_fast(png)
  if image is not None:
    return image
  with Image.open(io.BytesIO(png)) as img:
    return np.asarray(img.convert('L'))
