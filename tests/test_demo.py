"""demo_digits.sh: the README's first command, shortened to one epoch each."""
import os
import re
import shutil
import subprocess

from checkpoint import load_checkpoint

from helpers import REPO, describe, script_env

RUN = 'SupCon_digits_resnet18_lr_0.1_decay_0.0001_bsz_64_temp_0.1_trial_{}_cosine'


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
    return subprocess.run(['bash', str(root / 'demo_digits.sh')], cwd=str(root), env=full,
                          capture_output=True, text=True, timeout=600)


def test_demo_fp32_other_seed_end_to_end(tmp_path):
    root = demo_copy(tmp_path)
    result = run_demo(root, EPOCHS='1', LINEAR_EPOCHS='1', PRECISION='fp32', SEED='1')
    assert result.returncode == 0, describe(result)
    accuracy = re.findall(r'^best accuracy: ([0-9.]+)$', result.stdout, flags=re.M)
    assert len(accuracy) == 1 and 0 <= float(accuracy[0]) <= 100, describe(result)

    run = root / 'save/SupCon/digits_models' / RUN.format('fp32_seed1')
    ckpt = load_checkpoint(str(run / 'last.pth'))  # weights_only, opt as a dict
    assert ckpt['opt']['amp'] is False and ckpt['opt']['seed'] == 1
    assert ckpt['opt']['trial'] == 'fp32_seed1' and ckpt['epoch'] == 1
    # the linear run is filed under the pretraining run it evaluated
    linear = list((root / 'save/SupCon/digits_linear_models').rglob('*.pth'))
    assert linear and all(RUN.format('fp32_seed1') in str(p) for p in linear)


def test_demo_rejects_an_unknown_precision(tmp_path):
    root = demo_copy(tmp_path)
    result = run_demo(root, PRECISION='fp16')
    assert result.returncode == 2, describe(result)
    assert "PRECISION must be amp or fp32, not 'fp16'" in result.stderr
    assert not (root / 'save').exists()
