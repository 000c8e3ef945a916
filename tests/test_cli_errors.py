"""argparse's own errors (an unknown flag, a missing value, a value outside the choices, a value of
the wrong type) are one ``error: ...`` line and exit code 2 in every script, as every other bad
input is; ``--help`` still prints the usage (supcon/system/cli.py)."""

import pytest
from inprocess import call

SCRIPTS = (
    'main_supcon', 'main_ce', 'main_linear', 'main_tsne', 'main_retrieval', 'run_with_submitit',
)  # fmt: skip

# (arguments, what the line names), each an error argparse itself finds in every script
ERRORS = [
    (['--no_such_flag', '1'], 'unrecognized arguments: --no_such_flag 1'),
    (['--device'], 'argument --device: expected one argument'),
    (['--amp_dtype', 'float8'], "argument --amp_dtype: invalid choice: 'float8'"),
    (['--num_workers', 'many'], "argument --num_workers: invalid int value: 'many'"),
]
LAUNCHER_ERRORS = [  # run_with_submitit.py hands unknown flags to the script
    (['--nodes'], 'argument --nodes: expected one argument'),
    (['--ngpus', 'eight'], "argument --ngpus: invalid int value: 'eight'"),
]


@pytest.mark.parametrize('script', SCRIPTS)
def test_argparse_errors_are_one_line_without_the_usage_block(script, tmp_path):
    for args, fragment in LAUNCHER_ERRORS if script == 'run_with_submitit' else ERRORS:
        result = call(script, args, tmp_path)
        assert result.code == 2, (args, result.out, result.err)
        message = result.err.strip()
        assert '\n' not in message and 'usage:' not in result.out + result.err, message
        assert message.startswith(f'error: {fragment}'), message
        assert message.endswith(f'see python {script}.py --help'), message
    assert not list(tmp_path.rglob('*.pth'))


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_still_prints_the_usage(script, tmp_path):
    result = call(script, ['--help'], tmp_path)
    assert result.code == 0 and not result.err
    assert result.out.startswith(f'usage: {script}.py [-h]') and '\noptions:\n' in result.out
