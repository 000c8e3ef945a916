"""TensorBoard logging in the reference's ``tensorboard_logger`` style, through SummaryWriter.

The reference logged with ``tensorboard_logger``, which crashes with protobuf >= 4;
``TBLogger.log_value(name, value, step)`` keeps its calls and folders. Beyond the reference's
epoch scalars (docs/monitoring.md): a grid of training views (``log_image``), scalars per step
(``log_step_value``, in the sub-run ``step/``) and the HPARAMS tab's record (``log_hparams``).
"""

import math
import os
import time

import torch
import torch.nn.functional as F

from supcon.system.runtime import is_main_process

#: the sub-folder (a run of its own in TensorBoard) of the scalars whose step is the global step
STEP_RUN = 'step'


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

    Per-step scalars go to a second writer in ``<log_dir>/step``: a purge hides every tag's
    events at or after its step, and epoch numbers and global steps cannot share one.
    """

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step = log_dir, purge_step
        self.writer = None
        self.step_writer = None
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

    def log_image(self, name, image, step):
        """``image`` [3, H, W] with values in [0, 1] (see ``views_grid``)."""
        writer = self._open()
        if writer is not None:
            writer.add_image(name, image, step)

    def log_step_value(self, name, value, step, purge_step):
        """A scalar at global step ``step``, in the sub-run ``step/``; ``purge_step`` (the first
        global step of this process) hides what a killed run logged from there on."""
        if self.step_writer is None and not self.closed and is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            folder = os.path.join(self.log_dir, STEP_RUN)
            wait_for_a_later_second(folder)
            self.step_writer = SummaryWriter(log_dir=folder, purge_step=purge_step)
        if self.step_writer is not None:
            self.step_writer.add_scalar(name, value, step)

    def log_hparams(self, hparams, metrics, step):
        """The HPARAMS tab's record of this run: ``hparams`` {name: value} and the tags of
        ``metrics``, whose last logged values the tab shows. Written at ``step`` (the run's
        last epoch), so a fresh run in the same folder purges it with the scalars."""
        writer = self._open()
        if writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        plain = {key: plain_hparam(value) for key, value in sorted(hparams.items())}
        summaries = hparams_summaries(
            {k: v for k, v in plain.items() if v is not None}, dict.fromkeys(metrics)
        )
        for summary in summaries:  # experiment, session start, session end
            writer._get_file_writer().add_summary(summary, step)

    def flush(self):
        for writer in (self.writer, self.step_writer):
            if writer is not None:
                writer.flush()

    def close(self):
        self.closed = True
        for writer in (self.writer, self.step_writer):
            if writer is not None:
                writer.close()
        self.writer = self.step_writer = None


def plain_hparam(value):
    """A value the HPARAMS tab can show: numbers as they are, switches and lists as text, and
    None (an option left at "not given") left out."""
    if value is None:
        return None
    if isinstance(value, bool):  # not a number 0/1 in the table
        return str(value)
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return ','.join(str(v) for v in value)
    return str(value)


def views_grid(images, mean, std, views=1, count=8, min_side=64):
    """A [3, H, W] grid in [0, 1] of the first ``count`` images of a batch, un-normalised.

    ``images`` holds ``views`` stacked view-major ([views * bsz, 3, h, w], as main_supcon.py
    feeds the network), or is a list of such tensors, one per view size (the full-size views,
    then --small_views'), with ``views`` the list of their counts: each image's views are shown
    side by side, two images to a row of the grid; a smaller view sits in the middle of a tile of
    the full size, so its size shows. Tiles are enlarged (nearest neighbour) to at least
    ``min_side`` pixels, so 8x8 digits are visible in TensorBoard's image card.
    """
    from torchvision.utils import make_grid

    if torch.is_tensor(images):
        images, views = [images], [views]
    images = [x.detach().float().cpu() for x in images]
    bsz = images[0].shape[0] // views[0]
    count = min(count, bsz)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    side = images[0].shape[-1]
    per_size = []
    for x, n in zip(images, views):
        # [count, n, 3, h, w]: image 0's views, image 1's views, ...
        tiles = torch.stack([x[v * bsz : v * bsz + count] for v in range(n)], dim=1)
        tiles = (tiles * std.unsqueeze(0) + mean.unsqueeze(0)).clamp(0, 1)
        left = (side - tiles.shape[-1]) // 2
        right = side - tiles.shape[-1] - left
        per_size.append(F.pad(tiles, (left, right, left, right), value=1.0))
    tiles = torch.cat(per_size, dim=1).flatten(0, 1)
    if side < min_side:
        scale = math.ceil(min_side / side)
        tiles = F.interpolate(tiles, scale_factor=scale, mode='nearest')
    total = sum(views)
    per_row = total * (2 if total > 1 else count)
    return make_grid(tiles, nrow=per_row, padding=2, pad_value=1.0)


def thumbnails(images, mean, std, side=32, count=None):
    """Un-normalised [N, 3, s, s] thumbnails in [0, 1] for the projector's sprite: smaller
    images enlarged by a whole factor (nearest neighbour), larger ones averaged down to ``side``;
    ``count`` points fit TensorBoard's 8192-pixel sprite."""
    images = images.detach().float().cpu()
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    images = (images * std + mean).clamp(0, 1)
    n = count or images.shape[0]
    side = min(side, max(1, 8192 // math.ceil(math.sqrt(n))))
    current = images.shape[-1]
    if current < side:
        images = F.interpolate(images, scale_factor=side // current, mode='nearest')
    elif current > side:
        images = F.interpolate(images, size=(side, side), mode='area')
    return images


def tsv_field(text):
    """``text`` as one field of metadata.tsv, which TensorBoard splits at tabs and newlines: a
    backslash, tab, newline or carriage return written as \\\\, \\t, \\n or \\r (a CSV label
    may hold any of them)."""
    for raw, escaped in (('\\', '\\\\'), ('\t', '\\t'), ('\n', '\\n'), ('\r', '\\r')):
        text = text.replace(raw, escaped)
    return text


def write_projector(folder, features, labels, class_names, images, tag):
    """The embedding projector's files in ``folder`` (``tensorboard --logdir folder``): an
    event file, ``projector_config.pbtxt`` and, under ``00000/<tag>/``, the features
    (tensors.tsv), a label and class name per row (metadata.tsv) and ``images``'s sprite.
    Files of an earlier call with the same tag are replaced. Returns the config's path."""
    from torch.utils.tensorboard import SummaryWriter

    embedding = os.path.join(folder, '00000', tag)
    for name in ('tensors.tsv', 'metadata.tsv', 'sprite.png'):
        if os.path.isfile(os.path.join(embedding, name)):
            os.remove(os.path.join(embedding, name))
    if os.path.isdir(embedding) and not os.listdir(embedding):
        os.rmdir(embedding)  # add_embedding warns about an existing folder
    metadata = [[int(label), tsv_field(class_names[int(label)])] for label in labels]
    writer = SummaryWriter(log_dir=folder)
    try:
        writer.add_embedding(
            features,
            metadata=metadata,
            label_img=images,
            tag=tag,
            metadata_header=['label', 'class'],
        )
    finally:
        writer.close()
    return os.path.join(folder, 'projector_config.pbtxt')
