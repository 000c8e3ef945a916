"""The entry scripts' argument parser: argparse's own errors as one ``error: ...`` line.

argparse answers an unknown flag, a missing value or a value outside ``choices`` with its whole
usage block (40 lines for main_supcon.py) and then the error; every other bad input here is one
line naming the problem and the fix. This parser raises the error as a ``UserError`` instead,
which ``runtime.launch`` prints once (on rank 0 under torchrun) and turns into exit code 2.
``--help`` prints exactly what argparse prints.
"""

import argparse

from supcon.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (a ``UserError``), usage left out."""

    def error(self, message):
        one_line = ' '.join(str(message).split())
        raise UserError(f'{one_line}; see python {self.prog} --help')
