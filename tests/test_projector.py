"""main_tsne.py --projector: the embedding projector's files, read the way TensorBoard reads them.

The config is parsed into TensorBoard's ProjectorConfig and every asset path is resolved and the
tensor file loaded with the projector plugin's own helpers; the numbers are checked against the
checkpoint's encoder run by hand on the same test images.
"""

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from helpers import save_our_checkpoint
from inprocess import call
from PIL import Image
from tensorboard.plugins.projector import projector_plugin
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

import main_tsne
from networks.from_checkpoint import encoder_from_checkpoint
from supcon.data import augment, datasets
from supcon.system import checkpoint

SAMPLES = 50


def read_config(folder):
    config = ProjectorConfig()
    path = folder / 'projector_config.pbtxt'
    text_format.Parse(path.read_text(), config)
    return config, str(path)


@pytest.mark.slow
def test_projector_files_load_as_tensorboard_expects(tmp_path):
    ckpt = tmp_path / 'supcon.pth'
    save_our_checkpoint(ckpt)
    out = tmp_path / 'figure.png'
    args = [
        '--ckpt', ckpt, '--dataset', 'digits', '--size', 8, '--max_samples', SAMPLES,
        '--perplexity', 5, '--num_workers', 0, '--device', 'cpu', '--out', out, '--projector',
    ]  # fmt: skip
    result = call('main_tsne', args, tmp_path)
    assert result.code == 0, result.err
    folder = tmp_path / 'figure_projector'
    assert out.is_file() and f'wrote {folder / "projector_config.pbtxt"}' in result.out
    assert list(folder.glob('events.out.tfevents.*'))  # TensorBoard lists it as a run

    config, config_path = read_config(folder)
    (embedding,) = config.embeddings
    assert embedding.tensor_name == 'encoder:00000'

    def asset(relative):
        return projector_plugin._rel_to_abs_asset_path(relative, config_path)

    # the features: the checkpoint's encoder on the same class-balanced test images, by hand
    tensor = projector_plugin._read_tensor_tsv_file(asset(embedding.tensor_path))
    mean, std = datasets.resolve_mean_std('digits', None, None)
    test_set = datasets.build_dataset('digits', 'test', augment.test_transform(8, mean, std))
    chosen = main_tsne.stratified_subset(test_set.targets, SAMPLES, seed=0)
    encoder, _ = encoder_from_checkpoint(checkpoint.load_checkpoint(str(ckpt)), str(ckpt))
    pixels = torch.stack([test_set[int(i)][0] for i in chosen])
    with torch.no_grad():
        expected = encoder.eval()(pixels).numpy()
    assert tensor.shape == (SAMPLES, 512)
    assert np.allclose(tensor, expected, atol=1e-4)

    # one metadata row per point (after the header): its label and class name
    rows = [line.split('\t') for line in open(asset(embedding.metadata_path)).read().splitlines()]
    assert rows[0] == ['label', 'class'] and len(rows) == SAMPLES + 1
    labels = [int(test_set.targets[i]) for i in chosen]
    assert [int(label) for label, _ in rows[1:]] == labels
    assert [name for _, name in rows[1:]] == [test_set.classes[label] for label in labels]

    # the sprite: a square of 32x32 thumbnails, row-major, the images un-normalised
    side = list(embedding.sprite.single_image_dim)
    assert side == [32, 32]
    sprite = np.asarray(Image.open(asset(embedding.sprite.image_path)).convert('RGB'))
    per_row = math.ceil(math.sqrt(SAMPLES))
    assert sprite.shape == (per_row * 32, per_row * 32, 3)
    for point in (0, 9, SAMPLES - 1):
        row, column = divmod(point, per_row)
        tile = sprite[row * 32 : (row + 1) * 32, column * 32 : (column + 1) * 32] / 255.0
        image = pixels[point] * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        image = image.clamp(0, 1).repeat_interleave(4, 1).repeat_interleave(4, 2)  # 8 px -> 32
        assert np.abs(tile - image.permute(1, 2, 0).numpy()).max() <= 1 / 255 + 1e-6, point

    # drawing again replaces the files: still one embedding, no warning about the folder
    result = call('main_tsne', args, tmp_path)
    assert result.code == 0, result.err
    assert 'warning' not in result.out.lower()
    assert len(read_config(folder)[0].embeddings) == 1


def test_thumbnails_shrink_to_fit_the_sprite_limit():
    from supcon.training.tb_logger import thumbnails

    images = torch.zeros(5, 3, 64, 64)
    assert thumbnails(images, (0, 0, 0), (1, 1, 1)).shape == (5, 3, 32, 32)
    # 70000 points: at most 8192 // 265 = 30 pixels a side
    assert thumbnails(images, (0, 0, 0), (1, 1, 1), count=70000).shape[-1] == 30
