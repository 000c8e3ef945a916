"""Submit a training script to SLURM with submitit, one task per GPU.

    python run_with_submitit.py --nodes 2 --ngpus 8 --partition gpu --timeout 1440 \\
        --script main_supcon.py --batch_size 1024 --learning_rate 0.5 --temp 0.1 --cosine

Every flag this launcher does not know goes to the script. Each task runs the script's
``main()`` as ``srun python main_supcon.py ...`` would: the ranks and the rendezvous come
from SLURM's variables (supcon/system/slurm.py), the checkpoints go to ./save/ under the folder
this command was started in. Before the time limit submitit sends its signal; its hook,
``Trainer.checkpoint``, puts the same command with ``--resume auto`` back in the queue, and
the job continues from the run's last checkpoint. docs/clusters.md has the details.
"""

import argparse
import os
import shutil
import sys

REPO = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ('main_supcon', 'main_ce', 'main_linear')
#: times submitit may requeue a job that reached its time limit (pre-emptions do not count)
MAX_TIMEOUTS = 30
#: seconds before the time limit that submitit's signal comes, as the sbatch scripts' USR1@120
SIGNAL_DELAY_S = 120


def parse_option(argv=None):
    """(launcher options, the script's own arguments)."""
    from supcon.system.cli import (
        ArgumentParser,  # here: the job's pickle loads before supcon is found
    )

    parser = ArgumentParser(
        prog='run_with_submitit.py',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # an abbreviation of a script flag must reach the script
        description='Submit main_supcon.py, main_ce.py or main_linear.py to SLURM through'
        ' submitit. Flags not listed here go to the script (python main_supcon.py --help'
        ' lists them).',
    )
    parser.add_argument(
        '--script', type=str, default='main_supcon.py', help='the training script to run'
    )
    parser.add_argument('--nodes', type=int, default=1, help='machines to ask for')
    parser.add_argument(
        '--ngpus', type=int, default=8, help='GPUs per machine (0 for a CPU-only job)'
    )
    parser.add_argument(
        '--ntasks_per_node',
        type=int,
        default=None,
        help='processes per machine; default: one per GPU (one with --ngpus 0)',
    )
    parser.add_argument(
        '--cpus_per_task', type=int, default=10, help='CPU cores per process (data loading)'
    )
    parser.add_argument(
        '--mem_gb', type=int, default=0, help='memory per machine in GB; 0: the partition\'s'
    )
    parser.add_argument(
        '--timeout', type=int, default=4320, help='time limit of each job, in minutes'
    )
    parser.add_argument(
        '--partition', type=str, default=None, help='SLURM partition; default: the cluster\'s'
    )
    parser.add_argument(
        '--job_dir',
        type=str,
        default='save/submitit/%j',
        help='where submitit keeps its logs and pickles (%%j: the job id)',
    )
    parser.add_argument('--name', type=str, default=None, help='job name; default: the script')
    opt, script_args = parser.parse_known_args(argv)
    return opt, script_args


class Trainer:
    """What each task runs: the script's ``main()`` on its own arguments, in the start folder.

    Only the standard library is referenced at module level, so the pickle loads in the
    job before the repository is on ``sys.path``.
    """

    def __init__(self, script, args, cwd, repo=REPO):
        self.script, self.args, self.cwd, self.repo = script, list(args), cwd, repo

    def __call__(self):
        os.chdir(self.cwd)  # ./save/ is where the command was started, as without SLURM
        if self.repo not in sys.path:
            sys.path.insert(0, self.repo)
        import importlib

        from supcon.system import runtime

        module = importlib.import_module(self.script)
        sys.argv = [os.path.join(self.repo, f'{self.script}.py')] + self.args
        runtime.launch(module.main)

    def checkpoint(self, *args, **kwargs):
        """submitit's hook at the time-limit signal: requeue the same run with --resume auto.

        It runs inside the signal handler, in the middle of a step, so it saves nothing
        itself: the job continues from the last checkpoint.pth, written after every epoch.
        """
        import submitit

        from supcon.training.bookkeeping import without_resume

        resumed = type(self)(
            self.script, without_resume(self.args) + ['--resume', 'auto'], self.cwd, self.repo
        )
        return submitit.helpers.DelayedSubmission(resumed)


def script_name(text):
    from supcon.errors import UserError

    name = os.path.basename(text)
    name = name[: -len('.py')] if name.endswith('.py') else name
    if name not in SCRIPTS:
        raise UserError(f'--script {text}: choose one of {", ".join(s + ".py" for s in SCRIPTS)}')
    return name


def main():
    import importlib

    from supcon.errors import UserError

    opt, script_args = parse_option()
    script = script_name(opt.script)
    tasks = opt.ntasks_per_node or max(1, opt.ngpus)
    for flag in ('nodes', 'cpus_per_task', 'timeout'):
        if getattr(opt, flag) < 1:
            raise UserError(f'--{flag} must be 1 or more, got {getattr(opt, flag)}')
    if opt.ngpus < 0 or opt.mem_gb < 0 or tasks < 1:
        raise UserError('--ngpus, --mem_gb and --ntasks_per_node cannot be negative')
    # the script's own flags are checked here, before the job waits in the queue
    importlib.import_module(script).parse_option(script_args)
    if shutil.which('sbatch') is None:
        raise UserError(
            'sbatch is not on the PATH, so there is no SLURM to submit to: run the script'
            f' itself here (python {script}.py ... or torchrun --nproc_per_node N {script}.py'
            ' ...)'
        )
    try:
        import submitit
    except ImportError:
        raise UserError(
            'submitit is not installed: pip install -r requirements.txt (or pip install'
            ' "submitit>=1.5,<2")'
        ) from None

    executor = submitit.AutoExecutor(
        folder=opt.job_dir, cluster='slurm', slurm_max_num_timeout=MAX_TIMEOUTS
    )
    parameters = dict(
        nodes=opt.nodes,
        tasks_per_node=tasks,
        cpus_per_task=opt.cpus_per_task,
        timeout_min=opt.timeout,
        name=opt.name or script,
        slurm_signal_delay_s=SIGNAL_DELAY_S,
    )
    if opt.ngpus:
        parameters['gpus_per_node'] = opt.ngpus
    if opt.mem_gb:
        parameters['mem_gb'] = opt.mem_gb
    if opt.partition:
        parameters['slurm_partition'] = opt.partition
    executor.update_parameters(**parameters)
    # the job's own Python finds the project whatever folder it starts in
    os.environ['PYTHONPATH'] = os.pathsep.join(
        [REPO] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
    )
    job = executor.submit(Trainer(script, script_args, os.getcwd()))
    print(
        f'submitted job {job.job_id}: {opt.nodes} node(s) x {tasks} task(s) of {script}.py;'
        f' logs in {str(job.paths.folder)}',
        flush=True,
    )
    return job


if __name__ == '__main__':
    sys.path.insert(0, REPO)
    from supcon.system.runtime import launch

    launch(main)
