"""Tests for tb_logger.py: event files of a resumed run sort after the killed run's."""

from supcon.training import tb_logger


def test_a_new_event_file_sorts_after_the_existing_ones(tmp_path):
    """A resumed run's TensorBoard file must not share the killed run's second (name order)."""
    import time

    now = int(time.time())
    (tmp_path / f'events.out.tfevents.{now}.host.99999.0').write_bytes(b'')
    tb_logger.wait_for_a_later_second(str(tmp_path))
    assert int(time.time()) > now
    logger = tb_logger.TBLogger(str(tmp_path), purge_step=2)
    logger.log_value('loss', 1.0, 2)  # the event file is made at the first value
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


def test_the_folder_is_made_at_the_first_value_and_purge_step_still_applies(tmp_path):
    """A run that fails before it logs anything leaves no empty TensorBoard folder."""
    from helpers import read_scalars

    folder = tmp_path / 'tb' / 'run'
    logger = tb_logger.TBLogger(str(folder), purge_step=1)
    logger.flush()
    logger.close()
    assert not (tmp_path / 'tb').exists()

    first = tb_logger.TBLogger(str(folder), purge_step=1)
    for step in (1, 2, 3):
        first.log_value('loss', float(step), step)
    first.close()
    first.log_value('loss', 9.0, 9)  # closed: ignored, as before
    resumed = tb_logger.TBLogger(str(folder), purge_step=2)  # killed after epoch 1 was saved
    assert len(list(folder.iterdir())) == 1  # nothing new until a value comes
    resumed.log_value('loss', 20.0, 2)
    resumed.close()
    assert read_scalars(folder)['loss'] == [(1, 1.0), (2, 20.0)]
