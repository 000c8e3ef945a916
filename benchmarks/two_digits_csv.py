"""Build the two-digit multi-label data set: each image is two digits side by side, labelled with
both, written as PNG files and the CSVs ``--dataset csv`` reads.

    python benchmarks/two_digits_csv.py --out save/two_digits [--seed 0]

Every image of ``--dataset digits``'s training split (the same split main_supcon.py reads) is the
left digit of one training image, its right digit a training image drawn at random; the test
images are made the same way from the test split alone, so no digit image is in both. A pair of
equal digits has one label. On a 32x32 black canvas each digit, resized to 16x16, fills one half
of the middle 16 rows. Writes ``<out>/train.csv``, ``<out>/test.csv`` (columns ``path,labels``),
``<out>/images/`` and ``<out>/mean_std.txt``: the ``--mean``/``--std`` of the training images,
which it also prints with the command line to train on them.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supcon.data.datasets import _digits_arrays  # noqa: E402 (the split --dataset digits uses)

HALF = 16


def compose(left, right):
    """A 32x32 RGB uint8 image of the two 32x32 RGB digits, each shrunk to 16x16, side by side."""
    canvas = np.zeros((2 * HALF, 2 * HALF, 3), dtype=np.uint8)
    for column, digit in ((0, left), (HALF, right)):
        small = np.asarray(Image.fromarray(digit).resize((HALF, HALF), Image.BICUBIC))
        canvas[HALF // 2 : HALF // 2 + HALF, column : column + HALF] = small
    return canvas


def write_split(out, split, images, labels, rng):
    """Write one split's PNGs and CSV; return the composed images [N, 32, 32, 3]."""
    folder = out / 'images' / split
    folder.mkdir(parents=True, exist_ok=True)
    partners = rng.integers(0, len(images), size=len(images))
    rows, composed = ['path,labels'], []
    for i, j in enumerate(partners):
        image = compose(images[i], images[j])
        name = f'{split}_{i:04d}.png'
        Image.fromarray(image).save(folder / name)
        names = sorted({str(labels[i]), str(labels[j])})
        rows.append(f'images/{split}/{name},{";".join(names)}')
        composed.append(image)
    (out / f'{split}.csv').write_text('\n'.join(rows) + '\n')
    return np.stack(composed)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='save/two_digits', help='folder to write into')
    parser.add_argument('--seed', type=int, default=0, help='draws the right-hand digits')
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    train_x, train_y, test_x, test_y = _digits_arrays()
    train = write_split(out, 'train', train_x, train_y, rng)
    write_split(out, 'test', test_x, test_y, rng)
    pixels = train[..., 0].astype(np.float64) / 255.0  # the three channels are equal
    mean, std = pixels.mean(), pixels.std()
    mean_text = f'({mean:.4f}, {mean:.4f}, {mean:.4f})'
    std_text = f'({std:.4f}, {std:.4f}, {std:.4f})'
    (out / 'mean_std.txt').write_text(f'{mean_text}\n{std_text}\n')
    print(f'wrote {len(train)} training and {len(test_x)} test images under {out}')
    print(
        f'python main_supcon.py --dataset csv --data_csv {out}/train.csv --test_csv'
        f' {out}/test.csv --mean "{mean_text}" --std "{std_text}" ...'
    )


if __name__ == '__main__':
    main()
