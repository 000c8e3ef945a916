"""Export a trained model for use without this code: TorchScript, ONNX, or plain weights.

Reads a checkpoint of main_linear.py (with the encoder checkpoint it records, or
``--encoder``), main_linear.py --finetune, main_ce.py, or main_supcon.py (the encoder alone),
and writes ``--out``:

- ``--format torchscript``: a traced module, for PyTorch and libtorch;
- ``--format onnx``: an ONNX model, for onnxruntime and other runtimes (needs the optional
  packages onnx, onnxscript and onnxruntime);
- ``--format weights``: the encoder's state dict in torchvision's ResNet names (our ResNets)
  or timm's (timm backbones), to load with ``strict=True`` into those libraries' models.

TorchScript and ONNX take float images ``[batch, 3, size, size]`` in [0, 1] with the
checkpoint's normalisation inside the graph, for any batch size, and return the classifier's
logits (or the encoder's features). ``<out>.json`` next to the file (and, for ONNX and
TorchScript, a copy inside it) records the input size, mean/std, class names and the output.
Before anything is written, the exported model is run against PyTorch on random images
(batches of 1 and 3) and refused if they differ. docs/using-a-model.md shows how to use each.
"""

import argparse
import os
import time

import torch

from supcon.errors import UserError
from supcon.inference import export
from supcon.inference.trained_model import load_trained_model
from supcon.system import runtime
from supcon.system.checkpoint import file_write_problem

SUFFIXES = {'torchscript': ('.pt', '.pth'), 'onnx': ('.onnx',), 'weights': ('.pth', '.pt')}


def parse_option(argv=None):
    parser = argparse.ArgumentParser(
        prog='main_export.py',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='Export a checkpoint\'s encoder (and classifier) as TorchScript, ONNX, or'
        ' a plain state dict in torchvision\'s or timm\'s names.',
    )
    parser.add_argument(
        '--ckpt',
        type=str,
        default='',
        help='(required) a checkpoint of main_linear.py, main_ce.py or main_supcon.py',
    )
    parser.add_argument(
        '--format',
        type=str,
        default=None,
        choices=export.FORMATS,
        help='(required) torchscript or onnx: the network with its normalisation, images in'
        ' [0, 1]; weights: the encoder\'s state dict in its library\'s names',
    )
    parser.add_argument(
        '--out',
        type=str,
        default='',
        help='(required) the file to write (.pt for torchscript, .onnx, .pth for weights);'
        ' its metadata goes to <out>.json',
    )
    parser.add_argument(
        '--encoder',
        type=str,
        default=None,
        help='main_linear.py checkpoints: the encoder checkpoint to use; default: the one'
        ' the classifier records',
    )
    opt = parser.parse_args(argv)

    if not opt.ckpt:
        raise UserError(
            '--ckpt is required: pass the checkpoint to export, e.g.'
            ' ./save/SupCon/digits_linear_models/<run>/last.pth'
        )
    if opt.format is None:
        raise UserError(f'--format is required: one of {", ".join(export.FORMATS)}')
    if not opt.out:
        raise UserError(
            f'--out is required: the file to write, e.g. model{SUFFIXES[opt.format][0]}'
        )
    if not opt.out.endswith(SUFFIXES[opt.format]):
        raise UserError(
            f'--out {opt.out}: a --format {opt.format} file should end in'
            f' {" or ".join(SUFFIXES[opt.format])}; rename it'
        )
    for path in (opt.out, opt.out + '.json'):
        problem = file_write_problem(path)
        if problem:
            raise UserError(
                f'--out {opt.out}: cannot write {path} ({problem}); pass a writable path'
            )
    if opt.format == 'onnx':
        export.require_onnx()  # before the checkpoint is read
    return opt


def set_model(opt):
    """The checkpoint's networks on the CPU, in eval mode (export is done on the CPU)."""
    return load_trained_model(opt.ckpt, encoder=opt.encoder, need_classifier=False)


def export_file(opt, tm):
    """(bytes of --out, its metadata); checked against PyTorch for the graph formats."""
    meta = export.metadata(tm, opt.format)
    if opt.format == 'weights':
        return export.weights_bytes(tm), meta, None
    if opt.format == 'torchscript':
        content = export.torchscript_bytes(tm, meta)
    else:
        content = export.onnx_bytes(tm, meta)
    difference = export.parity(content, opt.format, tm)
    if not difference <= export.CHECK_TOLERANCE:
        raise UserError(
            f'the {opt.format} export of --ckpt {opt.ckpt} differs from PyTorch by'
            f' {difference:.2g} (relative; more than {export.CHECK_TOLERANCE:g}), so it was not'
            f' written; try --format {"onnx" if opt.format == "torchscript" else "torchscript"}'
        )
    return content, meta, difference


def main():
    opt = parse_option()
    start = time.time()

    # build model
    tm = set_model(opt)
    head = 'classifier' if tm.classifier is not None else 'encoder'
    print(
        f'exporting the {tm.model} {head} of --ckpt {opt.ckpt} ({tm.kind}'
        + (f', encoder {tm.encoder_path}' if tm.kind == 'linear' else '')
        + f') as {opt.format}',
        flush=True,
    )

    # export, check, write
    with torch.no_grad():
        content, meta, difference = export_file(opt, tm)
    os.makedirs(os.path.dirname(os.path.abspath(opt.out)), exist_ok=True)
    try:
        side = export.write(opt.out, content, meta)
    except OSError as exc:
        raise UserError(
            f'--out {opt.out}: cannot write it ({exc.strerror or exc}); pass a writable path'
        ) from None
    if difference is not None:
        print(
            f'checked: the file gives PyTorch\'s outputs to {difference:.1e} (batches of 1 and 3)'
        )
    if opt.format == 'weights':
        print(f'load it with {meta["library"]}: {meta["build"]} (docs/using-a-model.md)')
    else:
        print(
            f'input: {meta["input"]}; output: {meta["output"]}'
            + (f', {meta["activation"]} for probabilities' if meta['activation'] else '')
        )
    print(f'wrote {opt.out} and {side} in {time.time() - start:.1f} s', flush=True)


if __name__ == '__main__':
    runtime.launch(main)
