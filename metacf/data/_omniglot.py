"""Parser for the Omniglot zips (Lake et al. 2015), read in place.

Each zip (``images_background.zip``, ``images_evaluation.zip``,
``images_background_small1.zip``, ``images_background_small2.zip``) holds
105x105 1-bit PNGs laid out as::

  <top>/<Alphabet>/characterNN/XXXX_YY.png

where ``<top>`` is the zip's stem, ``NN`` numbers the characters inside an
alphabet, ``XXXX`` is Omniglot's global character number (1..1623, the same
for every drawing of one character) and ``YY`` the drawer (01..20). The zip
is read with :mod:`zipfile` and the PNGs with Pillow; nothing is
extracted.
"""

import dataclasses
import io
import os
import re
import zipfile
import zlib
from collections.abc import Iterator

import numpy as np
from PIL import Image

IMAGE_SIZE = 105
NUM_CHARACTERS = 1623
NUM_DRAWERS = 20

# The 30 background and 20 evaluation alphabets, sorted.
ALPHABETS = (
    'Alphabet_of_the_Magi', 'Angelic', 'Anglo-Saxon_Futhorc', 'Arcadian',
    'Armenian', 'Asomtavruli_(Georgian)', 'Atemayar_Qelisayer', 'Atlantean',
    'Aurek-Besh', 'Avesta', 'Balinese', 'Bengali',
    'Blackfoot_(Canadian_Aboriginal_Syllabics)', 'Braille',
    'Burmese_(Myanmar)', 'Cyrillic', 'Early_Aramaic', 'Futurama', 'Ge_ez',
    'Glagolitic', 'Grantha', 'Greek', 'Gujarati', 'Gurmukhi', 'Hebrew',
    'Inuktitut_(Canadian_Aboriginal_Syllabics)', 'Japanese_(hiragana)',
    'Japanese_(katakana)', 'Kannada', 'Keble', 'Korean', 'Latin',
    'Malay_(Jawi_-_Arabic)', 'Malayalam', 'Manipuri', 'Mkhedruli_(Georgian)',
    'Mongolian', 'N_Ko', 'Ojibwe_(Canadian_Aboriginal_Syllabics)',
    'Old_Church_Slavonic_(Cyrillic)', 'Oriya', 'Sanskrit', 'Sylheti',
    'Syriac_(Estrangelo)', 'Syriac_(Serto)', 'Tagalog', 'Tengwar', 'Tibetan',
    'Tifinagh', 'ULOG')
_ALPHABET_SET = frozenset(ALPHABETS)

_PATTERN = r'{top}/([^/]+)/character(\d+)/(\d{{4}})_(\d{{2}})\.png'


@dataclasses.dataclass(frozen=True, order=True)
class Entry:
  """One drawing; sorts by (character number, drawer)."""
  character: int  # Omniglot's global character number - 1, in [0, 1623).
  drawer: int  # Drawer - 1, in [0, 20).
  alphabet: str
  alphabet_char_id: int  # characterNN - 1.
  member: str  # Path inside the zip.


def _layout(top: str) -> str:
  return f'{top}/<Alphabet>/characterNN/XXXX_YY.png'


def _folder(key: tuple[str, str]) -> str:
  return f'{key[0]}/character{key[1]}'


def _is_ignorable(name: str) -> bool:
  """Directories and archiver litter (``__MACOSX/``, ``.DS_Store``)."""
  base = name.rstrip('/').rsplit('/', 1)[-1]
  return (name.endswith('/') or name.startswith('__MACOSX/')
          or base.startswith('.'))


def list_zip(path: os.PathLike[str] | str, *, top: str, num_characters: int,
             context: str) -> list[Entry]:
  """Lists and validates the drawings in an Omniglot zip.

  Args:
    path: Path to the zip.
    top: Expected top-level folder, e.g. ``'images_background'``.
    num_characters: Expected number of characters; each must have
      :data:`NUM_DRAWERS` drawings.
    context: Prefix of error messages (the calling builder's name).

  Returns:
    The entries, sorted by (character number, drawer).

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: if ``path`` is not a zip or does not have the layout
      ``<top>/<Alphabet>/characterNN/XXXX_YY.png`` with ``num_characters``
      characters of 20 drawings each.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{context}: {path} must exist, got no such file.')
  try:
    with zipfile.ZipFile(path) as zf:
      names = zf.namelist()
  except zipfile.BadZipFile as e:
    raise ValueError(
        f'{context}: {path} must be a zip archive, got a file zipfile cannot '
        f'read ({e}).') from e
  pattern = re.compile(_PATTERN.format(top=re.escape(top)))
  entries = []
  char_of_dir = {}  # (alphabet, characterNN) -> character number.
  dir_of_char = {}
  for name in names:
    if _is_ignorable(name):
      continue
    match = pattern.fullmatch(name)
    if match is None:
      raise ValueError(
          f'{context}: {path} must hold only PNGs laid out as {_layout(top)}, '
          f'got {name!r}.')
    alphabet, char_dir, number, drawer = match.groups()
    if alphabet not in _ALPHABET_SET:
      raise ValueError(
          f'{context}: {path} must hold only Omniglot alphabets, got '
          f'{alphabet!r} in {name!r}.')
    number, drawer = int(number), int(drawer)
    if not 1 <= number <= NUM_CHARACTERS or not 1 <= drawer <= NUM_DRAWERS:
      raise ValueError(
          f'{context}: {path} must name drawings XXXX_YY.png with XXXX in '
          f'[0001, {NUM_CHARACTERS}] and YY in [01, {NUM_DRAWERS}], got '
          f'{name!r}.')
    key = (alphabet, char_dir)
    known_number = char_of_dir.setdefault(key, number)
    known_key = dir_of_char.setdefault(number, key)
    if known_number != number or known_key != key:
      raise ValueError(
          f'{context}: {path} must use one character number XXXX per '
          f'character folder, got {name!r} where '
          f'{_folder(key)} is {known_number:04d} and {number:04d} is '
          f'{_folder(known_key)}.')
    entries.append(
        Entry(character=number - 1, drawer=drawer - 1, alphabet=alphabet,
              alphabet_char_id=int(char_dir) - 1, member=name))
  if not entries:
    raise ValueError(
        f'{context}: {path} must hold PNGs laid out as {_layout(top)}, got '
        f'none among its {len(names)} members.')
  entries.sort()
  num_images = num_characters * NUM_DRAWERS
  drawers = {}
  for e in entries:
    drawers.setdefault(e.character, set()).add(e.drawer)
  incomplete = [c for c, d in drawers.items() if len(d) != NUM_DRAWERS]
  if (len(entries) != num_images or len(drawers) != num_characters
      or incomplete):
    raise ValueError(
        f'{context}: {path} must hold {num_characters} characters x '
        f'{NUM_DRAWERS} drawers = {num_images} PNGs, got {len(drawers)} '
        f'characters and {len(entries)} PNGs'
        + (f' (character {incomplete[0] + 1:04d} has '
           f'{len(drawers[incomplete[0]])} drawers)' if incomplete else '')
        + '.')
  return entries


def read_images(path: os.PathLike[str] | str, entries: list[Entry], *,
                context: str) -> Iterator[tuple[Entry, np.ndarray]]:
  """Yields ``(entry, image)``, ``image`` uint8 ``[105, 105]`` in {0, 255}.

  The 1-bit PNGs become 8-bit grayscale as Pillow's mode ``'L'``: 255 is the
  white background, 0 the stroke (not inverted).

  Args:
    path: Path to the zip.
    entries: From :func:`list_zip`.
    context: Prefix of error messages.

  Raises:
    ValueError: if a member fails the zip's CRC check, is not a PNG, or is
      not 105x105.
  """
  path = os.fspath(path)
  with zipfile.ZipFile(path) as zf:
    for entry in entries:
      try:
        png = zf.read(entry.member)
        with Image.open(io.BytesIO(png), formats=('PNG',)) as img:
          image = np.asarray(img.convert('L'))
      except (OSError, SyntaxError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(
            f'{context}: {path} must hold valid PNGs, got {entry.member!r} '
            f'that cannot be decoded ({e}).') from e
      if image.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f'{context}: {path} must hold {IMAGE_SIZE}x{IMAGE_SIZE} images, '
            f'got {image.shape[1]}x{image.shape[0]} in {entry.member!r}.')
      yield entry, image
