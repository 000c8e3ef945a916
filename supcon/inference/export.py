"""main_export.py's formats: a trained model for runtimes without this code.

- ``torchscript``: ``torch.jit.trace`` of the encoder (and classifier), normalisation inside;
- ``onnx``: torch's ONNX exporter (``dynamo=True``), the same graph; needs the optional
  packages ``onnx``, ``onnxscript`` and, for the check after writing, ``onnxruntime``;
- ``weights``: the encoder as a plain state dict in the names of the library its architecture
  comes from: torchvision's ResNet for ours (``shortcut`` becomes ``downsample``; a CIFAR stem
  needs torchvision's ``conv1`` and ``maxpool`` replaced, docs/using-a-model.md), timm's own
  for timm backbones.

The graphs take float images ``[N, 3, size, size]`` in [0, 1] (RGB, resized to the model's
size) with any N, and return logits (a classifier) or pooled features (an encoder). What a
user needs to feed and read them (size, mean/std, class names, the output's activation) is
``metadata``: written next to every file as ``<file>.json``, and also inside the file (ONNX
``metadata_props``, TorchScript's extra file ``metadata.json``).
"""

import importlib.util
import io
import json
import re
import warnings

import torch
import torch.nn as nn

from networks.resnet_big import MODEL_NAMES
from supcon.errors import UserError
from supcon.inference.trained_model import TrainedModel
from supcon.system.atomic import atomic_write

FORMATS = ('torchscript', 'onnx', 'weights')
INPUT_NAME = 'images'
# what --format onnx needs: the exporter's packages, and the runtime that checks the file
ONNX_PACKAGES = ('onnx', 'onnxscript', 'onnxruntime')
ONNX_INSTALL = 'pip install "onnx>=1.17,<2" "onnxscript>=0.3,<1" "onnxruntime>=1.20,<2"'
METADATA_FILE = 'metadata.json'  # TorchScript's extra file
# a parity check of the written file against PyTorch, on random images in [0, 1]
CHECK_TOLERANCE = 1e-4


class Deployable(nn.Module):
    """Images in [0, 1] -> logits (or features): the checkpoint's normalisation inside."""

    def __init__(self, encoder: nn.Module, classifier: nn.Module | None, mean, std):
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier if classifier is not None else nn.Identity()
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images):
        return self.classifier(self.encoder((images - self.mean) / self.std))


def deployable(tm: TrainedModel) -> Deployable:
    return Deployable(tm.encoder, tm.classifier, tm.mean, tm.std).eval()


def output_name(tm: TrainedModel) -> str:
    return 'features' if tm.classifier is None else 'logits'


def metadata(tm: TrainedModel, fmt: str) -> dict:
    """What a user of the exported file needs to know, as JSON-ready values."""
    if tm.classifier is None:
        activation = None
    else:
        activation = 'sigmoid' if tm.multi_label else 'softmax'
    record = {
        'format': fmt,
        'checkpoint': tm.path,
        'kind': tm.kind,
        'model': tm.model,
        'stem': tm.stem if tm.model in MODEL_NAMES else None,
        'input_size': tm.size,
        'mean': list(tm.mean),
        'std': list(tm.std),
        'classes': tm.classes,
        'multi_label': tm.multi_label,
    }
    if fmt == 'weights':
        record.update(weights_how_to_build(tm))
        record['normalisation'] = 'not inside: Normalize(mean, std) the images first'
    else:
        record.update(
            input=f'{INPUT_NAME}: float32 [batch, 3, {tm.size}, {tm.size}], RGB in [0, 1]',
            normalisation='inside the graph',
            output=f'{output_name(tm)}: float32 [batch, {_width(tm)}]',
            activation=activation,
        )
    return record


def _width(tm):
    return tm.feature_dim if tm.classifier is None else tm.classifier.out_features


def missing_onnx_packages() -> list:
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def require_onnx():
    """Refuse --format onnx in one line when its optional packages are not installed."""
    missing = missing_onnx_packages()
    if missing:
        raise UserError(
            f'--format onnx needs the optional packages {", ".join(missing)}, which are not'
            f' installed: {ONNX_INSTALL} (or pip install -r requirements-dev.txt)'
        )


def example_images(tm: TrainedModel, batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, tm.size, tm.size, generator=generator)


def torchscript_bytes(tm: TrainedModel, meta: dict) -> bytes:
    """The traced module, metadata inside as the extra file ``metadata.json``."""
    module = deployable(tm)
    with warnings.catch_warnings():
        # torch 2.10+ marks TorchScript deprecated; it still runs in libtorch and PyTorch
        warnings.simplefilter('ignore', FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace(module, (example_images(tm, 2),))
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={METADATA_FILE: json.dumps(meta)})
    return buffer.getvalue()


def onnx_bytes(tm: TrainedModel, meta: dict) -> bytes:
    """The ONNX model (a dynamic batch dimension), metadata in ``metadata_props``."""
    require_onnx()
    module = deployable(tm)
    batch = torch.export.Dim('batch', min=1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the exporter's notes on its own internals
        program = torch.onnx.export(
            module,
            (example_images(tm, 2),),
            None,
            input_names=[INPUT_NAME],
            output_names=[output_name(tm)],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
    proto = program.model_proto
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    return proto.SerializeToString()


def onnx_metadata(proto) -> dict:
    """``metadata_props`` of an ONNX model as written by ``onnx_bytes`` (JSON values read)."""
    values = {}
    for entry in proto.metadata_props:
        try:
            values[entry.key] = json.loads(entry.value)
        except json.JSONDecodeError:
            values[entry.key] = entry.value
    return values


# --------------------------------------------------------------------------- weights

_SHORTCUT = re.compile(r'^(layer\d+\.\d+\.)shortcut\.')


def torchvision_state(state: dict) -> dict:
    """Our ResNet's state dict in torchvision's ResNet names: ``shortcut`` -> ``downsample``.

    Everything else (``conv1``, ``bn1``, ``layerN.M.convK``/``bnK``) is named alike; the
    inverse of ``networks.from_checkpoint.from_torchvision_layout``.
    """
    return {_SHORTCUT.sub(r'\1downsample.', key): value for key, value in state.items()}


def timm_build_kwargs(tm: TrainedModel) -> dict:
    """The ``timm.create_model`` keywords that build the encoder's architecture again
    (``networks.timm_backbone.create_encoder`` passes ``img_size`` where the model takes it)."""
    import timm

    kwargs = {'img_size': tm.encoder_options.get('size') or tm.size}
    if tm.encoder_options.get('patch_size') is not None:
        kwargs['patch_size'] = tm.encoder_options['patch_size']
    try:
        with torch.device('meta'):
            timm.create_model(tm.model, pretrained=False, num_classes=0, **kwargs)
    except TypeError as error:
        if 'img_size' not in str(error):
            raise
        kwargs.pop('img_size')
    return kwargs


def weights_how_to_build(tm: TrainedModel) -> dict:
    """Which library's model the weights load into, and with what (for the side JSON)."""
    if tm.model in MODEL_NAMES:
        build = f'torchvision.models.{tm.model}(); fc = nn.Identity()'
        if tm.stem == 'cifar':
            build += (
                '; conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False);'
                ' maxpool = nn.Identity()'
            )
        return {'library': 'torchvision', 'build': build}
    kwargs = timm_build_kwargs(tm)
    arguments = ''.join(f', {k}={v!r}' for k, v in kwargs.items())
    return {
        'library': 'timm',
        'build': f'timm.create_model({tm.model!r}, pretrained=False, num_classes=0{arguments})',
        'timm_kwargs': kwargs,
    }


def encoder_weights(tm: TrainedModel) -> dict:
    """The encoder's tensors in its library's names, on the CPU, contiguous."""
    state = {k: v.detach().cpu().contiguous() for k, v in tm.encoder.state_dict().items()}
    return torchvision_state(state) if tm.model in MODEL_NAMES else state


def weights_bytes(tm: TrainedModel) -> bytes:
    buffer = io.BytesIO()
    torch.save(encoder_weights(tm), buffer)
    return buffer.getvalue()


# --------------------------------------------------------------------------- files


def write(path: str, content: bytes, meta: dict) -> str:
    """``content`` to ``path`` and the metadata to ``path + '.json'``, each atomically;
    returns the JSON's path."""
    side = path + '.json'
    atomic_write(path, lambda f: f.write(content))
    text = json.dumps(meta, indent=2) + '\n'
    atomic_write(side, lambda f: f.write(text.encode()))
    return side


def parity(content: bytes, fmt: str, tm: TrainedModel) -> float:
    """The largest difference, relative to the largest output (at least 1), between the
    exported ``content`` and PyTorch on random images, at batch sizes 1 and 3 (the batch
    dimension is dynamic). Run before the file is written."""
    module = deployable(tm)
    if fmt == 'torchscript':
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)
            loaded = torch.jit.load(io.BytesIO(content), map_location='cpu')

        def run(images):
            return loaded(images)
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(content, providers=['CPUExecutionProvider'])

        def run(images):
            return torch.from_numpy(session.run(None, {INPUT_NAME: images.numpy()})[0])

    worst = 0.0
    with torch.no_grad():
        for batch in (1, 3):
            images = example_images(tm, batch, seed=batch)
            want = module(images)
            scale = max(1.0, want.abs().max().item())
            worst = max(worst, (run(images) - want).abs().max().item() / scale)
    return worst
