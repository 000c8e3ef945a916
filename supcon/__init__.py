"""The machinery the reference scripts lack, in sub-packages by job; each imports only the
ones listed before it (``tests/test_layout.py`` checks both the order and that this map names
every module).

``errors``: ``UserError`` and ``NonFiniteLossError``, the errors printed as one line.

``system`` -- devices, processes and files: ``runtime`` (devices, torchrun / DDP, mixed
precision, seeding, ``launch``), ``distributed`` (rank, gathering), ``slurm``, ``atomic`` (the one
atomic write), ``checkpoint`` (checkpoint files), ``run_lock`` (one live run per save folder),
``cli`` (argparse's errors in one line).

``data`` -- what the networks read: ``datasets`` (the registry and the loaders), ``cifar``,
``fashion_mnist`` (its IDX files),
``image_folder``, ``csv_dataset``, ``sampling`` (seeded, resumable, sharded order), ``augment``
and ``gpu_augment`` (the transforms), ``normalization`` (--mean/--std), and the capabilities that
shape the training data: ``val_split``, ``long_tail`` (long-tailed training splits), ``subset``
(a fixed class-balanced part of the training images), ``balanced``
(--sampler balanced), ``labelling`` (partial and multiple labels), ``views`` (--n_views and
multi-crop: the views per image), and ``identity`` (the training data's fingerprint, checked on
resume).

``evaluation`` -- measuring an encoder: ``extract`` (frozen features), ``knn``, ``retrieval`` and
``retrieval_data`` (what main_retrieval.py embeds and names its results after),
``classify`` (the classifier's test-split evaluation), ``multilabel`` (mean average precision,
F1), ``class_accuracy`` (per-class and many/medium/few-shot accuracy).

``inference`` -- using a trained model: ``trained_model`` (a checkpoint's network rebuilt with
its preprocessing), ``predictions`` (main_predict.py's images and rows), ``export``
(main_export.py: TorchScript, ONNX, plain weights).

``objectives`` -- what a training step computes: ``step`` (main_supcon.py's step: views, forward,
loss, backward, optimizer step), ``contrastive`` (the loss's lean autograd
function behind ``losses.SupConLoss``), ``moco`` (the key encoder and queue), ``probe`` (the
online probe and the joint classifier), ``positives`` (positives per anchor), ``grad_cache``
(--grad_cache: the step's forward and backward passes in chunks).

``training`` -- the loop around the step: ``loop`` (the epoch loop of every training script),
``bookkeeping`` (resume, checkpoints, signals, TensorBoard), ``optim``, ``tb_logger``,
``finetune`` (main_linear.py --finetune).

At the top: ``options`` (the flags the scripts share) and ``capabilities`` (the optional
capabilities, each declaring its flags, checks, run-name part and what is fixed on resume).
The reference's own API stays at the root: ``losses.py``, ``util.py``, ``networks/``.
"""
