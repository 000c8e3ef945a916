"""benchmarks/bench_train.py: each configuration runs real main_supcon steps with its own
settings."""

import json
import subprocess
import sys

from helpers import REPO, script_env


def test_bench_train_runs_each_configuration_as_asked(tmp_path):
    out = tmp_path / 'bench.json'
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / 'benchmarks/bench_train.py'),
            '--size',
            '8',
            '--batch_size',
            '4',
            '--steps',
            '2',
            '--warmup',
            '1',
            '--num_workers',
            '0',
            '--threads',
            '1',
            '--configs',
            'fp32',
            'amp',
            'amp-matmul-wgrad',
            '--rounds',
            '2',
            '--json',
            str(out),
        ],
        cwd=str(tmp_path),
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())['results']
    assert set(results) == {'fp32', 'amp', 'amp-matmul-wgrad'}
    assert results['fp32']['amp_dtype'] == 'float32' and not results['fp32']['channels_last']
    for name in ('amp', 'amp-matmul-wgrad'):
        assert results[name]['amp_dtype'] == 'bfloat16' and results[name]['channels_last']
    assert results['amp']['conv_wgrad'] == 'onednn'
    assert results['amp-matmul-wgrad']['conv_wgrad'] == 'matmul'
    for result in results.values():
        assert result['step_s'] > 0 and 0 <= result['data_share'] <= 1
        assert result['batch_size'] == 4
        # two interleaved rounds, the reported run is the lower median of them
        assert len(result['rounds']) == 2 and result['step_s'] == min(result['rounds'])
    assert [
        line.split(':')[0] for line in done.stdout.splitlines() if line.startswith('round ')
    ] == [f'round {r}/2 {c}' for r in (1, 2) for c in ('fp32', 'amp', 'amp-matmul-wgrad')]
    # one table row per configuration, with its speed relative to fp32
    rows = [line for line in done.stdout.splitlines() if line.startswith('| amp')]
    assert len(rows) == 2 and all('x |' in row for row in rows)
