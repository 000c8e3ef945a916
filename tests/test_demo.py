"""demo_digits.sh: the README's first command, shortened to one epoch each on 200 of the
training images (``SUBSET``)."""

import os
import re
import shutil
import subprocess

import pytest
from helpers import REPO, describe, script_env

from supcon.system.checkpoint import load_checkpoint

RUN = 'SupCon_digits_resnet18_lr_0.03_decay_0.0001_bsz_128_temp_0.1_trial_{}_cosine'


def demo_copy(tmp_path):
    """The script beside links to the repository's code, so its ./save lands in tmp_path."""
    shutil.copy(REPO / 'demo_digits.sh', tmp_path / 'demo_digits.sh')
    for entry in REPO.iterdir():
        if entry.suffix == '.py' or entry.name == 'networks':
            os.symlink(entry, tmp_path / entry.name)
    return tmp_path


def run_demo(root, **env):
    full = script_env()
    full.update(env)
    return subprocess.run(
        ['bash', str(root / 'demo_digits.sh')],
        cwd=str(root),
        env=full,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_demo_fp32_other_seed_end_to_end(tmp_path):
    root = demo_copy(tmp_path)
    result = run_demo(root, EPOCHS='1', LINEAR_EPOCHS='1', PRECISION='fp32', SEED='1', SUBSET='200')
    assert result.returncode == 0, describe(result)
    for which in ('best', 'final'):
        accuracy = re.findall(rf'^{which} accuracy: ([0-9.]+)$', result.stdout, flags=re.M)
        assert len(accuracy) == 1 and 0 <= float(accuracy[0]) <= 100, describe(result)
    assert re.search(
        r'^demo: SupCon, 1 pretraining \+ 1 linear epochs, 1 thread\(s\): \d+ s$',
        result.stdout,
        flags=re.M,
    ), describe(result)

    name = RUN.format('fp32_seed1') + '_sub200'
    ckpt = load_checkpoint(str(root / 'save/SupCon/digits_models' / name / 'last.pth'))
    assert ckpt['opt']['amp'] is False and ckpt['opt']['seed'] == 1
    assert ckpt['opt']['trial'] == 'fp32_seed1' and ckpt['epoch'] == 1
    assert ckpt['opt']['size'] == 12 and ckpt['opt']['train_subset'] == 200
    # the linear run is filed under the pretraining run it evaluated, trained without
    # augmentation on the same 200 images
    linear = list((root / 'save/SupCon/digits_linear_models').rglob('*.pth'))
    assert linear and all(name in str(p) for p in linear)
    assert all(p.parent.name.endswith('_aug_none_sub200') for p in linear)
    assert load_checkpoint(str(linear[0]))['opt']['train_subset'] == 200


def test_demo_rejects_an_unknown_precision(tmp_path):
    root = demo_copy(tmp_path)
    result = run_demo(root, PRECISION='fp16')
    assert result.returncode == 2, describe(result)
    assert "PRECISION must be amp or fp32, not 'fp16'" in result.stderr
    assert not (root / 'save').exists()


def test_demo_rejects_a_bad_thread_count(tmp_path):
    root = demo_copy(tmp_path)
    for bad in ('0', 'two', '-1', '1.5'):
        result = run_demo(root, THREADS=bad)
        assert result.returncode == 2, describe(result)
        assert f"THREADS must be a number of threads, 1 or more, not '{bad}'" in result.stderr
    assert not (root / 'save').exists()


def test_demo_rejects_a_bad_subset(tmp_path):
    root = demo_copy(tmp_path)
    for bad in ('many', '-5', '1e3'):
        result = run_demo(root, SUBSET=bad)
        assert result.returncode == 2, describe(result)
        want = f"SUBSET must be a number of training images (0 = all), not '{bad}'"
        assert want in result.stderr, describe(result)
    assert not (root / 'save').exists()
