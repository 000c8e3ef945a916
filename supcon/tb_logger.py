"""TensorBoard logging in the reference's ``tensorboard_logger`` style, through SummaryWriter.

The reference logged with ``tensorboard_logger``, which crashes with protobuf >= 4;
``TBLogger.log_value(name, value, step)`` keeps its calls and folders.
"""

import os
import time

from supcon.runtime import is_main_process


def wait_for_a_later_second(log_dir):
    """Sleep (under a second) until the clock is past every event file's timestamp in ``log_dir``.

    TensorBoard reads a folder's event files in name order, and a name starts with the second the
    writer was created, then host and process id. A resumed run whose writer started in the same
    second as the killed run's could sort first; its purge_step would then erase the killed run's
    earlier epochs instead of hiding its later ones.
    """
    stamps = []
    for name in os.listdir(log_dir) if os.path.isdir(log_dir) else ():
        parts = name.split('.')
        if name.startswith('events.out.tfevents.') and len(parts) > 3 and parts[3].isdigit():
            stamps.append(int(parts[3]))
    if stamps:
        delay = max(stamps) + 1 - time.time()
        if 0 < delay <= 2:
            time.sleep(delay)


class TBLogger:
    """``log_value(name, value, step)`` as tensorboard_logger had, on the main process.

    ``purge_step`` hides events at or after the step a resumed run starts from,
    so a run killed after logging but before saving shows no duplicated step.
    The folder and its event file are made at the first ``log_value``, so a run that
    fails before it has anything to log leaves no empty TensorBoard folder behind.
    """

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step = log_dir, purge_step
        self.writer = None
        self.closed = False

    def _open(self):
        if self.writer is None and not self.closed and is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            wait_for_a_later_second(self.log_dir)
            self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=self.purge_step)
        return self.writer

    def log_value(self, name, value, step):
        writer = self._open()
        if writer is not None:
            writer.add_scalar(name, value, step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        self.closed = True
        if self.writer is not None:
            self.writer.close()
            self.writer = None
