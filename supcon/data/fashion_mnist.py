"""Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017) read from its four original IDX files.

Nothing is downloaded. The files are read from ``--data_folder`` when it is given (directly in
it, or in torchvision's ``FashionMNIST/raw/`` under it), else from the folder of the Debian
package ``dataset-fashion-mnist``; each may be gzip-compressed (``.gz``) or not. The IDX format
is parsed here, strictly: a big-endian header (magic number 2051 for images, 2049 for labels,
then the sizes of the dimensions), then one unsigned byte per pixel or label. A file that does
not match what Fashion-MNIST is (28x28 images, labels 0-9, as many labels as images, exactly the
bytes the header announces) is refused with one line naming it and the fix.
"""

import gzip
import os
import struct
import zlib
from functools import lru_cache

import numpy as np

from supcon.errors import UserError

DEBIAN_FOLDER = '/usr/share/datasets/fashion-mnist'
INSTALL = 'apt-get install dataset-fashion-mnist'
REINSTALL = 'apt-get install --reinstall dataset-fashion-mnist'
SOURCE = 'https://github.com/zalandoresearch/fashion-mnist'
# the data set authors' names, in label order
CLASSES = (
    'T-shirt/top',
    'Trouser',
    'Pullover',
    'Dress',
    'Coat',
    'Sandal',
    'Shirt',
    'Sneaker',
    'Bag',
    'Ankle boot',
)
FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # 0x0803: unsigned bytes, 3 dims; 0x0801: 1 dim
SIDE = 28
RAW_LAYOUT = os.path.join('FashionMNIST', 'raw')  # where torchvision's FashionMNIST keeps them


def default_folder(data_folder: str | None) -> str:
    """The folder to read: ``data_folder`` when given, else the Debian package's."""
    return DEBIAN_FOLDER if data_folder is None else os.fspath(data_folder)


def _is_debian(folder):
    return os.path.abspath(folder) == os.path.abspath(DEBIAN_FOLDER)


def _fix(folder):
    """What to do about a bad or missing file in ``folder``."""
    if _is_debian(folder):
        return f'reinstall the package (`{REINSTALL}`) or pass --data_folder'
    return f'replace it with the original file from {SOURCE}'


def _locate(folder, split):
    """The (images, labels) paths of ``split``: in ``folder`` or its FashionMNIST/raw, each
    uncompressed or ``.gz``; the first of the two folders that holds any of the files is used."""
    names = [name + ext for pair in FILES.values() for name in pair for ext in ('', '.gz')]
    places = [folder, os.path.join(folder, RAW_LAYOUT)]
    holds = [p for p in places if any(os.path.isfile(os.path.join(p, n)) for n in names)]
    if not holds and _is_debian(folder):
        raise UserError(
            f'--dataset fashion_mnist: no Fashion-MNIST files in {folder}; install them with'
            f' `{INSTALL}`, or pass --data_folder with the four IDX files'
        )
    if not holds:
        what = 'is not a folder'
        if os.path.isdir(folder):
            what = f'holds no Fashion-MNIST IDX file (nor does its {RAW_LAYOUT})'
        raise UserError(
            f'--data_folder {folder} {what};'
            f' put {", ".join(n + "[.gz]" for n in FILES[split])} there, or drop --data_folder to'
            f' read {DEBIAN_FOLDER} (`{INSTALL}`)'
        )
    paths = []
    for name in FILES[split]:
        found = [os.path.join(holds[0], name + ext) for ext in ('', '.gz')]
        found = [p for p in found if os.path.isfile(p)]
        if not found:
            raise UserError(
                f'{os.path.join(holds[0], name)}[.gz] is missing (the Fashion-MNIST {split} split'
                f' needs it); {_fix(holds[0]).replace("replace it with", "add")}'
            )
        paths.append(found[0])  # the uncompressed file when both are there: no inflating
    return tuple(paths)


def _read_bytes(path, fix):
    try:
        if path.endswith('.gz'):
            with gzip.open(path, 'rb') as f:
                return f.read()
        with open(path, 'rb') as f:
            return f.read()
    except EOFError as exc:  # a .gz cut short
        raise UserError(f'{path} is truncated ({exc}); {fix}') from exc
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise UserError(f'{path} is not a valid gzip file ({exc}); {fix}') from exc
    except OSError as exc:
        raise UserError(f'cannot read {path} ({exc.strerror or exc}); {fix}') from exc


def read_idx(path: str, magic: int, dims: int, fix: str) -> np.ndarray:
    """The uint8 array of one IDX file whose header must start with ``magic`` and give ``dims``
    sizes; the bytes after the header must be exactly as many as the sizes say."""
    raw = _read_bytes(path, fix)
    header = 4 + 4 * dims
    if len(raw) < header:
        raise UserError(
            f'{path} is truncated: {len(raw)} bytes, shorter than the {header}-byte IDX header;'
            f' {fix}'
        )
    found = struct.unpack('>i', raw[:4])[0]
    if found != magic:
        kind = 'images' if magic == IMAGES_MAGIC else 'labels'
        raise UserError(
            f'{path} has the magic number {found}, not {magic} (IDX {kind}): not a Fashion-MNIST'
            f' {kind} file, or damaged; {fix}'
        )
    shape = struct.unpack(f'>{dims}I', raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        short = len(raw) - header < expected
        raise UserError(
            f'{path} is {"truncated" if short else "damaged"}: its header announces'
            f' {"x".join(map(str, shape))} = {expected} bytes of data, it holds'
            f' {len(raw) - header}; {fix}'
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


@lru_cache(maxsize=4)
def _read_split(images_path, labels_path, _stamp):
    """(images uint8 [N, 28, 28, 3], labels int64 [N]) of one split, checked; read once per
    process for a given pair of files (``_stamp``: their sizes and times, so a rewritten file
    is read again)."""
    fix = _fix(os.path.dirname(images_path))
    images = read_idx(images_path, IMAGES_MAGIC, 3, fix)
    if images.shape[1:] != (SIDE, SIDE):
        raise UserError(
            f'{images_path} holds {images.shape[1]}x{images.shape[2]} images where'
            f' Fashion-MNIST\'s are {SIDE}x{SIDE}; {fix}'
        )
    labels = read_idx(labels_path, LABELS_MAGIC, 1, fix)
    if len(labels) != len(images):
        both = fix.replace('replace it with the original file', 'replace both with the originals')
        raise UserError(
            f'{labels_path} holds {len(labels)} labels but {os.path.basename(images_path)} holds'
            f' {len(images)} images: the two files do not belong together;'
            f' {both}'
        )
    bad = np.flatnonzero(labels >= len(CLASSES))
    if len(bad):
        raise UserError(
            f'{labels_path} has labels outside 0-{len(CLASSES) - 1} ({len(bad)} of {len(labels)};'
            f' the first: {int(labels[bad[0]])} at item {int(bad[0])}); {fix}'
        )
    labels = labels.astype(np.int64)
    labels.setflags(write=False)  # shared by every data set built from the cache
    # RGB, as every model and augmentation takes it, at a third of the memory: a read-only
    # view that repeats the one grayscale channel
    return np.broadcast_to(images[..., None], images.shape + (3,)), labels


def load_fashion_mnist(split: str, data_folder: str | None = None):
    """(images uint8 [N, 28, 28, 3], labels int64 [N], class names) of ``split``.

    The images are a read-only view that repeats the one grayscale channel three times; the
    files are read once per process (the same arrays again after that).
    """
    images_path, labels_path = _locate(default_folder(data_folder), split)
    stamp = tuple((s.st_size, s.st_mtime_ns) for s in map(os.stat, (images_path, labels_path)))
    images, labels = _read_split(images_path, labels_path, stamp)
    return images, labels, list(CLASSES)
