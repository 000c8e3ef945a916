"""Tests for tb_logger.py: event files of a resumed run sort after the killed run's."""
import argparse

import torch
import torch.nn as nn

import tb_logger


def schedule(**overrides):
    opt = dict(learning_rate=0.5, cosine=True, lr_decay_rate=0.1, epochs=10,
               lr_decay_epochs=[3, 6], batch_size=32, warm=False, model_name='run')
    opt.update(overrides)
    return argparse.Namespace(**opt)


def sgd(lr=0.777, groups=1):
    params = [nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    return torch.optim.SGD([{'params': [p]} for p in params], lr=lr)


def test_a_new_event_file_sorts_after_the_existing_ones(tmp_path):
    """A resumed run's TensorBoard file must not share the killed run's second (name order)."""
    import time
    now = int(time.time())
    (tmp_path / f'events.out.tfevents.{now}.host.99999.0').write_bytes(b'')
    tb_logger.wait_for_a_later_second(str(tmp_path))
    assert int(time.time()) > now
    logger = tb_logger.TBLogger(str(tmp_path), purge_step=2)
    logger.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == f'events.out.tfevents.{now}.host.99999.0'
    # older files, or none, cost no wait
    old = tmp_path / 'old'
    old.mkdir()
    (old / f'events.out.tfevents.{now - 5}.host.1.0').write_bytes(b'')
    start = time.time()
    tb_logger.wait_for_a_later_second(str(tmp_path / 'missing'))
    tb_logger.wait_for_a_later_second(str(old))
    assert time.time() - start < 0.5
