"""The machinery the reference scripts lack, split by job.

Data: ``data`` (data sets and loaders), ``cifar``, ``sampling``, ``augment``, ``gpu_augment``.
Devices and processes: ``runtime``, ``distributed``. Checkpoints and a run's bookkeeping:
``atomic``, ``checkpoint``, ``training_run``, ``tb_logger``, ``options``, ``optim``.
Evaluation: ``engine`` (the classifier loop), ``features`` (features and kNN). Methods: ``moco``.
The reference's own API stays at the root: ``losses.py``, ``util.py``, ``networks/``.
"""
