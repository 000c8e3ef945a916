"""SLURM: a task's place in the job from SLURM's variables, node lists, and requeueing.

``srun python main_supcon.py ...`` starts one process per task without torchrun.
``torchrun_variables`` turns what SLURM tells a task (SLURM_PROCID, SLURM_NTASKS, ...)
into the variables torchrun would have set, so ``runtime.torchrun_environment`` and
PyTorch's ``env://`` rendezvous work unchanged. After SIGUSR1 (``sbatch
--signal=USR1@120``, or pre-emption under ``preempt_send_user_signal``) the main
process puts the job back in the queue (``requeue``), and a job SLURM started again
continues from its checkpoint by itself (``default_resume``). docs/clusters.md shows the
batch scripts.
"""

import os
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Mapping

from supcon.errors import UserError

#: Signals after which the job is requeued. SIGTERM is not one of them: ``scancel`` sends it,
#: and a job that requeued itself then could not be cancelled.
REQUEUE_SIGNALS = (signal.SIGUSR1,) if hasattr(signal, 'SIGUSR1') else ()  # none on Windows

#: MASTER_PORT = PORT_BASE + job id mod PORT_SPAN: jobs sharing a node get different ports, a
#: requeued job (same id) the same one, and the range stays below Linux's ephemeral ports.
PORT_BASE, PORT_SPAN = 10000, 20000

_RANGE = re.compile(r'(\d+)(?:-(\d+))?')


def expand_hostlist(text: str) -> list[str]:
    """The host names of a SLURM node list, in order, as ``scontrol show hostnames`` gives them.

    ``node[01-03,7]`` -> node01 node02 node03 node7; ``a[1-2],b3`` -> a1 a2 b3;
    ``gpu-[001-002]x`` -> gpu-001x gpu-002x; ``r[1-2]c[1-2]`` -> r1c1 r1c2 r2c1 r2c2. A range
    keeps the zero padding of its first number. Raises ``ValueError`` on a malformed list.
    """
    hosts, start, depth = [], 0, 0
    for i, char in enumerate(text + ','):
        if char == '[':
            depth += 1
        elif char == ']':
            depth -= 1
        if depth not in (0, 1):
            raise ValueError(f'unbalanced brackets in the node list {text!r}')
        if char == ',' and depth == 0:
            if i > start:
                hosts.extend(_expand_host(text[start:i], text))
            start = i + 1
    if depth:
        raise ValueError(f'unbalanced brackets in the node list {text!r}')
    return hosts


def _expand_host(pattern, text):
    """One comma-free entry: every bracket group multiplies the names (the first outermost)."""
    names = ['']
    for literal, group in re.findall(r'([^\[]*)(?:\[([^\]]*)\])?', pattern):
        choices = [literal]
        if group:
            choices = [literal + number for number in _expand_ranges(group, text)]
        names = [name + choice for name in names for choice in choices]
    return names


def _expand_ranges(group, text):
    numbers = []
    for item in group.split(','):
        match = _RANGE.fullmatch(item.strip())
        if not match:
            raise ValueError(f'{item!r} in the node list {text!r} is not a number or a range')
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f'the range {item!r} in the node list {text!r} runs backwards')
        numbers.extend(f'{n:0{len(low)}d}' for n in range(int(low), int(high) + 1))
    return numbers


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from SLURM_TASKS_PER_NODE's form, e.g. ``2(x3),1``."""
    counts = []
    for item in tasks_per_node.split(','):
        match = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', item.strip())
        if not match:
            raise ValueError(f'{tasks_per_node!r} is not a list of task counts')
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    if not 0 <= node_id < len(counts):
        raise ValueError(f'{tasks_per_node!r} has no task count for node {node_id}')
    return counts[node_id]


def master_port(job_id: str) -> int:
    """The rendezvous port of a job: the same on every node, different for most jobs."""
    digits = re.sub(r'\D', '', str(job_id))  # array jobs: 123_4
    return PORT_BASE + int(digits or 0) % PORT_SPAN


def _first(environ, *names):
    for name in names:
        if environ.get(name):
            return name, environ[name]
    return names[0], None


def _whole_number(environ, name, value):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(
            f'the environment variable {name}={value!r} is not a whole number; start the tasks'
            f' with srun, or unset the SLURM_* variables to run one process'
        ) from None


def in_job_step(environ: Mapping[str, str] | None = None) -> bool:
    """True in a task srun started; False in a job's batch script or outside SLURM."""
    environ = os.environ if environ is None else environ
    return bool(environ.get('SLURM_STEP_ID') or environ.get('SLURM_STEPID'))


def torchrun_variables(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The torchrun variables of this SLURM task, or None for one process.

    None outside SLURM, for a job step of one task, and in a job's batch script (a single
    process even in a job of several tasks: it prints a note on how to start them all).
    The master is the first host of the step's node list (the job's when the step has
    none); MASTER_ADDR and MASTER_PORT already set are kept. LOCAL_RANK indexes the GPUs
    the task sees: with one GPU bound to each task (``--gpus-per-task=1``) it is 0.
    LOCAL_WORLD_SIZE counts the tasks sharing this task's CPUs: the tasks on the node, or 1
    when SLURM bound each task to its own (``bound_to_own_cpus``).
    Malformed values raise a one-line ``UserError``.
    """
    environ = os.environ if environ is None else environ
    ntasks_name, ntasks = _first(environ, 'SLURM_STEP_NUM_TASKS', 'SLURM_NTASKS', 'SLURM_NPROCS')
    if 'SLURM_PROCID' not in environ or ntasks is None:
        return None
    world_size = _whole_number(environ, ntasks_name, ntasks)
    rank = _whole_number(environ, 'SLURM_PROCID', environ['SLURM_PROCID'])
    local_rank = _whole_number(environ, 'SLURM_LOCALID', environ.get('SLURM_LOCALID', '0'))
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise UserError(
            f'SLURM says {ntasks_name}={world_size}, SLURM_PROCID={rank},'
            f' SLURM_LOCALID={local_rank}, which cannot be: start the tasks with srun, or'
            f' unset the SLURM_* variables to run one process'
        )
    if world_size == 1:
        return None
    if not in_job_step(environ):
        if rank == 0:
            print(
                f'note: this is the batch script of a SLURM job of {world_size} tasks, so it'
                f' runs as one process; start all {world_size} with srun (srun python ...)',
                flush=True,
            )
        return None
    nodes_name, nodes = _first(
        environ, 'SLURM_STEP_NODELIST', 'SLURM_JOB_NODELIST', 'SLURM_NODELIST'
    )
    address = environ.get('MASTER_ADDR')
    if not address:
        try:
            hosts = expand_hostlist(nodes or '')
        except ValueError as exc:
            raise UserError(f'{nodes_name}: {exc}; set MASTER_ADDR to the first host') from None
        if not hosts:
            raise UserError(
                f'SLURM names no node list ({nodes_name} is empty): set MASTER_ADDR to the'
                f' host of task 0'
            )
        address = hosts[0]
    port = environ.get('MASTER_PORT') or str(master_port(environ.get('SLURM_JOB_ID', '0')))
    node_id = _whole_number(environ, 'SLURM_NODEID', environ.get('SLURM_NODEID', '0'))
    per_node_name, per_node = _first(environ, 'SLURM_STEP_TASKS_PER_NODE', 'SLURM_TASKS_PER_NODE')
    try:
        local_world = tasks_on_node(per_node, node_id) if per_node else world_size
    except ValueError as exc:
        raise UserError(f'{per_node_name}: {exc}; start the tasks with srun') from None
    if bound_to_own_cpus(environ):
        # runtime gives each process (its CPUs // LOCAL_WORLD_SIZE) loader workers: the CPUs
        # of a task SLURM bound to its --cpus-per-task are its alone, shared with no task
        local_world = 1
    visible = [d for d in environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
    device_index = (
        local_rank % len(visible) if len(visible) and local_rank >= len(visible) else local_rank
    )
    return {
        'WORLD_SIZE': str(world_size),
        'RANK': str(rank),
        'LOCAL_RANK': str(device_index),
        'LOCAL_WORLD_SIZE': str(local_world),
        'MASTER_ADDR': address,
        'MASTER_PORT': port,
    }


def cpus_seen() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def bound_to_own_cpus(environ: Mapping[str, str] | None = None) -> bool:
    """True when SLURM bound this task to its own CPUs (it sees no more than
    SLURM_CPUS_PER_TASK), as task/affinity or task/cgroup do; False when tasks share them."""
    environ = os.environ if environ is None else environ
    try:
        per_task = int(environ.get('SLURM_CPUS_PER_TASK') or 0)
    except ValueError:
        return False
    return per_task > 0 and cpus_seen() <= per_task


def restarted(environ: Mapping[str, str] | None = None) -> bool:
    """True in a job that SLURM started again (requeued or pre-empted and requeued)."""
    environ = os.environ if environ is None else environ
    try:
        return int(environ.get('SLURM_RESTART_COUNT') or 0) > 0
    except ValueError:
        return False


def default_resume(environ: Mapping[str, str] | None = None) -> str | None:
    """--resume's default: ``auto`` in a restarted SLURM job, so it continues where it stopped."""
    return 'auto' if restarted(environ) else None


def launcher(environ: Mapping[str, str] | None = None) -> str | None:
    """How to start the tasks again, for the line printed after a stop; None when not srun."""
    environ = os.environ if environ is None else environ
    if in_job_step(environ) and 'TORCHELASTIC_RUN_ID' not in environ:
        return 'srun <the same srun options> python'
    return None


def requeue(signum: int, environ: Mapping[str, str] | None = None) -> str | None:
    """After a requeue signal in a SLURM job, ``scontrol requeue`` it; returns what happened.

    Call on the main process only, once the position is saved. None when there is nothing
    to do (another signal, or not a SLURM job); otherwise one sentence for the log: the job
    was requeued, or why not and what to run instead.
    """
    environ = os.environ if environ is None else environ
    job_id = environ.get('SLURM_JOB_ID')
    if signum not in REQUEUE_SIGNALS or not job_id:
        return None
    command = ['scontrol', 'requeue', job_id]
    scontrol = shutil.which('scontrol', path=environ.get('PATH'))
    if scontrol is None:
        return (
            f'scontrol is not on the PATH, so SLURM job {job_id} was not requeued: run'
            f' `{shlex.join(command)}` where SLURM\'s commands are (the job then continues'
            f' with --resume auto)'
        )
    # SLURM answers a requeue with SIGTERM to every process of the job, scontrol included:
    # blocked (the mask survives exec; this thread's is restored after), it cannot kill scontrol
    # before it reports its success (it did, exit code -15)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        done = subprocess.run(
            [scontrol] + command[1:], capture_output=True, text=True, timeout=60, env=environ
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        why = f'{type(exc).__name__}: {exc}'
    else:
        if done.returncode == 0:
            return f'requeued SLURM job {job_id}: it continues from here by itself (--resume auto)'
        lines = (done.stderr or done.stdout).strip().splitlines()
        why = lines[-1] if lines else f'exit code {done.returncode}'
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return (
        f'`{shlex.join(command)}` failed ({why}), so the job was not requeued: run it by hand,'
        f' or submit the job again with --resume auto'
    )
