"""Any timm model as the encoder.

``--model`` keeps ``resnet18/34/50/101`` for our CIFAR-stem ResNets
(``networks.resnet_big``); every other name is looked up in timm's registry,
e.g. ``vit_small_patch16_224``, ``vit_tiny_patch16_224``, ``convnext_tiny``,
``convnext_atto`` or ``resnet50d``. timm's own ``resnet50`` is reachable with a
tag, e.g. ``resnet50.a1_in1k`` (the tag only names the variant: nothing is
downloaded).

The encoder is built without a classifier (``num_classes=0``), so its forward
returns pooled features ``[B, feature_dim]``; the SupCon projection head and the
linear classifier are sized from ``feature_dim``. Weights are random unless a
local checkpoint is given with ``pretrained_file``; this module never downloads.

    encoder, dim = create_encoder('vit_tiny_patch16_224', size=32, patch_size=4)
"""

import difflib
import os
import re

import torch

from networks.resnet_big import MODEL_NAMES
from supcon.errors import UserError

# Names that would make timm fetch from the network or from somewhere other
# than its registry (Hugging Face hub, local-dir:, ...).
_SCHEMES = ('hf-hub:', 'hf_hub:', 'local-dir:', 'timm/')
_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')  # torch colours parts of its load errors


def _timm():
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is in requirements.txt
        raise UserError('timm models need the timm package: pip install "timm>=1.0,<2"') from None
    return timm


def is_timm_model(name):
    """True when ``name`` is a timm model name rather than one of our ResNets.

    Our four names (resnet18/34/50/101) always mean ``networks.resnet_big``.
    Unknown names are False here; ``create_encoder`` explains them.
    """
    if name in MODEL_NAMES or not isinstance(name, str) or name.startswith(_SCHEMES):
        return False
    return bool(_timm().is_model(name))


def unknown_model_error(name):
    if not isinstance(name, str) or name.startswith(_SCHEMES):
        return scheme_error(name)
    timm = _timm()
    base = name.split('.')[0].lower()
    known = timm.list_models()
    close = difflib.get_close_matches(base, known, n=5, cutoff=0.6)
    if not close and base:
        close = timm.list_models(f'*{base[:4]}*')[:5]
    hint = f"did you mean {', '.join(close)}? " if close else ''
    family = base.split('_')[0][:8] or 'vit'
    return UserError(
        f"--model {name} is not known: not one of {', '.join(MODEL_NAMES)} nor a timm model; "
        f"{hint}see timm.list_models('{family}*') for the names timm knows"
    )


def scheme_error(name):
    tail = str(name).split(':', 1)[-1].split('/')[-1]
    example = f' (e.g. --model {tail})' if tail and _timm().is_model(tail) else ''
    return UserError(
        f'--model {name}: only timm registry names are accepted{example}, nothing is'
        f' downloaded; give weights with --pretrained <local file> instead'
    )


def _first_line(error, limit=160):
    text = _ANSI.sub('', str(error)).strip()
    line = text.splitlines()[0].strip() if text else type(error).__name__
    return line if len(line) <= limit else line[:limit].rsplit(' ', 1)[0] + ' ...'


def _create(name, device='cpu', **kwargs):
    """timm.create_model on ``device`` ('meta': shapes only, no memory, no random numbers);
    returns (model, None), or (None, the keyword the architecture refused)."""
    timm = _timm()
    try:
        with torch.device(device):
            return timm.create_model(name, pretrained=False, num_classes=0, **kwargs), None
    except TypeError as error:
        refused = [k for k in kwargs if f'unexpected keyword argument {k!r}' in str(error)]
        if not refused:
            raise
        return None, refused[0]


_CANNOT_TELL = 'meta tensors cannot run this model'


def _cannot_run_on_meta(error):
    return isinstance(error, NotImplementedError) or 'meta' in str(error).lower()


def _meta_problem(name, size, kwargs, meta=None):
    """None when ``name`` built with ``kwargs`` takes a ``size`` x ``size`` image, else why not.

    A dry run on the meta device: shapes only, so it is cheap for any model, needs no
    memory and draws no random numbers (the run's random stream is untouched).
    ``_CANNOT_TELL`` where the model has an operation meta tensors cannot run. ``meta``:
    the model already built on the meta device, for one that takes any size.
    """
    try:
        if meta is None:
            meta, _ = _create(name, 'meta', **kwargs)
        with torch.no_grad():
            meta.eval()(torch.zeros(1, 3, size, size, device='meta'))
        return None
    except Exception as error:
        return _CANNOT_TELL if _cannot_run_on_meta(error) else _first_line(error)


def _cpu_problem(model, size):
    """The dry run on ``model`` itself, in eval mode without gradient: nothing in it changes."""
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
        return None
    except Exception as error:
        return _first_line(error)
    finally:
        model.train(training)


def _smallest_size(name, size, kwargs, scan=32, largest=2048):
    """The smallest side above ``size`` that the model takes, or None.

    A model built for its ``img_size`` may take only some sides (CrossViT takes 24 but
    not 32), so every side up to ``size + scan`` is tried first; beyond that (and for
    convolutional nets, which take every side above their smallest) doubling and
    bisection find the first side that works.
    """
    fixed = None if 'img_size' in kwargs else _create(name, 'meta', **kwargs)[0]
    scan = scan if fixed is None else 0

    def works(side):
        at_side = dict(kwargs, img_size=side) if fixed is None else kwargs
        problem = _meta_problem(name, side, at_side, meta=fixed)
        if problem == _CANNOT_TELL:
            raise LookupError
        return problem is None

    try:
        for side in range(size + 1, size + scan + 1):
            if works(side):
                return side
        low, high = size + scan, 2 * (size + scan)
        while not works(high):
            low, high = high, high * 2
            if high > largest:
                return None
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if works(middle) else (middle, high)
    except LookupError:
        return None
    return high


def _largest_patch(name, size, kwargs):
    """The largest patch size below the model's that makes it take ``size`` images, or None."""
    try:
        meta, _ = _create(name, 'meta', **kwargs)
    except Exception:
        return None
    patch = getattr(getattr(meta, 'patch_embed', None), 'patch_size', None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    if not isinstance(patch, int):
        return None
    for candidate in range(min(patch - 1, size), 0, -1):
        try:
            if _meta_problem(name, size, dict(kwargs, patch_size=candidate)) is None:
                return candidate
        except Exception:  # this architecture's patch size is not an int to set
            return None
    return None


def check_input_size(name, size, kwargs, model):
    """Refuse, in one line, a ``size`` that ``model`` (timm ``name`` built with ``kwargs``)
    cannot take, naming the smallest size (or the patch size) that works.

    Without this a too-small image fails inside the first training step (a kernel larger
    than what reaches it, a ViT patch larger than the image), after the data is loaded.
    """
    problem = _meta_problem(name, size, kwargs)
    if problem == _CANNOT_TELL:
        problem = _cpu_problem(model, size)
    if problem is not None:
        size_error(name, size, kwargs, problem)


def size_error(name, size, kwargs, problem):
    """Raise the one-line refusal of ``size``, naming the smallest size or patch that works."""
    fixes = []
    try:
        smallest = _smallest_size(name, size, kwargs)
    except Exception:  # the model cannot even be built on the meta device: no search
        smallest = None
    if smallest is not None:
        fixes.append(f'the smallest size it takes is {smallest}: pass --size {smallest}')
    patch = _largest_patch(name, size, kwargs)
    if patch is not None:
        fixes.append(f'--patch_size {patch} or less')
    fix = ', or '.join(fixes) if fixes else 'pass a larger --size'
    raise UserError(f'--model {name} cannot take --size {size} images ({problem}); {fix}')


def create_encoder(name, size, patch_size=None, pretrained_file=None):
    """Build timm model ``name`` as a feature extractor; returns ``(module, feature_dim)``.

    - ``timm.create_model(name, pretrained=False, num_classes=0)``: no classifier,
      forward gives pooled features ``[B, feature_dim]`` with
      ``feature_dim = model.num_features``.
    - ``img_size=size`` is passed when the architecture takes it (ViTs, Swin, ...);
      convolutional nets that take any input size are built without it.
    - ``patch_size`` (ViT-style models only) replaces the name's patch size, e.g.
      ``vit_tiny_patch16_224`` with ``size=32, patch_size=4`` sees an 8x8 grid.
    - a ``size`` the model cannot take (a kernel or patch larger than what reaches it)
      is refused before anything is trained (``check_input_size``).
    - ``pretrained_file``: a local timm state dict (``.pth``/``.pt``/``.bin`` read
      with ``torch.load(weights_only=True)``, or ``.safetensors``). Classifier
      keys are dropped, the architecture's own checkpoint filter is applied where
      timm has one (it resamples ViT position and patch embeddings to the new
      size), and anything that still does not fit is a one-line ``UserError``.
    """
    if name in MODEL_NAMES:
        raise UserError(f'{name!r} is one of our CIFAR ResNets; build it with networks.resnet_big')
    if not isinstance(name, str) or name.startswith(_SCHEMES):
        raise scheme_error(name)
    if not _timm().is_model(name):
        raise unknown_model_error(name)
    if patch_size is not None and not 1 <= patch_size <= size:
        raise UserError(
            f'--patch_size must be from 1 to the image size (--size {size}), got {patch_size}'
        )

    kwargs = {'img_size': size}
    if patch_size is not None:
        kwargs['patch_size'] = patch_size
    model, refused, problem = None, None, None
    try:
        model, refused = _create(name, **kwargs)
        if refused == 'img_size':
            kwargs.pop('img_size')
            model, refused = _create(name, **kwargs)
    except Exception as error:  # the architecture cannot be built so: say why, in one line
        problem = _first_line(error)
    if problem is not None and patch_size is not None:
        raise UserError(
            f'--model {name} cannot be built with --patch_size {patch_size}'
            f' ({problem}); drop --patch_size or pick a ViT-style model'
        )
    if problem is not None:
        size_error(name, size, kwargs, problem)
    if refused == 'patch_size':
        raise UserError(
            f'timm model {name!r} has no patch size to set; drop --patch_size'
            ' or pick a ViT-style model'
        )
    if model is None:  # pragma: no cover - _create raises for anything else
        raise UserError(f'timm model {name!r} refused {refused!r}')
    check_input_size(name, size, kwargs, model)
    if pretrained_file is not None:
        load_pretrained(model, name, pretrained_file, size=size, patch_size=patch_size)
    return model, int(model.num_features)


# --------------------------------------------------------------------------- checkpoints


def _unreadable(error, path):
    """One clean line for a file torch.load refused: no colour codes, never torch's advice
    to load it unsafely (``weights_only=False`` could run code hidden in the file)."""
    text = _ANSI.sub('', str(error))
    found = re.search(r'GLOBAL ([\w.]+)', text)
    if found:
        return UserError(
            f'--pretrained {path} holds pickled Python objects ({found.group(1)}), not only'
            f' tensors, so it was refused (weights only: loading it could run code);'
            f' save the state dict alone, torch.save(model.state_dict(), path), or as'
            f' .safetensors'
        )
    if 'Weights only load failed' in text:
        reason = 'not a file of tensors as torch.save writes them'
    else:
        reason = _first_line(error)
        if 'weights_only' in reason:
            reason = type(error).__name__
    return UserError(
        f'--pretrained {path} cannot be read as a state dict (weights only): {reason};'
        f' pass a timm .pth/.safetensors file of tensors'
    )


def _read_state_dict(path):
    if os.path.isdir(path):
        raise UserError(
            f'--pretrained {path} is a directory; pass the checkpoint file inside it'
            f' (.pth, .pt, .bin or .safetensors)'
        )
    if not os.path.isfile(path):
        raise UserError(f'--pretrained {path}: file not found; pass a local timm checkpoint')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file

            state = load_file(path, device='cpu')
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # corrupt file, pickled objects, ...
        raise _unreadable(error, path) from None
    # timm's training checkpoints wrap the weights; so do DataParallel ones.
    if isinstance(state, dict):
        for key in ('state_dict', 'model'):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(
            f'--pretrained {path} holds no state dict of tensors; pass a timm checkpoint'
        )
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.') :]: v for k, v in state.items()}
    return state


def _classifier_names(model):
    cfg = getattr(model, 'pretrained_cfg', None) or getattr(model, 'default_cfg', None) or {}
    names = cfg.get('classifier') or 'head'
    return (names,) if isinstance(names, str) else tuple(names)


def _architecture_filter(model):
    """The ``checkpoint_filter_fn(state_dict, model)`` of the model's timm module, if any."""
    import sys

    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, 'checkpoint_filter_fn', None)
    return fn if callable(fn) else None


def load_pretrained(model, name, path, size=None, patch_size=None):
    """Load the local checkpoint ``path`` into the classifier-less timm ``model``."""
    state = _read_state_dict(path)
    own = model.state_dict()
    classifiers = _classifier_names(model)
    state = {
        k: v
        for k, v in state.items()
        if k in own or not any(k == c or k.startswith(c + '.') for c in classifiers)
    }

    fn = _architecture_filter(model)
    if fn is not None:
        try:
            state = fn(state, model)
        except Exception:  # not this architecture's layout: judged by the comparison below
            pass

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f'{len(missing)} missing (e.g. {missing[0]!r})')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected (e.g. {unexpected[0]!r})')
        if wrong:
            k = wrong[0]
            parts.append(
                f'{len(wrong)} of another shape (e.g. {k!r} '
                f'{list(state[k].shape)} vs {list(own[k].shape)})'
            )
        setting = f'size {size}' + (f', patch {patch_size}' if patch_size else '')
        raise UserError(
            f'--pretrained {path} does not fit timm model {name!r} ({setting}):'
            f" {', '.join(parts)} keys; give a checkpoint of the same architecture"
        )
    model.load_state_dict(state, strict=True)
    return model
