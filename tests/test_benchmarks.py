"""benchmarks/: every script imports and answers --help, every sweep lists its runs, the sweep
harness (skip, resume, parse, mean ± std, rate choice, jobs, signals) on fake scripts, the demo
sweep's commands, and bench_train.py's configurations."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, script_env

sys.path.insert(0, str(REPO / 'benchmarks'))
import digits_demo  # noqa: E402
import harness  # noqa: E402

SCRIPTS = sorted(p.name for p in (REPO / 'benchmarks').glob('*.py'))
# imported by the scripts, not run
MODULES = ('harness.py', 'fashion_mnist_tables.py')
SWEEPS = [s for s in SCRIPTS if 'harness.main(' in (REPO / 'benchmarks' / s).read_text()]

# A training script stand-in: "trains" --epochs epochs, one line each, its position saved in
# ./save/ after every epoch; --resume auto continues from there. --die_at K kills it (SIGKILL)
# at epoch K unless the file --marker exists (then makes it); SIGTERM exits 143 as the real
# scripts do. Every call appends its arguments to ./calls, every epoch it trains to ./trained;
# ./started and ./ended are made at its start and end; --wait_for FILE waits for that file.
FAKE = '''
import os, signal, sys, time
args = sys.argv[1:]
value = lambda flag, default: args[args.index(flag) + 1] if flag in args else default
epochs, die_at = int(value('--epochs', 3)), int(value('--die_at', 0))
with open('calls', 'a') as f:
    f.write(' '.join(args) + '\\n')
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
open('started', 'w').close()
if '--wait_for' in args:  # another run's start, for at most 60 s
    deadline = time.time() + 60
    while not os.path.exists(value('--wait_for', '')) and time.time() < deadline:
        time.sleep(0.02)
    print(f"met: {int(os.path.exists(value('--wait_for', '')))}")
done = 0
if value('--resume', None) == 'auto' and os.path.exists('save/position'):
    done = int(open('save/position').read())
for epoch in range(done + 1, epochs + 1):
    if epoch == die_at and not os.path.exists(value('--marker', 'died')):
        open(value('--marker', 'died'), 'w').close()
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(value('--sleep', 0)))
    os.makedirs('save/run', exist_ok=True)
    open('save/position', 'w').write(str(epoch))
    open('save/run/checkpoint.pth', 'w').write(str(epoch))
    open('trained', 'a').write(f'{epoch}\\n')
    print(f'epoch {epoch}, total time {epoch / 10:.2f}, positives_per_anchor {epoch}.00')
open('save/run/last.pth', 'w').close()
print('best accuracy: ' + value('--best', '50.00'))
print('final accuracy: ' + value('--final', '40.00'))
open('ended', 'w').close()
sys.exit(int(value('--exit', 0)))
'''


@pytest.fixture
def fakes(tmp_path):
    """{kind: absolute path}: a resumable fake (named as a training script) and another."""
    folder = tmp_path / 'fake_scripts'
    folder.mkdir()
    (folder / 'main_supcon.py').write_text(FAKE)
    (folder / 'evaluate.py').write_text(FAKE)
    return {'train': str(folder / 'main_supcon.py'), 'other': str(folder / 'evaluate.py')}


def sweep_of(out, *argv):
    parser = harness.add_arguments(argparse.ArgumentParser(), out=str(out))
    return harness.Sweep(parser.parse_args(list(argv)))


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


# Runs many short script calls in one process that imports torch once, then forks a child per
# call: the child is ``python SCRIPT ARGS`` as far as the script can tell (its argv, sys.path[0],
# output file and exit code), for a tenth of a second instead of seconds of start-up each.
DRIVER = textwrap.dedent(
    """\
    import importlib, json, os, runpy, sys, traceback
    for name in ('numpy', 'torch', 'torchvision', 'PIL.Image', 'sklearn.datasets'):
        importlib.import_module(name)
    codes = {}
    for key, (script, args, output) in json.loads(sys.argv[1]).items():
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            target = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, 1)
            os.dup2(target, 2)
            sys.argv, sys.path[0], code = [script] + args, os.path.dirname(script), 0
            try:
                runpy.run_path(script, run_name='__main__')
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        codes[key] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    print(json.dumps(codes))
    """
)


def run_scripts(calls, tmp_path):
    """{key: (exit code, output)} of ``python benchmarks/SCRIPT ARGS``, {key: (SCRIPT, ARGS)}."""
    spec = {
        key: (
            str(REPO / 'benchmarks' / script),
            [str(a) for a in args],
            str(tmp_path / f'{key}.out'),
        )
        for key, (script, args) in calls.items()
    }
    if hasattr(os, 'fork'):
        command = [sys.executable, '-c', DRIVER, json.dumps(spec)]
        done = subprocess.run(command, cwd=REPO, env=script_env(), capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        codes = json.loads(done.stdout.splitlines()[-1])
    else:  # one process per call, just slower
        codes = {}
        for key, (script, args, output) in spec.items():
            with open(output, 'w') as out:
                command = [sys.executable, script] + args
                codes[key] = subprocess.call(command, cwd=REPO, stdout=out, stderr=out)
    return {key: (codes[key], Path(spec[key][2]).read_text()) for key in spec}


@pytest.fixture(scope='module')
def script_calls(tmp_path_factory):
    """Every script's ``--help`` and every sweep's ``--dry_run``, in one driver."""
    tmp_path = tmp_path_factory.mktemp('benchmark_calls')
    calls = {('help', s): (s, ['--help']) for s in SCRIPTS if s not in MODULES}
    calls.update({('dry', s): (s, ['--dry_run', '--out', tmp_path / s]) for s in SWEEPS})
    keys = {f'{kind}_{script}': (kind, script) for kind, script in calls}
    done = run_scripts({name: calls[key] for name, key in keys.items()}, tmp_path)
    return {keys[name]: result for name, result in done.items()}, tmp_path


@pytest.mark.slow
def test_every_benchmark_script_imports_and_answers_help(script_calls):
    assert 'bench_conv.py' in SCRIPTS and 'harness.py' in SCRIPTS and len(SWEEPS) >= 6
    helps = {script: result for (kind, script), result in script_calls[0].items() if kind == 'help'}
    assert len(helps) == len(SCRIPTS) - len(MODULES)
    for script, (code, out) in helps.items():
        assert code == 0 and out.startswith('usage: '), f'{script} exited {code}:\n{out}'


@pytest.mark.slow
def test_every_sweep_lists_its_runs_in_a_dry_run(script_calls):
    results, tmp_path = script_calls
    for script in SWEEPS:
        code, out = results['dry', script]
        assert code == 0, f'{script}:\n{out}'
        assert 'not finished: ' in out and ' (to run): python ' in out, f'{script}:\n{out}'
        assert not (tmp_path / script / 'runs').exists()  # nothing was started


def test_a_finished_run_is_read_not_run_again(tmp_path, fakes):
    first = sweep_of(tmp_path).run('a', fakes['train'], ['--epochs', 2, '--final', '97.50'])
    again = sweep_of(tmp_path).run('a', fakes['train'], ['--epochs', 2, '--final', '97.50'])
    folder = tmp_path / 'runs' / 'a'
    assert lines(folder / 'calls') == ['--epochs 2 --final 97.50']  # one call only
    assert first['final accuracy'] == again['final accuracy'] == 97.5
    assert again.epoch_times == [0.1, 0.2] and again.seconds > 0
    assert again.checkpoint == folder / 'save' / 'run' / 'last.pth'
    # of a finished run's checkpoints only last.pth is kept, unless asked otherwise
    assert sorted(p.name for p in folder.glob('save/**/*.pth')) == ['last.pth']
    sweep_of(tmp_path / 'keep', '--keep_checkpoints').run('a', fakes['train'], ['--epochs', 2])
    kept = sorted(p.name for p in (tmp_path / 'keep').glob('runs/a/save/**/*.pth'))
    assert kept == ['checkpoint.pth', 'last.pth']
    # another command under the same name is refused, not mixed with this one
    with pytest.raises(harness.RunFailed, match='holds another command'):
        sweep_of(tmp_path).run('a', fakes['train'], ['--epochs', 3])


@pytest.mark.parametrize('kind', ['train', 'other'])
def test_an_interrupted_run_is_resumed_or_started_again(tmp_path, fakes, kind):
    argv = ['--epochs', 5, '--die_at', 3, '--marker', tmp_path / 'killed_once']
    call = ' '.join(str(a) for a in argv)
    with pytest.raises(harness.RunFailed, match='exited -9'):
        sweep_of(tmp_path).run('r', fakes[kind], argv)
    result = sweep_of(tmp_path).run('r', fakes[kind], argv)
    folder = tmp_path / 'runs' / 'r'
    log = result.log.read_text()
    assert [line.split(' after')[0] for line in log.splitlines() if '# exit' in line] == [
        '# exit -9',
        '# exit 0',
    ]
    if kind == 'train':  # continued from its saved position: epochs 1 and 2 are not trained twice
        assert lines(folder / 'calls') == [call, call + ' --resume auto']
        assert lines(folder / 'trained') == ['1', '2', '3', '4', '5']
        assert '# started ' in log and ', attempt 2, with --resume auto' in log
    else:  # cannot continue: started again in an emptied folder (the first call's files gone)
        assert lines(folder / 'calls') == [call]
        assert lines(folder / 'trained') == ['1', '2', '3', '4', '5']
        assert ', attempt 2\n' in log
    # each epoch counted once (the last line of an epoch wins), as in an uninterrupted run
    assert result.epoch_times == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert result['final accuracy'] == 40.0 and log.count('# command ') == 1


def test_log_lines_are_parsed_as_the_scripts_print_them():
    text = textwrap.dedent(
        """\
        # command python main_linear.py --epochs 3
        Train: [1][5/12]\tBT 0.1 (0.2)\tloss 2.3 (2.3)
        epoch 1, total time 9.50, positives_per_anchor 25.27, anchors_without_positive 0.070
        epoch 2, total time 8.25, positives_per_anchor 24.00, anchors_without_positive 0.000
        Train epoch 1, total time 1.44, accuracy:11.55
        note: --resume auto: no checkpoint yet
        epoch 2, total time 7.75, positives_per_anchor 23.00, anchors_without_positive 0.010
        probe accuracy: 96.53
        probe_lr0.01 accuracy: 97.22
        ce accuracy: 95.00
        best accuracy: 99.72
        final accuracy: 98.61
        final accuracy: 99.44
        mean per-class accuracy: 99.43
        many / medium / few-shot accuracy: 99.50 / - / 70.25
        thirds by training count (many / medium / few): 99.10 / 98.00 / 88.25
        final mean average precision: 84.24
        final F1@0.5: 70.30
        precision_at_1: 0.9917
        mean_average_precision_at_r: 0.9000
        knn_acc: 98.61
        saved ./save/SupCon/digits_models/run/last.pth
        """
    )
    values, epochs = harness.parse_log(text)
    assert values == {
        'probe accuracy': 96.53,
        'probe_lr0.01 accuracy': 97.22,
        'ce accuracy': 95.0,
        'best accuracy': 99.72,
        'final accuracy': 99.44,  # a resumed run's later line wins
        'mean per-class accuracy': 99.43,
        'many / medium / few-shot accuracy': (99.5, None, 70.25),
        'thirds by training count (many / medium / few)': (99.1, 98.0, 88.25),
        'final mean average precision': 84.24,
        'final F1@0.5': 70.3,
        'precision_at_1': 0.9917,
        'mean_average_precision_at_r': 0.9,
        'knn_acc': 98.61,
    }
    assert epochs == {
        1: {'time': 1.44, 'accuracy': 11.55},
        2: {'time': 7.75, 'positives_per_anchor': 23.0, 'anchors_without_positive': 0.01},
    }


def test_mean_and_std_agree_with_numpy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5):
        values = list(rng.uniform(80, 100, n))
        expected = f'{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}'
        assert harness.mean_std(values, 3) == expected
        assert harness.mean_std(values + [None], 3) == expected  # a missing seed is left out
    assert harness.mean_std([99.44]) == '99.44 (1 seed)' and harness.mean_std([None]) == '-'
    assert harness.each([99.444, None, 98.6]) == '99.44 / - / 98.60'


def test_the_rate_with_the_best_validation_value_is_chosen(tmp_path, fakes):
    accuracy = {0.003: 90.0, 0.01: 97.0, 0.03: 95.0, 0.1: 95.0, 0.3: 80.0, 1.0: 50.0}
    sweep = sweep_of(tmp_path, '--jobs', '2')

    def score(lr):
        result = sweep.run(f'lr{lr}', fakes['other'], ['--final', accuracy[lr], '--best', 99])
        return result['final accuracy'], result['best accuracy']

    ladder = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    # the best of the start, 0.03, is at its edge: 0.01 is tried, then 0.003 (0.01 at the edge)
    chosen, scores = sweep.choose_rate(score, (0.03, 0.1, 0.3), ladder, max_extensions=3)
    assert chosen == 0.01 and sorted(scores) == [0.003, 0.01, 0.03, 0.1, 0.3]
    assert scores[0.01] == (97.0, 99.0)
    # a tie goes to the smaller rate; at most max_extensions more rates
    chosen, scores = sweep.choose_rate(score, (0.1, 0.03), ladder, max_extensions=0)
    assert chosen == 0.03 and sorted(scores) == [0.03, 0.1]


def test_jobs_run_at_once_in_their_order_each_chain_first(tmp_path, fakes):
    def chain(sweep, seed):
        first = sweep.run(f'pre{seed}', fakes['other'], ['--epochs', 1, '--sleep', 0.2])
        return sweep.run(f'lin{seed}', fakes['other'], ['--final', first['final accuracy'] + 1])

    def times(out, what):
        return {p.parent.name: p.stat().st_mtime for p in out.glob(f'runs/*/{what}')}

    one = sweep_of(tmp_path / 'one')
    assert one.map(lambda s: chain(one, s)['final accuracy'], [0, 1, 2]) == [41.0] * 3
    started, ended = times(tmp_path / 'one', 'started'), times(tmp_path / 'one', 'ended')
    order = sorted(started, key=started.get)
    assert order == ['pre0', 'lin0', 'pre1', 'lin1', 'pre2', 'lin2']
    assert all(ended[a] <= started[b] for a, b in zip(order, order[1:]))  # one at a time
    # two at a time: each of two runs waits for the other to start
    two = sweep_of(tmp_path / 'two', '--jobs', '2')
    runs = tmp_path / 'two' / 'runs'
    both = two.map(
        lambda i: two.run(f'r{i}', fakes['other'], ['--wait_for', runs / f'r{1 - i}' / 'started']),
        [0, 1],
    )
    assert [r['met'] for r in both] == [1, 1]


def test_a_job_reading_a_run_another_job_made_keeps_its_place(tmp_path, fakes):
    """Jobs first read a run that an earlier map ran (as the methods table reads the batch
    table's); the first job, slower to ask for its next run, still runs it first."""
    sweep = sweep_of(tmp_path)
    made = sweep.map(lambda i: sweep.run(f'pre{i}', fakes['other'], ['--epochs', 1]), [0, 1, 2])

    def job(i):
        assert sweep.run(f'pre{i}', fakes['other'], ['--epochs', 1]) is made[i]
        time.sleep(0.5 if i == 0 else 0)
        return sweep.run(f'next{i}', fakes['other'], ['--epochs', 1])

    sweep.map(job, [0, 1, 2])
    started = {p.parent.name: p.stat().st_mtime for p in tmp_path.glob('runs/next*/started')}
    assert sorted(started, key=started.get) == ['next0', 'next1', 'next2']


def test_a_failed_run_stops_the_sweep_and_runs_again_next_time(tmp_path, fakes):
    def job(sweep, i):
        return sweep.run(f'j{i}', fakes['other'], ['--exit', 3 if i == 0 else 0])

    sweep = sweep_of(tmp_path)
    with pytest.raises(harness.RunFailed, match='j0 exited 3'):
        sweep.map(lambda i: job(sweep, i), [0, 1, 2])
    assert not (tmp_path / 'runs' / 'j1').exists()  # started no more runs after the failure
    again = sweep_of(tmp_path)
    with pytest.raises(harness.RunFailed):
        again.map(lambda i: job(again, i), [0, 1, 2])
    assert lines(tmp_path / 'runs' / 'j0' / 'calls') == ['--exit 3']  # started anew, cleared
    # a shared run: two jobs asking for one run get one result of one call, also when the later
    # job asked first (the earlier one then waits for it and must not hold it back)
    sweep, shared = sweep_of(tmp_path), []

    def shared_job(i):
        time.sleep(0.5 if i == 0 else 0)
        return sweep.run('s', fakes['other'], ['--sleep', 0.2])

    worker = threading.Thread(
        target=lambda: shared.extend(sweep.map(shared_job, [0, 1])), daemon=True
    )
    worker.start()
    worker.join(timeout=120)
    stuck = worker.is_alive()
    if stuck:  # let the threads end (the interpreter waits for them) before failing
        sweep.slots.expect(arrived=(0,))
    assert not stuck, 'the two jobs waited for each other'
    assert shared[0] is shared[1] and lines(tmp_path / 'runs' / 's' / 'calls') == ['--sleep 0.2']


def test_sigterm_stops_the_sweep_and_the_next_call_resumes(tmp_path, fakes):
    script = tmp_path / 'sweep.py'
    script.write_text(
        textwrap.dedent(
            f"""\
            import argparse, sys
            sys.path.insert(0, {str(REPO / 'benchmarks')!r})
            import harness

            def build():
                return harness.add_arguments(argparse.ArgumentParser(), out={str(tmp_path)!r})

            def run_sweep(args, sweep):
                result = sweep.run('t', {fakes['train']!r}, ['--epochs', 3, '--sleep', 0.3])
                table = harness.table(['final'], [[result['final accuracy']]])
                sweep.report('Fake', [('table', table)])

            harness.main(build, run_sweep)
            """
        )
    )
    first = subprocess.Popen([sys.executable, str(script)], env=script_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    trained = tmp_path / 'runs' / 't' / 'trained'
    deadline = time.monotonic() + 60
    while not trained.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    out = first.communicate(timeout=60)[0]
    assert first.returncode == 128 + signal.SIGTERM, out
    assert '# exit 143' in (tmp_path / 'runs' / 't' / 'output.log').read_text()
    assert not (tmp_path / 'fake.md').exists()  # no table of an unfinished sweep
    second = subprocess.run([sys.executable, str(script)], env=script_env(), text=True,
                            capture_output=True, timeout=60)  # fmt: skip
    assert second.returncode == 0, second.stdout + second.stderr
    assert lines(tmp_path / 'runs' / 't' / 'calls')[-1].endswith('--resume auto')
    assert sorted(lines(trained)) == ['1', '2', '3']  # no epoch trained twice
    record = (tmp_path / 'fake.md').read_text()
    assert f'Measured on: {harness.code_version()} (1 runs)' in record
    assert '| 40.0 |' in record and f't: python {fakes["train"]} --epochs 3' in record


def test_the_demo_sweep_runs_the_commands_of_demo_digits_sh(tmp_path):
    """demo_digits.sh run with a stand-in python that records its arguments."""
    fake_bin = tmp_path / 'bin'
    fake_bin.mkdir()
    (fake_bin / 'python').write_text('#!/bin/sh\necho "$@" >> "$CALLS"\n')
    os.chmod(fake_bin / 'python', 0o755)
    shutil.copy(REPO / 'demo_digits.sh', tmp_path / 'demo_digits.sh')
    for seed in (0, 2):
        env = dict(script_env(), PATH=f'{fake_bin}:{os.environ["PATH"]}', SEED=str(seed))
        env['CALLS'] = str(tmp_path / f'calls{seed}')
        subprocess.run(['bash', str(tmp_path / 'demo_digits.sh')], env=env, check=True,
                       capture_output=True)  # fmt: skip
        pretrain, linear = lines(tmp_path / f'calls{seed}')
        ckpt = linear.split('--ckpt ')[1]
        assert pretrain == ' '.join(['main_supcon.py'] + [str(a) for a in
                                    digits_demo.pretrain_args(seed)])  # fmt: skip
        expected = ['main_linear.py'] + [str(a) for a in digits_demo.linear_args(seed, ckpt)]
        assert linear == ' '.join(expected)


def test_the_positives_table_agrees_with_the_exact_fraction():
    """long_tail_digits.py --positives_only: no positive for an anchor of uniform labels happens
    with probability (1 - 1/C) ** (batch - 1); balanced batches never leave an anchor alone."""
    import long_tail_digits

    rows = [line.split(' | ') for line in long_tail_digits.positives_table(draws=100).splitlines()]
    assert [row[0] for row in rows[2:]] == ['| 16', '| 64', '| 256']
    for row in rows[2:]:
        batch = int(row[0][2:])
        for cell, classes in ((row[1], 10), (row[2], 100)):
            measured, exact = (float(x) for x in cell.replace('(', '').replace(')', '').split())
            assert exact == pytest.approx((1 - 1 / classes) ** (batch - 1), abs=1e-4)
            assert measured == pytest.approx(exact, abs=0.05)
        assert row[4].startswith('0.0000 (m=')


@pytest.mark.slow
def test_bench_train_runs_each_configuration_as_asked(tmp_path, monkeypatch, capsys):
    """One round of three configurations, each in its own real worker process (the driver in
    this one)."""
    import bench_train

    out = tmp_path / 'bench.json'
    argv = ['--size', 8, '--batch_size', 4, '--steps', 2, '--warmup', 1, '--num_workers', 0]
    argv += ['--threads', 1, '--configs', 'fp32', 'amp', 'amp-matmul-wgrad', '--json', out]
    monkeypatch.setattr(sys, 'argv', ['bench_train.py'] + [str(a) for a in argv])
    bench_train.main()
    stdout = capsys.readouterr().out
    results = json.loads(out.read_text())['results']
    assert set(results) == {'fp32', 'amp', 'amp-matmul-wgrad'}
    assert results['fp32']['amp_dtype'] == 'float32' and not results['fp32']['channels_last']
    for name in ('amp', 'amp-matmul-wgrad'):
        assert results[name]['amp_dtype'] == 'bfloat16' and results[name]['channels_last']
    assert results['amp']['conv_wgrad'] == 'onednn'
    assert results['amp-matmul-wgrad']['conv_wgrad'] == 'matmul'
    for result in results.values():
        assert result['step_s'] > 0 and 0 <= result['data_share'] <= 1
        assert result['batch_size'] == 4 and result['rounds'] == [result['step_s']]
    # one table row per configuration, with its speed relative to fp32
    rows = [line for line in stdout.splitlines() if line.startswith('| amp')]
    assert len(rows) == 2 and all('x |' in row for row in rows)


@pytest.mark.parametrize('rounds', [2, 3])
def test_bench_train_interleaves_the_rounds_and_reports_each_lower_median(
    rounds, monkeypatch, capsys
):
    """The driver, its workers replaced by stand-ins whose step times are drawn per call."""
    import random

    import bench_train

    draw, calls = random.Random(rounds), []

    def worker(args, config, model):
        calls.append(config)
        return dict(amp_dtype='float32', channels_last=False, compile=False, batch_size=4,
                    step_s=draw.uniform(0.1, 1.0), data_share=0.1, warmup_s=0.5,
                    peak_gib=None), ''  # fmt: skip

    monkeypatch.setattr(bench_train, 'run_config_in_subprocess', worker)
    configs = ['fp32', 'amp', 'amp-matmul-wgrad']
    args = bench_train.parse_option(['--rounds', str(rounds), '--configs', *configs])
    results = bench_train.bench_steps(args)
    assert calls == configs * rounds  # fp32, amp, ..., fp32, amp, ...
    out = capsys.readouterr().out
    lines = [line.split(':')[0] for line in out.splitlines() if line.startswith('round ')]
    assert lines == [f'round {r}/{rounds} {c}' for r in range(1, rounds + 1) for c in configs]
    for config in configs:
        times = results[config]['rounds']
        assert len(times) == rounds
        assert results[config]['step_s'] == sorted(times)[(rounds - 1) // 2]
    speed = 2 * 4 / results['amp']['step_s'] / (2 * 4 / results['fp32']['step_s'])
    assert f'| {speed:.2f}x |' in next(r for r in out.splitlines() if r.startswith('| amp |'))


def test_the_fashion_mnist_sweep_asks_each_table_its_runs_at_the_chosen_settings(tmp_path):
    """fashion_mnist.py with stand-in runs (their printed values drawn from the run's name): the
    settings chosen on the validation split are the best ones, the commands carry them, and the
    tables' means are those of the runs."""
    import random

    import fashion_mnist as fm

    args = fm.build().parse_args(['--out', str(tmp_path)])
    sweep = harness.Sweep(args)
    printed, rarest = {}, {}

    def run(name, script, argv, resume=None):
        draw = random.Random(name)
        values = {'final accuracy': draw.uniform(60, 90), 'best accuracy': 91.0,
                  'probe accuracy': draw.uniform(60, 90), 'precision_at_1': draw.uniform(0.6, 0.9),
                  'mean per-class accuracy': 50.0,
                  'mean_average_precision_at_r': draw.uniform(0.4, 0.7)}  # fmt: skip
        values = {key: round(value, 4) for key, value in values.items()}  # as printed
        printed[name] = (['python', script] + [str(a) for a in argv], values)
        text = ''.join(f'{key}: {value:.4f}\n' for key, value in values.items())
        if name.startswith('lt_'):  # the long tail's few-shot group is empty: the thirds printed
            text += 'many / medium / few-shot accuracy: 90 / 60 / -\n'
            rarest[name] = round(draw.uniform(0, 40), 4)
            text += f'thirds by training count (many / medium / few): 90 / 60 / {rarest[name]}\n'
        else:
            text += f'many / medium / few-shot accuracy: 90 / 60 / {draw.uniform(0, 40):.4f}\n'
        text += f'epoch 2, total time 1.0, anchors_without_positive {draw.uniform(0, 1):.4f}\n'
        text += f'saved ./save/{name}/last.pth\n# exit 0 after 10.0 s\n'
        result = harness.Result(name, printed[name][0], tmp_path / name, text)
        sweep.results.append(result)
        return result

    sweep.run = run
    fm.run_sweep(args, sweep)
    report = (tmp_path / 'fashion_mnist.md').read_text()

    def command(name):
        return ' '.join(printed[name][0])

    def score(name):
        return printed[name][1]['final accuracy']

    lr = max([0.03, 0.1, 0.3], key=lambda r: score(f'val_supcon_lr{r}_linear'))
    candidates = {
        (a, c): f'val_aug_{a}_c{c}_linear' for a in ('simclr', 'crop') for c in (0.2, 0.5, 0.8, 1.0)
    }
    candidates[('simclr', 0.2)] = (
        f'val_supcon_lr{lr}_linear'  # the reference's is the rate search's
    )
    aug, scale = max(candidates, key=lambda k: score(candidates[k]))
    slug = f'{aug}_c{scale}'
    assert f'chosen: {aug}, crop scale {scale})' in report
    assert '--aug' not in command('v2_s1') and '--crop_scale' not in command('v2_s1')
    flags = (
        '--aug crop' in command(f'b32_{slug}_s0'),
        f'--crop_scale {scale}' in command(f'b32_{slug}_s0'),
    )
    assert flags == (aug == 'crop', scale != 0.2)
    # the rate scales with the batch; the large batch goes in chunks of 128
    assert f'--batch_size 32 --learning_rate {lr / 4}' in command(f'b32moco_{slug}_s2')
    assert command(f'b32moco_{slug}_s2').endswith('--moco')
    assert f'--batch_size 512 --learning_rate {lr * 4}' in command(f'b512gc_{slug}_s1')
    assert '--grad_cache 128' in command(f'b512gc_{slug}_s1')
    simclr_lr = max([0.03, 0.1, 0.3], key=lambda r: score(f'val_simclr_{slug}_lr{r}_linear'))
    assert f'--method SimCLR --batch_size 128 --learning_rate {simclr_lr} ' in command(
        f'simclr_{slug}_s0'
    )
    ce_lr = max([0.03, 0.1, 0.3], key=lambda r: score(f'val_ce_lr{r}'))
    assert f'--learning_rate {ce_lr} --cosine --aug none' in command('ce_s2')
    # the methods table: the mean of the three cross-entropy encoders' linear stages and retrieval
    linear = [score(f'ce_s{s}_linear') for s in (0, 1, 2)]
    map_r = [
        100 * printed[f'ce_s{s}_retrieval'][1]['mean_average_precision_at_r'] for s in (0, 1, 2)
    ]
    row = next(r for r in report.splitlines() if r.startswith('| cross-entropy | mean ± std |'))
    assert row.split(' | ')[2] == harness.mean_std(linear)
    assert row.split(' | ')[5].rstrip(' |') == harness.mean_std(map_r)
    assert command('ce_s0_retrieval').startswith('python main_retrieval.py --ckpt ')
    # few labels: 2 / F epochs on F of the images, the test split scored after the last one;
    # the linear stages on the same F
    assert '--epochs 200 --save_freq 200' in command(f'labonly_{slug}_F0.01_s0')
    assert '--epochs 20 --save_freq 20' in command(f'labonly_{slug}_F0.1_s0')
    assert '--train_subset 600 --eval_freq 200' in command('ce_F0.01_s1')
    assert '--epochs 200 --save_freq 200 --train_subset 600' in command('ce_F0.01_s1')
    # its linear stage on the same 600 (the checkpoint's subset), not on another F of the labels
    ce_linear = command('ce_F0.01_s1_linear')
    assert ce_linear.endswith('/last.pth --save_freq 200 --eval_freq 200')
    assert '--labelled_fraction' not in ce_linear and '--train_subset' not in ce_linear
    linear = command(f'simclr_{slug}_F0.01_s0_linear')
    assert '--epochs 200 --ckpt ' in linear
    assert linear.endswith('--labelled_fraction 0.01 --save_freq 200 --eval_freq 200')
    assert '--labelled_only' not in command(f'partial_{slug}_F0.1_s2')
    # long tail: 8 epochs of pretraining and of the linear stage on the tail
    assert '--epochs 8 --save_freq 8' in command(f'lt_balanced_{slug}_s0')
    assert '--imbalance_ratio 100 --sampler balanced --m_per_class 16' in command(
        f'lt_balanced_{slug}_s0'
    )
    assert '--epochs 8 ' in command(f'lt_moco_{slug}_s0_linear')
    # its table: the rarest third of each seed's linear stage, the empty standard group a dash
    rare = [rarest[f'lt_moco_{slug}_s{s}_linear'] for s in (0, 1, 2)]
    row = next(r for r in report.splitlines() if r.startswith('| --moco |')).split(' | ')
    assert row[3:5] == [harness.mean_std(rare), '-']
    # every run asked for once: rates 6, views and fine-tuning 21, augmentation 14, batch 24 (of
    # which the 128 row's 6 are the 2-view runs with the reference's augmentation), the rates of
    # SimCLR and cross-entropy 9, methods 27, few labels 42, long tail 18
    assert len(printed) == 6 + 21 + 14 + 24 + 9 + 27 + 42 + 18 - 6 * (slug == 'simclr_c0.2')
