"""Time and peak memory of supcon/evaluation/retrieval.py against pytorch-metric-learning's
AccuracyCalculator on the same embeddings; and main_retrieval.py over a list of checkpoints.

    python benchmarks/bench_retrieval.py search --n 10000 50000 --methods ours peer
    python benchmarks/bench_retrieval.py search --n 100000 --methods ours
    python benchmarks/bench_retrieval.py checkpoints RUN1/last.pth RUN2/last.pth -- --dataset digits

``search``: N queries against a separate gallery of N, dimension --dim, --classes equal classes
(so R = k = N / classes), Gaussian clusters, L2-normalised; generated once per N and saved, then
each method runs in a fresh subprocess on the same files, so that its peak memory is its own.
"peak RSS" is the process's maximum resident size (VmHWM, the loaded embeddings and the imported
libraries included); "grown" is that peak less the resident size just before the call (the
largest over --rounds); "time" is the fastest round. The
peer is ``AccuracyCalculator(k='max_bin_count')`` with its default exact k-NN (faiss'
IndexFlatL2) when faiss imports, else with ``CustomKNN(CosineSimilarity(), batch_size=...)``,
its own blocked search; the table says which. Both must agree on Precision@1, R-Precision and
MAP@R (the table prints the largest difference).

``checkpoints``: runs main_retrieval.py on each checkpoint (the flags after ``--`` go to every
run), reads the JSON each writes and prints one row per checkpoint, then the mean and standard
deviation over them (e.g. one checkpoint per seed).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

PEER_METRICS = ('precision_at_1', 'r_precision', 'mean_average_precision_at_r')
TABLE_METRICS = list(PEER_METRICS) + ['recall_at_1', 'recall_at_5', 'recall_at_10', 'knn_acc']
SHORT = {
    'precision_at_1': 'P@1',
    'r_precision': 'R-Prec',
    'mean_average_precision_at_r': 'MAP@R',
    'recall_at_1': 'R@1',
    'recall_at_5': 'R@5',
    'recall_at_10': 'R@10',
    'knn_acc': 'kNN %',
}


def memory(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------- search


def make_embeddings(folder, n, dim, classes, noise, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    for side in ('query', 'gallery'):
        labels = np.arange(n) % classes
        x = centres[labels] + noise * rng.normal(size=(n, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(os.path.join(folder, f'{side}_features.npy'), x.astype(np.float32))
        np.save(os.path.join(folder, f'{side}_labels.npy'), labels.astype(np.int64))


def run_one(args):
    """In a fresh process: load the embeddings, run one method, print its JSON line."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    arrays = {
        name: torch.from_numpy(np.load(os.path.join(args.data, f'{name}.npy')))
        for name in ('query_features', 'query_labels', 'gallery_features', 'gallery_labels')
    }
    if args.method == 'ours':
        from supcon.evaluation.retrieval import retrieval_metrics

        def run():
            return retrieval_metrics(
                arrays['query_features'],
                arrays['query_labels'],
                arrays['gallery_features'],
                arrays['gallery_labels'],
                block_size=args.block_size,
            )

        knn = 'supcon.evaluation.retrieval (exact, blocked)'
    else:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
            knn_func, knn = None, 'FaissKNN (IndexFlatL2, exact)'
        except ImportError:
            from pytorch_metric_learning.distances import CosineSimilarity
            from pytorch_metric_learning.utils.inference import CustomKNN

            batch = args.block_size or 256
            knn_func = CustomKNN(CosineSimilarity(), batch_size=batch)
            knn = f'CustomKNN (cosine, batch_size {batch}; faiss not installed)'
        calc = AccuracyCalculator(
            include=PEER_METRICS, k='max_bin_count', device=torch.device('cpu'), knn_func=knn_func
        )

        def run():
            return calc.get_accuracy(
                arrays['query_features'],
                arrays['query_labels'],
                arrays['gallery_features'],
                arrays['gallery_labels'],
            )

    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # restart the peak from what is resident now: the call's own peak follows
    before = memory('VmRSS')
    start = time.perf_counter()
    result = run()
    elapsed = time.perf_counter() - start
    print(
        json.dumps(
            dict(
                method=args.method,
                knn=knn,
                time_s=elapsed,
                rss_before=before,
                peak_rss=memory('VmHWM'),
                metrics={k: float(result[k]) for k in PEER_METRICS},
            )
        )
    )


def search(args):
    rows = []
    for n in args.n:
        with tempfile.TemporaryDirectory(prefix='bench_retrieval.') as folder:
            make_embeddings(folder, n, args.dim, args.classes, args.noise, args.seed)
            results = {}
            # rounds interleave the methods, so a shared machine's drift hits both alike
            for round_ in range(args.rounds):
                for method in args.methods:
                    command = [sys.executable, os.path.abspath(__file__), '_run']
                    command += ['--method', method, '--data', folder]
                    command += ['--threads', str(args.threads)]
                    if args.block_size:
                        command += ['--block_size', str(args.block_size)]
                    print(f'N = {n}, round {round_ + 1}: {method} ...', flush=True)
                    done = subprocess.run(command, capture_output=True, text=True)
                    if done.returncode:
                        tail = (done.stderr.strip().splitlines() or ['?'])[-1]
                        print(f'  failed (exit {done.returncode}): {tail}', flush=True)
                        results[method] = dict(method=method, failed=tail)
                        continue
                    run = json.loads(done.stdout.strip().splitlines()[-1])
                    print(f'  {run["time_s"]:.1f} s, load {os.getloadavg()[0]:.1f}', flush=True)
                    if 'failed' in results.get(method, {}):
                        continue
                    kept = results.setdefault(method, dict(run, rounds=[], grown=0))
                    kept['rounds'].append(run['time_s'])
                    kept['peak_rss'] = max(kept['peak_rss'], run['peak_rss'])
                    kept['grown'] = max(kept['grown'], run['peak_rss'] - run['rss_before'])
            for r in results.values():
                if 'rounds' in r:
                    r['time_s'] = min(r['rounds'])  # the least disturbed round
        ok = [r for r in results.values() if 'failed' not in r]
        diff = None
        if len(ok) > 1:
            diff = max(abs(ok[0]['metrics'][m] - r['metrics'][m]) for r in ok for m in PEER_METRICS)
        for r in results.values():
            rows.append(dict(r, n=n, dim=args.dim, k=n // args.classes, max_difference=diff))

    mib = 2**20
    print()
    print(f'load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; time: the fastest')
    print('| N | k = R | method | time s | peak RSS MiB | grown MiB | P@1 | MAP@R | k-NN |')
    print('|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        if 'failed' in r:
            print(f'| {r["n"]} | {r["k"]} | {r["method"]} | failed: {r["failed"]} | | | | | |')
            continue
        print(
            f'| {r["n"]} | {r["k"]} | {r["method"]} | {r["time_s"]:.1f} | {r["peak_rss"] / mib:.0f}'
            f' | {r["grown"] / mib:.0f}'
            f' | {r["metrics"]["precision_at_1"]:.4f}'
            f' | {r["metrics"]["mean_average_precision_at_r"]:.4f} | {r["knn"]} |'
        )
    for n in args.n:
        diffs = {r['max_difference'] for r in rows if r['n'] == n} - {None}
        if diffs:
            print(f'N = {n}: largest difference between the methods\' metrics: {max(diffs):.2e}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(settings=vars(args), rows=rows), f, indent=2)


# --------------------------------------------------------------------------- checkpoints


def checkpoints(args, extra):
    records = []
    with tempfile.TemporaryDirectory(prefix='bench_retrieval.') as folder:
        for i, ckpt in enumerate(args.ckpts):
            out = os.path.join(folder, f'{i}.json')
            command = [sys.executable, os.path.join(REPO_ROOT, 'main_retrieval.py'), '--ckpt', ckpt]
            command += ['--out', out, '--tb_folder', os.path.join(folder, f'tb{i}'), *extra]
            print(f'{ckpt} ...', flush=True)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f'main_retrieval.py failed on {ckpt}:\n{done.stderr.strip()}')
            with open(out) as f:
                records.append(json.load(f))
    names = [m for m in TABLE_METRICS if any(m in r for r in records)]
    print()
    print('| checkpoint | ' + ' | '.join(SHORT[m] for m in names) + ' |')
    print('|---|' + '---|' * len(names))

    def cell(value, name):
        return f'{value:.2f}' if name == 'knn_acc' else f'{value:.4f}'

    for ckpt, r in zip(args.ckpts, records):
        values = ' | '.join(cell(r[m], m) if m in r else '-' for m in names)
        print(f'| {ckpt} | {values} |')
    if len(records) > 1:
        cells = []
        for m in names:
            values = [r[m] for r in records if m in r]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f'{cell(statistics.mean(values), m)} ± {cell(spread, m)}')
        print(f'| mean ± std ({len(records)}) | ' + ' | '.join(cells) + ' |')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(zip(args.ckpts, records)), f, indent=2)


def main():
    argv = sys.argv[1:]
    extra = []
    if '--' in argv:
        argv, extra = argv[: argv.index('--')], argv[argv.index('--') + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    s = sub.add_parser('search', help='ours against AccuracyCalculator on synthetic embeddings')
    s.add_argument('--n', type=int, nargs='+', default=[10000, 50000])
    s.add_argument('--methods', nargs='+', default=['ours', 'peer'], choices=['ours', 'peer'])
    s.add_argument('--dim', type=int, default=128)
    s.add_argument('--classes', type=int, default=100, help='equal classes: R = N / classes')
    s.add_argument('--noise', type=float, default=2.0, help='cluster spread (centres ~ N(0, 1))')
    s.add_argument('--seed', type=int, default=0)
    s.add_argument('--threads', type=int, default=2, help='torch (and faiss) threads')
    s.add_argument('--block_size', type=int, default=None, help='ours: query rows per block')
    s.add_argument('--rounds', type=int, default=1, help='runs per method, interleaved')
    s.add_argument('--json', type=str, default=None, help='also write the rows here')
    r = sub.add_parser('_run')  # one method in a fresh process (internal)
    r.add_argument('--method', choices=['ours', 'peer'], required=True)
    r.add_argument('--data', required=True)
    r.add_argument('--threads', type=int, default=2)
    r.add_argument('--block_size', type=int, default=None)
    c = sub.add_parser('checkpoints', help='main_retrieval.py on each checkpoint, one table')
    c.add_argument('ckpts', nargs='+')
    c.add_argument('--json', type=str, default=None, help='also write every run\'s JSON here')
    args = parser.parse_args(argv)
    if args.command == 'search':
        search(args)
    elif args.command == '_run':
        run_one(args)
    else:
        checkpoints(args, extra)


if __name__ == '__main__':
    main()
