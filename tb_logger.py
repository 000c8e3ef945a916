"""TensorBoard logging in the reference's ``tensorboard_logger`` style, through SummaryWriter.

The reference logged with ``tensorboard_logger``, which crashes with protobuf >= 4;
``TBLogger.log_value(name, value, step)`` keeps its calls and folders.
"""
import os
import time

from runtime import is_main_process


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
    """

    def __init__(self, log_dir, purge_step=None):
        self.writer = None
        if is_main_process():
            from torch.utils.tensorboard import SummaryWriter
            wait_for_a_later_second(log_dir)
            self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def log_value(self, name, value, step):
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
