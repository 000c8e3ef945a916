"""The one sweep harness of the multi-seed benchmarks: runs, resume, logs, rate choice, tables.

    sweep = harness.Sweep(args)                       # args from harness.add_arguments(parser)
    pre = sweep.run('supcon_s0', 'main_supcon.py', [...])
    lin = sweep.run('supcon_s0_linear', 'main_linear.py', [..., '--ckpt', pre.checkpoint])
    lin['final accuracy'], pre.epoch_times

A run is one command line with its own working folder ``<out>/runs/<name>/`` (the scripts write
``./save/`` there) and log ``output.log``, where the harness adds lines of its own that start with
``#`` (command, commit, start, exit code and seconds). A run whose log ends in ``# exit 0`` is
finished: it is read, not run again, and of its checkpoints only last.pth is kept (unless
``--keep_checkpoints``). Any other run starts again: the training scripts with ``--resume auto``
(they continue from their last saved position), others in an emptied folder. So a sweep stopped
at any point continues where it stopped when called again, in this session or a later one. A log
that holds another command than the one asked for is an error.

``Sweep.map`` runs jobs (a job may chain runs: pretraining -> linear -> retrieval) in threads,
``--jobs`` runs at once, each with ``--threads`` intra-op threads. After a failure no new run
starts, the running ones finish, then the failure is raised; SIGTERM is passed on to the running
scripts (which save and stop). ``--stop_after`` starts no run after that many minutes,
``--dry_run`` none at all: both still print the tables of what is finished. The harness drives
the scripts by their command lines and reads their printed lines; it imports nothing of supcon.
"""

import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# scripts that continue an interrupted run with --resume auto
RESUMABLE = ('main_supcon.py', 'main_ce.py', 'main_linear.py')
TORCHRUN_VARIABLES = ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR')

NUMBER = r'-?(?:[0-9]+\.?[0-9]*(?:e[-+]?[0-9]+)?|nan|inf)|-'
VALUE_LINE = re.compile(rf'^([A-Za-z][\w@ ./()-]*?): ((?:{NUMBER})(?: / (?:{NUMBER}))*)\s*$')
EPOCH_LINE = re.compile(r'^(?:Train )?epoch (\d+), total time ([0-9.]+)(.*)$')
EPOCH_PAIR = re.compile(r'([A-Za-z_@]+)[: ]\s*(-?[0-9.]+)')
SAVED_LINE = re.compile(r'^saved (\S+last\.pth)\s*$', re.M)
EXIT_LINE = re.compile(r'^# exit (-?\d+) after ([0-9.]+) s$', re.M)


class RunFailed(RuntimeError):
    """A run exited with an error; its log says why."""


class NotRun(Exception):
    """A run was not started: --dry_run, --stop_after, or the sweep stopped after a failure."""


def parse_log(text):
    """``({name: value}, {epoch: {'time': T, ...}})`` of a run's output: every ``name: value``
    line gives a float, ``a / b: x / y`` a tuple (``-``: None); ``epoch N, total time T, key value``
    lines (main_linear's ``Train epoch`` too) the epoch's numbers. A later line wins (a resumed
    run prints an epoch twice). The harness's own lines (``#``) are skipped."""
    values, epochs = {}, {}
    for line in text.splitlines():
        found = None if line.startswith('#') else EPOCH_LINE.match(line)
        if found:
            epoch = {'time': float(found.group(2))}
            epoch.update((k, float(v)) for k, v in EPOCH_PAIR.findall(found.group(3)))
            epochs[int(found.group(1))] = epoch
            continue
        found = None if line.startswith('#') else VALUE_LINE.match(line)
        if found:
            parts = [None if p == '-' else float(p) for p in found.group(2).split(' / ')]
            values[found.group(1)] = parts[0] if len(parts) == 1 else tuple(parts)
    return values, epochs


class Result:
    """What one finished run printed: ``result['final accuracy']``, ``.epoch_times``, ...."""

    def __init__(self, name, command, folder, text):
        self.name, self.command, self.folder, self.text = name, command, folder, text
        self.log, (self.values, self.epochs) = folder / 'output.log', parse_log(text)
        self.seconds = sum(float(s) for _, s in EXIT_LINE.findall(text))  # every attempt
        self.commits = re.findall(r'^# commit (\S+)$', text, re.M)

    def __getitem__(self, name):
        if name not in self.values:
            raise KeyError(f'run {self.name} printed no "{name}: ..." line ({self.log})')
        return self.values[name]

    @property
    def epoch_times(self):
        return [self.epochs[e]['time'] for e in sorted(self.epochs)]

    @property
    def checkpoint(self):
        """The run's last.pth: its ``saved`` line, else the one last.pth in its folder."""
        saved = SAVED_LINE.findall(self.text)
        if saved:
            return (self.folder / saved[-1]).resolve()
        found = sorted(self.folder.glob('save/**/last.pth'))
        if len(found) != 1:
            raise RunFailed(f'run {self.name}: {len(found)} last.pth files under {self.folder}')
        return found[0]


def add_arguments(parser, out, jobs=1):
    """The harness's options, the same in every benchmark script."""
    add = parser.add_argument_group('sweep harness (benchmarks/harness.py)').add_argument
    add('--out', default=out, help='runs, logs, tables (relative: to the repository root)')
    add('--jobs', type=int, default=jobs, help='runs at once')
    add('--threads', type=int, default=1, help='intra-op threads of each run')
    add('--nice', type=int, default=0, help='run every command under nice -n N')
    add('--stop_after', type=float, help='start no run after this many minutes')
    add('--dry_run', action='store_true', help='run nothing: list the runs to do, print tables')
    add('--keep_checkpoints', action='store_true', help="keep a finished run's every .pth")
    return parser


def code_version():
    """The commit of the working tree, ``+dirty`` when tracked files differ from it."""

    def git(*args):
        done = subprocess.run(['git', *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ''

    commit = git('rev-parse', '--short=12', 'HEAD') or 'unknown'
    return commit + ('+dirty' if git('status', '--porcelain', '--untracked-files=no') else '')


def mean_std(values, digits=2):
    """``mean ± std`` (sample standard deviation, n - 1) of the values that are not None."""
    values = [v for v in values if v is not None]
    if not values:
        return '-'
    if len(values) == 1:
        return f'{values[0]:.{digits}f} (1 seed)'
    return f'{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}'


def each(values, digits=2):
    """The per-seed values, ``a / b / c`` (``-`` for a missing one)."""
    return ' / '.join('-' if v is None else f'{v:.{digits}f}' for v in values)


def table(header, rows):
    """A markdown table of a header row and rows of cells."""
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


class _Slots:
    """``--jobs`` slots, taken in the order of the jobs' priorities (their places in their maps):
    a run starts only when no job of a lower priority waits for a slot or is yet to ask for one.
    A finished run's slot is kept for its job's next run for up to a second, so that a chain
    (pretraining -> linear) runs to its end before the next job starts."""

    def __init__(self, count):
        self.free, self.waiting, self.expected, self.kept = count, set(), set(), None
        self.condition, self.until = threading.Condition(), 0.0

    def expect(self, priorities=(), arrived=None):
        """Jobs that will ask for slots; ``arrived`` asks no more before its end (waits)."""
        with self.condition:
            self.expected.discard(arrived)
            self.expected.update(priorities)
            self.condition.notify_all()

    def _may_take(self, priority):
        if not self.free or min(self.waiting | self.expected) != priority:
            return False
        unkept = self.kept in (None, priority) or time.monotonic() > self.until
        return unkept or self.free > 1  # a kept slot leaves the others free

    def acquire(self, priority):
        with self.condition:
            self.expected.discard(priority)
            self.waiting.add(priority)
            while not self._may_take(priority):
                self.condition.wait(0.1)
            self.waiting.discard(priority)
            self.free, self.kept = self.free - 1, None if self.kept == priority else self.kept
            self.condition.notify_all()

    def release(self, priority):
        with self.condition:
            self.free, self.kept, self.until = self.free + 1, priority, time.monotonic() + 1
            self.condition.notify_all()

    def job_done(self, priority):
        with self.condition:
            self.expected.discard(priority)
            self.kept = None if self.kept == priority else self.kept
            self.condition.notify_all()


class Sweep:
    def __init__(self, args):
        if args.jobs < 1 or args.threads < 1:
            raise SystemExit('error: --jobs and --threads must be 1 or more')
        self.out = Path(args.out) if os.path.isabs(args.out) else REPO / args.out
        self.dry_run, self.nice, self.keep = args.dry_run, args.nice, args.keep_checkpoints
        self.env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
        threads = str(args.threads)
        self.env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED='1')
        self.deadline = None if args.stop_after is None else time.time() + 60 * args.stop_after
        self.slots = _Slots(args.jobs)
        self.local = threading.local()  # the priority of the job this thread runs
        self.failed = threading.Event()
        self.stopping = None  # the signal that stops the sweep
        self.children = set()
        self.lock = threading.RLock()  # RLock: the signal handler may interrupt its holder
        self.results, self.todo, self.runs = [], [], {}
        self.commit = code_version()

    def say(self, *words):
        with self.lock:
            print(time.strftime('[%H:%M:%S]'), *words, flush=True)

    def run(self, name, script, args, resume=None):
        """``python <script> args`` in ``<out>/runs/<name>/`` unless it finished before.

        ``script`` is relative to the repository root. ``resume``: continue an interrupted run
        with ``--resume auto`` (default: for main_supcon / main_ce / main_linear); otherwise it
        starts again in an emptied folder. Jobs that ask for one run (same name and command)
        share it. Returns the Result; raises RunFailed, or NotRun when the run is not started.
        """
        if not re.fullmatch(r'[\w.=+-]+', name):
            raise ValueError(f'run name {name!r}: letters, digits and ._=+- only')
        command = ['python', script] + [str(a) for a in args]
        with self.lock:
            first = name not in self.runs
            shared = self.runs.setdefault(name, {'command': command, 'done': threading.Event()})
        if shared['command'] != command:
            raise ValueError(f'run name {name!r} asked for with two commands in one sweep')
        if not first:  # the run of another job
            if not shared['done'].is_set():
                # wait for it holding no place in the queue (that job may be a later one), then
                # take the place back for this job's next runs
                priority = getattr(self.local, 'priority', ())
                self.slots.expect(arrived=priority)
                shared['done'].wait()
                if priority:
                    self.slots.expect([priority])
            if 'error' in shared:
                raise shared['error']
            return shared['result']
        try:
            shared['result'] = self._run(name, script, command, resume)
            return shared['result']
        except Exception as exc:
            shared['error'] = exc
            raise
        finally:
            shared['done'].set()

    def _run(self, name, script, command, resume):
        folder = self.out / 'runs' / name
        log = folder / 'output.log'
        text = log.read_text() if log.exists() else ''
        first = re.search(r'^# command (.*)$', text, re.M)
        if first and first.group(1) != ' '.join(command):
            raise RunFailed(
                f'run {name}: {log} holds another command ({first.group(1)}); give this sweep'
                f' another --out, or delete {folder} to run it anew'
            )
        exits = EXIT_LINE.findall(text)
        if exits and exits[-1][0] == '0':
            return self._finished(name, command, folder, log.read_text())
        state = 'interrupted' if text else 'to run'
        if self.dry_run:
            self.todo.append(f'{name} ({state}): {" ".join(command)}')
            raise NotRun(name)
        priority = getattr(self.local, 'priority', ())
        self.slots.acquire(priority)
        try:
            if self.failed.is_set() or self.stopping:
                raise NotRun(f'{name}: the sweep is stopping')
            if self.deadline is not None and time.time() > self.deadline:
                self.todo.append(f'{name} ({state}, after --stop_after)')
                raise NotRun(f'{name}: --stop_after')
            self._execute(name, script, command, folder, log, text, resume)
        except RunFailed:
            self.failed.set()
            raise
        finally:
            self.slots.release(priority)
        return self._finished(name, command, folder, log.read_text())

    def _execute(self, name, script, command, folder, log, text, resume):
        resumed = bool(text and (Path(script).name in RESUMABLE if resume is None else resume))
        argv = [str(REPO / script)] + command[2:] + (['--resume', 'auto'] if resumed else [])
        if text and not resumed:  # a script that cannot continue starts again from nothing
            for path in folder.iterdir():
                if path != log:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        attempt = 1 + len(re.findall(r'^# started ', text, re.M))
        how = ', with --resume auto' if resumed else ''
        self.say(f'[start] {name}{how}')
        start = time.time()
        with open(log, 'a') as handle:
            if not text:
                handle.write(f'# command {" ".join(command)}\n')
            when = time.strftime('%Y-%m-%d %H:%M:%S %z')
            handle.write(f'# commit {self.commit}\n# started {when}, attempt {attempt}{how}\n')
            handle.flush()
            with self.lock:
                if self.stopping:
                    raise NotRun(f'{name}: stopped by signal {self.stopping}')
                command = (['nice', '-n', str(self.nice)] if self.nice else []) + [sys.executable]
                command += argv
                child = subprocess.Popen(command, cwd=folder, env=self.env, stdout=handle,
                                         stderr=subprocess.STDOUT)  # fmt: skip
                self.children.add(child)
            code = child.wait()
            self.children.discard(child)
            seconds = time.time() - start
            handle.write(f'# exit {code} after {seconds:.3f} s\n')
        if code != 0 and self.stopping:
            self.todo.append(f'{name} (stopped by signal {self.stopping})')
            raise NotRun(f'{name}: stopped by signal {self.stopping}')
        if code != 0:
            tail = ''.join(log.read_text().splitlines(True)[-12:])
            raise RunFailed(f'run {name} exited {code} after {seconds:.0f} s ({log}):\n{tail}')
        self.say(f'[done ] {name} in {seconds:.0f} s')
        for path in [] if self.keep else folder.glob('save/**/*.pth'):
            if path.name != 'last.pth':  # a finished run is never resumed; chains read last.pth
                path.unlink()

    def _finished(self, name, command, folder, text):
        with self.lock:
            self.results.append(Result(name, command, folder, text))
            return self.results[-1]

    def stop(self, signum, frame=None):
        """A signal handler: pass the signal on to the running scripts (they save their position
        and exit) and start no new run; the next call resumes them."""
        os.write(2, f'signal {signum}: stopping the runs; call again to continue\n'.encode())
        with self.lock:
            self.stopping = signum
            for child in list(self.children):  # a run may end meanwhile
                child.send_signal(signum)

    def map(self, job, items):
        """``[job(*item) for item in items]`` in threads (``--jobs`` runs at a time overall).

        Runs start in the order of the items, each job's chain of runs before the next job's.
        A job that raised NotRun gives None. After a failure the jobs still running finish;
        then the first failure is raised; after a signal (``stop``), NotRun.
        """
        items = [item if isinstance(item, tuple) else (item,) for item in items]
        if not items:
            return []
        parent = getattr(self.local, 'priority', ())
        self.slots.expect([parent + (i,) for i in range(len(items))], arrived=parent)

        def call(index, item):
            self.local.priority = parent + (index,)
            try:
                return job(*item)
            finally:
                self.slots.job_done(self.local.priority)

        with ThreadPoolExecutor(max_workers=len(items)) as pool:
            futures = [pool.submit(call, i, item) for i, item in enumerate(items)]
        results, errors = [], []
        for future in futures:
            try:
                results.append(future.result())
            except NotRun:
                results.append(None)
            except Exception as exc:  # raised below, once the others have finished
                results.append(None)
                errors.append(exc)
        if errors:
            raise errors[0]
        if self.stopping:
            raise NotRun(f'stopped by signal {self.stopping}')
        return results

    def choose_rate(self, score, rates, ladder=(), max_extensions=0):
        """The rate of the highest ``score(rate)``, and ``{rate: score}``.

        ``score`` runs the validation runs of one rate and returns a number or a tuple (compared
        in order; ties go to the smaller rate). While the best rate is the smallest or the
        largest tried, the next rate of ``ladder`` beyond it is tried too, at most
        ``max_extensions`` times, so that a winner at the edge of the grid is not taken for the
        optimum. Raises NotRun while a score is missing.
        """
        scores = dict(zip(rates, self.map(score, rates)))
        if None in scores.values():
            raise NotRun('a validation run is missing')
        for _ in range(max_extensions):  # score() raises NotRun itself
            tried = sorted(scores)
            best = max(tried, key=lambda r: (scores[r], -r))
            step = -1 if best == tried[0] else 1 if best == tried[-1] else 0
            index = ladder.index(best) + step if best in ladder else -1
            if not step or not 0 <= index < len(ladder) or ladder[index] in scores:
                break
            self.say(f'best rate so far {best}, at the edge of {tried}: trying {ladder[index]}')
            scores[ladder[index]] = score(ladder[index])
        return max(sorted(scores), key=lambda r: (scores[r], -r)), scores

    def report(self, title, sections, argv=None):
        """Print the tables and write them to ``<out>/<slug of title>.md`` with the benchmark's
        command, the commits its runs were measured on, and every run's command line."""
        argv = sys.argv if argv is None else argv
        argv = [os.path.relpath(os.path.abspath(argv[0]), REPO)] + argv[1:]
        results = sorted(self.results, key=lambda r: r.name)
        commits = Counter(c for r in results for c in dict.fromkeys(r.commits))
        measured = ', '.join(f'{c} ({n} runs)' for c, n in commits.items()) or 'no run finished'
        seconds = sum(r.seconds for r in results)
        lines = [f'# {title}', '', f'Command: `python {" ".join(argv)}`', '']
        lines += [f'Measured on: {measured}; {len(results)} runs finished, {seconds:.0f} s of runs']
        if self.todo:
            lines += ['', f'Not finished ({len(self.todo)} runs): ' + '; '.join(self.todo)]
        for heading, body in sections:
            lines += ['', f'## {heading}', '', body]
        lines += ['', '## Runs', '', '```']
        lines += [f'{r.name}: {" ".join(r.command)}' for r in results] + ['```']
        path = self.out / (re.sub(r'[^a-z0-9]+', '_', title.lower()).strip('_') + '.md')
        self.out.mkdir(parents=True, exist_ok=True)
        path.write_text('\n'.join(lines) + '\n')
        for heading, body in sections:
            print(f'\n{heading}\n\n{body}')
        print(f'\n{len(results)} runs finished, {len(self.todo)} not; written to {path}')
        print(''.join(f'  not finished: {line}\n' for line in self.todo), end='')
        return path


def main(build, run_sweep, argv=None):
    """A benchmark script's ``__main__``: parse with ``build()``, then ``run_sweep(args, sweep)``;
    a failed run ends the script with its error (exit 1)."""
    args = build().parse_args(argv)
    sweep = Sweep(args)
    signal.signal(signal.SIGTERM, sweep.stop)
    try:
        run_sweep(args, sweep)
    except RunFailed as exc:
        print(f'error: {exc}', file=sys.stderr)
        sys.exit(1)
    except NotRun:
        if sweep.stopping:
            sys.exit(128 + sweep.stopping)
        todo = ''.join(f'\n  not finished: {line}' for line in sweep.todo)
        print(f'stopped: {len(sweep.todo)} runs to do before the next step{todo}', file=sys.stderr)
