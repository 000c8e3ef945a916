"""More views per image (supcon/data/views.py): --n_views V and multi-crop (--small_views K
--small_size S) -- the loss against a per-anchor formula, the step's views from both pipelines,
the heads and the positives over every view, the TensorBoard grid, the options, two gloo ranks
against one process, and kill + resume."""

import argparse
import signal
import time
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import folder_args, write_image_folder
from inprocess import assert_one_line_error, call, save_folder
from PIL import Image

import main_supcon
from losses import SupConLoss
from networks.resnet_big import SupConResNet
from supcon.data.augment import CROP_SCALE, SMALL_CROP_SCALE, MultiCropTransform, supcon_transform
from supcon.data.views import FIXED, ViewLayout
from supcon.errors import UserError
from supcon.objectives.positives import TAGS
from supcon.objectives.step import TrainingStep
from supcon.system import checkpoint, runtime
from supcon.training import tb_logger
from util import AverageMeter, TwoCropTransform

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
TEMP, BASE_TEMP = 0.1, 0.07  # SupConLoss(temperature=0.1) keeps the reference's base 0.07
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])


# --------------------------------------------------------------------------- the loss


def per_anchor_loss(z, labels=None, temperature=TEMP, base_temperature=BASE_TEMP):
    """SupCon's loss written out anchor by anchor, in float64: every view of every image is an
    anchor; its positives are the other views of its image and (with labels) every view of the
    other images of its class; its denominator every row but itself."""
    bsz, n_views = z.shape[:2]
    rows = [(v, i) for v in range(n_views) for i in range(bsz)]
    losses = []
    for v, i in rows:
        others = [(w, j) for w, j in rows if (w, j) != (v, i)]
        logits = torch.stack([z[i, v] @ z[j, w] / temperature for w, j in others])
        log_prob = logits - torch.logsumexp(logits, dim=0)
        same = [
            k
            for k, (_, j) in enumerate(others)
            if (j == i if labels is None else bool(labels[j] == labels[i]))
        ]
        losses.append(-(temperature / base_temperature) * log_prob[same].mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize('n_views', [3, 4, 6])
@pytest.mark.parametrize('supervised', [True, False])
def test_the_loss_on_v_views_is_the_per_anchor_formula(n_views, supervised):
    generator = torch.Generator().manual_seed(n_views)
    raw = torch.randn(8, n_views, 5, dtype=torch.float64, generator=generator)
    features = F.normalize(raw, dim=2).requires_grad_()
    plain = features.detach().clone().requires_grad_()
    labels = LABELS if supervised else None
    loss = SupConLoss(temperature=TEMP)(features, labels)
    expected = per_anchor_loss(plain, labels)
    loss.backward()
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-10
    assert torch.allclose(features.grad, plain.grad, atol=1e-12, rtol=0)
    assert features.grad.abs().max() > 0


# --------------------------------------------------------------------------- the step


class TinyEncoder(torch.nn.Module):
    """Takes any image side (global pooling), optional BatchNorm."""

    def __init__(self, bn=True):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6) if bn else torch.nn.Identity()

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))).mean((2, 3))


def tiny_model(bn=True, seed=0):
    torch.manual_seed(seed)
    return SupConResNet(encoder=(TinyEncoder(bn), 6), feat_dim=4).double()


def tiny_step(model, method='SupCon', heads=None, **views):
    opt = argparse.Namespace(method=method, **views)
    rt = runtime.Runtime(device=torch.device('cpu'))
    train_set = argparse.Namespace(classes=['a', 'b', 'c'], targets=[0, 1, 2])
    meters = {name: AverageMeter() for name in TAGS}
    return TrainingStep(
        opt, rt, model, SupConLoss(temperature=TEMP), train_set, meters, heads=heads
    )


def loader_views(full, small, bsz=8, side=6, small_side=3, seed=1):
    """What the loader hands over: one tensor [bsz, 3, h, w] per view, full-size ones first."""
    generator = torch.Generator().manual_seed(seed)
    sides = [side] * full + [small_side] * small
    return [torch.randn(bsz, 3, s, s, dtype=torch.float64, generator=generator) for s in sides]


def quiet_loop():
    return types.SimpleNamespace(epoch=1, step=0, steps=1, log_views=lambda *a, **k: None)


def test_the_step_groups_the_loaders_views_by_size_view_major():
    model = tiny_model()
    step = tiny_step(model, n_views=3, small_views=2, small_size=3)
    views = loader_views(3, 2)
    logged = []
    loop = quiet_loop()
    loop.log_views = lambda images, views: logged.append((images, views))
    batch = step.views(views, LABELS, loop)
    assert [tuple(x.shape) for x in batch.images] == [(24, 3, 6, 6), (16, 3, 3, 3)]
    assert batch.n_views == 5 and batch.size == 8
    for v in range(5):
        group, w = (0, v) if v < 3 else (1, v - 3)
        for i in range(8):  # row w * bsz + i of its size is view v of image i
            assert torch.equal(batch.images[group][w * 8 + i], views[v][i])
    assert logged[0][1] == [3, 2] and logged[0][0] is batch.images
    assert ViewLayout().counts == [2] and ViewLayout(2, 0).total == 2


@pytest.mark.parametrize('method', ['SupCon', 'SimCLR'])
def test_a_multi_crop_step_is_the_formula_over_every_view_of_both_sizes(method):
    """Loss and gradient of the step against the model run once per size and the per-anchor
    formula on the concatenated features (full-size views first), in float64."""
    model = tiny_model()
    step = tiny_step(model, method=method, n_views=3, small_views=2, small_size=3)
    views = loader_views(3, 2)
    batch = step.views(views, LABELS, quiet_loop())
    out = step.forward(model, batch)
    assert out.features.shape == (8, 5, 4) and out.encoded.shape == (40, 6)
    loss = step.loss(out, batch)
    model.zero_grad(set_to_none=True)
    step.backward(loss, out)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    full = model(torch.cat(views[:3])).split(8)  # one forward per size, as the step does
    small = model(torch.cat(views[3:])).split(8)
    z = torch.stack(list(full) + list(small), dim=1)
    expected = per_anchor_loss(z, LABELS if method == 'SupCon' else None)
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-10
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-10, rtol=0), name
    assert grads['encoder.conv.weight'].abs().max() > 0


def test_positives_per_anchor_count_every_view():
    model = tiny_model()
    step = tiny_step(model, n_views=2, small_views=3, small_size=3)
    batch = step.views(loader_views(2, 3), LABELS, quiet_loop())
    step.loss(step.forward(model, batch), batch)
    step.positives.record(step.positives.step_counts(), batch.size)
    anchors = [(v, i) for v in range(5) for i in range(8)]
    # positives besides its own image's views: every view of the other images of its class
    counts = [sum(1 for _, j in anchors if j != i and LABELS[j] == LABELS[i]) for _, i in anchors]
    meters = step.positives.meters
    assert meters[TAGS[0]].avg == pytest.approx(sum(counts) / len(counts))
    assert meters[TAGS[0]].count == 40
    assert meters[TAGS[1]].avg == pytest.approx(sum(c == 0 for c in counts) / len(counts))


def test_the_joint_classifier_and_the_probe_read_every_view():
    from supcon.objectives.probe import ClassifierHeads

    opt = argparse.Namespace(online_probe=True, probe_lr=0.1, epochs=1, ce_weight=0.5)
    rt = runtime.Runtime(device=torch.device('cpu'))
    heads = ClassifierHeads(opt, rt, dim=6, num_classes=3)  # float32, as in a run
    torch.nn.init.normal_(heads.joint.weight, generator=torch.Generator().manual_seed(0))
    model = tiny_model()
    step = tiny_step(model, heads=heads, n_views=2, small_views=2, small_size=3)
    views = loader_views(2, 2)
    batch = step.views(views, LABELS, quiet_loop())
    out = step.forward(model, batch)
    with_heads = step.loss(out, batch)
    plain = SupConLoss(temperature=TEMP)(out.features, LABELS)
    with torch.no_grad():
        full, small = model.encoder(torch.cat(views[:2])), model.encoder(torch.cat(views[2:]))
        encoded = torch.cat([full, small]).float()
    every_view = LABELS.repeat(4)  # view-major: view v of image i is row v * 8 + i
    ce = F.cross_entropy(heads.joint(encoded), every_view)
    assert abs((with_heads - plain).item() - 0.5 * ce.item()) < 1e-5
    assert abs(ce.item() - F.cross_entropy(heads.joint(encoded[:16]), LABELS.repeat(2))) > 1e-3
    probe_ce = F.cross_entropy(heads.probe.classifier(encoded), every_view)
    assert abs(heads._probe_loss.item() - probe_ce.item()) < 1e-5


# --------------------------------------------------------------------------- the two pipelines


def test_the_loader_transform_makes_v_full_and_k_small_views():
    image = Image.fromarray(torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8).numpy())
    transform = supcon_transform(8, MEAN, STD, n_views=3, small_views=2, small_size=4)
    assert isinstance(transform, MultiCropTransform)
    views = transform(image)
    assert [tuple(v.shape) for v in views] == [(3, 8, 8)] * 3 + [(3, 4, 4)] * 2
    assert not torch.equal(views[0], views[1])  # independent draws
    full_crop = transform.transform.transforms[0]
    small_crop = transform.small_transform.transforms[0]
    assert full_crop.scale == CROP_SCALE and tuple(full_crop.size) == (8, 8)
    assert small_crop.scale == SMALL_CROP_SCALE and tuple(small_crop.size) == (4, 4)
    assert SMALL_CROP_SCALE == (0.05, 0.2)  # SwAV's / DINO's rule under the reference's (0.2, 1)
    # the reference's object when the views are the default two
    assert isinstance(supcon_transform(8, MEAN, STD), TwoCropTransform)
    assert isinstance(supcon_transform(8, MEAN, STD, n_views=4), MultiCropTransform)


def crop_areas(augment, side):
    """The area fraction of each crop box kornia drew in its latest call, per view."""
    areas = []
    for params in augment.last_params:
        src = params['crop']['src']  # [B, 4, 2] corners (x, y), inclusive
        w = src[:, 1, 0] - src[:, 0, 0] + 1
        h = src[:, 2, 1] - src[:, 1, 1] + 1
        areas.append(w * h / side**2)
    return torch.cat(areas)


def test_the_device_pipeline_makes_v_full_and_k_small_views():
    pytest.importorskip('kornia')
    from supcon.data.gpu_augment import DeviceAugment, MultiCropAugment

    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    augment = MultiCropAugment(8, MEAN, STD, views=3, small_views=2, small_size=4)
    full, small = augment(images, seed=5)
    assert full.shape == (18, 3, 8, 8) and small.shape == (12, 3, 4, 4)
    again = augment(images, seed=5)
    assert torch.equal(again[0], full) and torch.equal(again[1], small)
    assert not torch.equal(augment(images, seed=6)[1], small)
    # the full-size views are a plain DeviceAugment's of the same seed
    assert torch.equal(DeviceAugment(8, MEAN, STD, 'supcon', views=3)(images, seed=5), full)
    # and the default two are --gpu_aug's as before, bit for bit
    (two,) = MultiCropAugment(8, MEAN, STD)(images, seed=5)
    assert torch.equal(two, DeviceAugment(8, MEAN, STD, 'supcon')(images, seed=5))
    # small crops from 5 to 20% of the image, full ones from 20% up (sides rounded to pixels)
    augment(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), seed=7)
    small_areas, full_areas = crop_areas(augment.small, 32), crop_areas(augment.full, 32)
    assert small_areas.min() >= 0.04 and small_areas.max() <= 0.23, small_areas
    assert full_areas.min() >= 0.17 and full_areas.max() > 0.5, full_areas


def test_the_step_takes_the_device_views_seeded_by_the_step():
    pytest.importorskip('kornia')
    from supcon.data.gpu_augment import MultiCropAugment
    from supcon.data.sampling import mix_seed

    augment = MultiCropAugment(6, MEAN, STD, views=2, small_views=3, small_size=3)
    opt = argparse.Namespace(method='SupCon', n_views=2, small_views=3, small_size=3)
    rt = runtime.Runtime(device=torch.device('cpu'))
    train_set = argparse.Namespace(classes=['a', 'b', 'c'], targets=[0, 1, 2])
    meters = {name: AverageMeter() for name in TAGS}
    step = TrainingStep(opt, rt, tiny_model(), SupConLoss(), train_set, meters, augment=augment)
    images = torch.randint(0, 256, (8, 3, 10, 10), dtype=torch.uint8)
    loop = types.SimpleNamespace(epoch=2, step=3, steps=4, log_views=lambda *a, **k: None)
    batch = step.views(images, LABELS, loop)
    assert [tuple(x.shape) for x in batch.images] == [(16, 3, 6, 6), (24, 3, 3, 3)]
    assert batch.n_views == 5
    expected = augment(images, seed=mix_seed('gpu_aug', rt.seed, 2, 3, rt.rank))
    assert all(torch.equal(a, b) for a, b in zip(batch.images, expected))


# --------------------------------------------------------------------------- TensorBoard


def test_the_views_grid_shows_the_small_views_beside_the_full_ones():
    generator = torch.Generator().manual_seed(0)
    bsz, side, small_side = 3, 6, 2
    full = torch.randn(2 * bsz, 3, side, side, generator=generator)
    small = torch.randn(3 * bsz, 3, small_side, small_side, generator=generator)
    grid = tb_logger.views_grid([full, small], MEAN, STD, views=[2, 3], count=2, min_side=1)
    # two images of five views each, one row of ten tiles of the full side, 2-pixel padding
    assert grid.shape == (3, side + 4, 10 * side + 22)
    m, s = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    tiles = [(full, v, side) for v in range(2)] + [(small, v, small_side) for v in range(3)]
    for image in range(2):
        for k, (views, v, h) in enumerate(tiles):
            x = 2 + (image * 5 + k) * (side + 2)
            tile = grid[:, 2 : 2 + side, x : x + side]
            offset = (side - h) // 2
            inner = tile[:, offset : offset + h, offset : offset + h]
            expected = (views[v * bsz + image] * s + m).clamp(0, 1)
            assert torch.allclose(inner, expected, atol=1e-6), (image, k)
            if h < side:  # the small view sits in a white tile of the full size
                assert tile[:, :offset].eq(1).all() and tile[:, offset + h :].eq(1).all()


# --------------------------------------------------------------------------- options


def parse(*args):
    return main_supcon.parse_option(['--dataset', 'digits', '--size', '12', *map(str, args)])


def test_run_name_parts_only_when_used_and_fixed_on_resume():
    assert parse().model_name.endswith('_trial_0')
    assert parse('--n_views', 4).model_name.endswith('_trial_0_views4')
    opt = parse('--small_views', 4)
    assert opt.small_size == 6 and opt.model_name.endswith('_trial_0_small4x6')
    opt = parse('--n_views', 3, '--small_views', 2, '--small_size', 4, '--aug', 'randaugment')
    assert opt.model_name.endswith('_aug_randaugment_views3_small2x4')
    assert set(FIXED) == {'n_views', 'small_views', 'small_size'}
    from supcon import capabilities

    assert set(FIXED) <= set(capabilities.FIXED)


@pytest.mark.parametrize(
    'args,fragment',
    [
        (['--n_views', 1], 'an anchor needs another view of its image'),
        (['--n_views', 0, '--small_views', 2], '--n_views must be 1 or more'),
        (['--small_views', -1], '--small_views 0 or more'),
        (['--small_size', 4], '--small_size only acts with --small_views'),
        (['--small_views', 2, '--small_size', 13], '--small_size must be from 1 to --size 12'),
        (['--small_views', 2, '--model', 'vit_tiny_patch16_224'], 'timm models'),
        (['--moco', '--n_views', 4], '--moco takes the two full-size views'),
        (['--moco', '--small_views', 2], '--moco takes the two full-size views'),
    ],
)
def test_refusals(args, fragment):
    with pytest.raises(UserError, match=fragment):
        parse(*args)


def test_small_views_that_meet_the_cpu_bf16_bug_are_refused():
    cpu_amp = ['--size', 8, '--small_views', 2, '--device', 'cpu', '--amp']
    with pytest.raises(UserError, match='use --small_size 5 or more, or --cpu_bf16_wgrad matmul'):
        parse(*cpu_amp, '--small_size', 4)
    with pytest.raises(UserError, match='use --small_size 17 or more'):
        parse(*cpu_amp, '--size', 32, '--small_size', 16, '--stem', 'imagenet')
    assert parse(*cpu_amp, '--small_size', 5).small_size == 5
    assert parse(*cpu_amp, '--small_size', 4, '--cpu_bf16_wgrad', 'matmul').small_size == 4
    assert parse(*cpu_amp[:-1], '--small_size', 4).small_size == 4  # float32


@pytest.mark.parametrize('stem', ['cifar', 'imagenet'])
def test_the_refused_sides_are_those_where_a_stride_2_conv_meets_a_1x1_map(stem):
    from networks.resnet_big import SupConResNet
    from supcon.data.views import _stride2_inputs

    model = SupConResNet(name='resnet18', stem=stem)
    seen = []
    for module in model.encoder.modules():
        if (
            isinstance(module, torch.nn.Conv2d)
            and module.stride == (2, 2)
            and module.kernel_size == (3, 3)
        ):
            module.register_forward_hook(lambda m, x, y: seen.append(x[0].shape[-1]))
    model.eval()
    for side in range(2, 21):
        seen.clear()
        with torch.no_grad():
            model(torch.zeros(1, 3, side, side))
        assert seen == _stride2_inputs(side, stem), side


def test_a_refusal_is_one_line(tmp_path):
    result = call('main_supcon', ['--dataset', 'digits', '--n_views', '1'], tmp_path)
    assert_one_line_error(result, '--n_views 1', 'another view')
    assert not (tmp_path / 'save').exists()


def test_one_full_view_and_small_views_is_allowed():
    opt = parse('--n_views', 1, '--small_views', 2)
    assert ViewLayout.of(opt) == ViewLayout(1, 2, 6)


# --------------------------------------------------------------------------- 2 ranks = 1 process


def sgd_steps(model, views, labels, steps=2):
    """Two SGD steps of the training step on these loader views (the local batch)."""
    step = tiny_step(model, n_views=3, small_views=2, small_size=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(steps):
        batch = step.views(views, labels, quiet_loop())
        out = step.forward(model, batch)
        loss = step.loss(out, batch)
        optimizer.zero_grad(set_to_none=True)
        step.backward(loss, out)
        step.optimizer_step(optimizer, batch)
    bare = model.module if hasattr(model, 'module') else model
    return {k: v.detach().clone() for k, v in bare.state_dict().items()}


def _rank(rank, world):
    model = torch.nn.parallel.DistributedDataParallel(tiny_model(bn=False))
    half = slice(rank * 4, rank * 4 + 4)
    views = [v[half] for v in loader_views(3, 2)]
    return sgd_steps(model, views, LABELS[half])


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:This process .* is multi-threaded:DeprecationWarning')
def test_two_gloo_ranks_equal_one_process_with_multi_crop(gloo_ranks):
    two = gloo_ranks(_rank)[0]
    start = tiny_model(bn=False).state_dict()
    one = sgd_steps(tiny_model(bn=False), loader_views(3, 2), LABELS)
    diff = torch.cat([(two[k] - one[k]).reshape(-1) for k in one]).norm()
    update = torch.cat([(one[k] - start[k]).reshape(-1) for k in one]).norm()
    assert update > 1e-3 and diff / update < 1e-9, (float(diff), float(update))


# --------------------------------------------------------------------------- kill and resume


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    write_image_folder(root / 'train', {'a': 8, 'b': 8}, size=8, seed=0)
    write_image_folder(root / 'test', {'a': 2, 'b': 2}, size=8, seed=1)
    return root


VARIANTS = {
    'loader': {'n_views': 3, 'small_views': 2, 'small_size': 4},
    # 5 pixels: at 4 the CPU's bfloat16 gradient is wrong (docs/views.md)
    'gpu_aug_amp': {'n_views': 3, 'small_views': 2, 'small_size': 5, 'gpu_aug': True, 'amp': True},
}


@pytest.mark.slow
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_kill_after_epoch_1_and_resume_auto_equals_uninterrupted_run(images, tmp_path, variant):
    if variant.startswith('gpu_aug'):
        pytest.importorskip('kornia')
    from test_resume import max_abs_diff, spawn

    args = folder_args(images, model='resnet18', epochs=3, **VARIANTS[variant])
    (tmp_path / 'A').mkdir()
    (tmp_path / 'B').mkdir()
    result = call('main_supcon', args, tmp_path / 'A')
    assert result.code == 0, result.err
    reference = save_folder('main_supcon', args, tmp_path / 'A') / 'last.pth'

    folder = save_folder('main_supcon', args, tmp_path / 'B')
    proc = spawn('main_supcon', args, tmp_path / 'B')
    output = []
    for line in proc.stdout:
        output.append(line)
        if 'epoch 1, total time' in line:
            break
    deadline = time.time() + 120
    while not (folder / 'checkpoint.pth').exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, ''.join(output)
    result = call('main_supcon', args + ['--resume', 'auto'], tmp_path / 'B')
    assert result.code == 0 and 'continuing at epoch ' in result.out, result.err
    assert max_abs_diff(reference, folder / 'last.pth') <= 1e-6
    saved = checkpoint.load_checkpoint(str(folder / 'last.pth'))['opt']
    layout = VARIANTS[variant]
    assert (saved['n_views'], saved['small_views'], saved['small_size']) == (
        3,
        2,
        layout['small_size'],
    )

    # another layout may not resume this run
    other = folder_args(images, model='resnet18', epochs=3, **dict(VARIANTS[variant], n_views=2))
    result = call('main_supcon', other + ['--resume', str(folder / 'last.pth')], tmp_path / 'B')
    assert_one_line_error(result, '--n_views 2 differs from the run\'s 3')
    for path in tmp_path.rglob('*.pth'):
        path.unlink()
