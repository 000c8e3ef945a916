"""The house rules a newcomer relies on: no import circles, no oversized module, a lean util.py."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 450


def project_modules():
    """{module name: path} of every Python file of the project outside tests/ and benchmarks/."""
    modules = {}
    for path in REPO.rglob('*.py'):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ('tests', 'benchmarks', 'save', 'datasets') or rel.parts[0].startswith(
            '.'
        ):
            continue
        name = '.'.join(rel.with_suffix('').parts)
        modules[name.removesuffix('.__init__')] = path
    return modules


def imports_of(path, modules):
    """The project modules ``path`` imports (at any depth of the file: lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f'{node.module}.{alias.name}' for alias in node.names]
        for name in names:
            if name in modules:
                found.add(name)
    return found


def find_cycle(graph):
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 'done'
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_sees_a_cycle_and_its_absence():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) is None


def test_no_import_circle():
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    assert 'util' in graph and 'supcon.data.datasets' in graph  # the scan found the project
    assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_util_imports_only_the_leaf_modules_of_the_package():
    """util.py is the reference's API; it may lean only on modules that import nothing of ours."""
    modules = project_modules()
    leaves = imports_of(modules['util'], modules)
    assert leaves == {'supcon.errors', 'supcon.system.atomic'}
    for leaf in leaves:
        assert imports_of(modules[leaf], modules) == set()


def test_the_root_holds_only_entry_scripts_losses_and_util():
    """What a reference user looks for; everything else lives in the supcon/ package."""
    root = sorted(p.name for p in REPO.glob('*.py'))
    others = [name for name in root if not name.startswith(('main_', 'run_with_'))]
    assert others == ['losses.py', 'util.py'], root
    assert {'main_supcon.py', 'main_linear.py', 'main_ce.py', 'main_tsne.py'} <= set(root)
    assert (REPO / 'supcon' / '__init__.py').is_file() and (REPO / 'networks').is_dir()


@pytest.mark.parametrize('name', sorted(project_modules()))
def test_module_size(name):
    lines = len(project_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f'{name} has {lines} lines; split it by job'


def test_reference_api_is_importable_with_its_signatures():
    """What users' own scripts import from the reference, with the reference's signatures."""
    import inspect

    from networks.resnet_big import (
        LinearBatchNorm,
        LinearClassifier,
        ResNet,
        SupCEResNet,
        SupConResNet,
    )  # noqa: F401
    from util import (
        accuracy,
        adjust_learning_rate,
        save_model,
        set_optimizer,
        warmup_learning_rate,
    )  # noqa: F401

    def params(fn):
        return list(inspect.signature(fn).parameters)

    assert params(adjust_learning_rate) == ['args', 'optimizer', 'epoch']
    assert params(warmup_learning_rate) == [
        'args',
        'epoch',
        'batch_id',
        'total_batches',
        'optimizer',
    ]
    assert params(accuracy) == ['output', 'target', 'topk']
    assert params(set_optimizer) == ['opt', 'model']
    assert params(save_model) == ['model', 'optimizer', 'opt', 'epoch', 'save_file']
    assert params(ResNet.forward) == ['self', 'x', 'layer']
    assert params(SupConResNet.__init__)[:4] == ['self', 'name', 'head', 'feat_dim']
    assert params(SupCEResNet.__init__)[:3] == ['self', 'name', 'num_classes']
    assert params(LinearClassifier.__init__)[:3] == ['self', 'name', 'num_classes']
    assert params(LinearBatchNorm.__init__) == ['self', 'dim', 'affine']


#: The sub-packages of supcon/, each allowed to import only those before it (and itself).
LAYERS = ('errors', 'system', 'data', 'evaluation', 'inference', 'objectives', 'training')
#: What may sit directly in supcon/ besides the sub-packages.
MAX_TOP_MODULES = 8


def layer_of(module):
    """The index of a ``supcon.*`` module's sub-package in LAYERS; top-level modules other than
    ``errors`` come after every sub-package; None outside supcon."""
    parts = module.split('.')
    if parts[0] != 'supcon' or len(parts) < 2:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else len(LAYERS)


def upward_imports(modules):
    """['a imports b'] for every supcon module that imports one of a later sub-package."""
    found = []
    for name, path in sorted(modules.items()):
        mine = layer_of(name)
        if mine is None:
            continue
        for imported in sorted(imports_of(path, modules)):
            theirs = layer_of(imported)
            if theirs is not None and theirs > mine:
                found.append(f'{name} imports {imported}')
    return found


def test_upward_imports_sees_a_data_module_importing_training(tmp_path):
    (tmp_path / 'supcon' / 'data').mkdir(parents=True)
    (tmp_path / 'supcon' / 'training').mkdir()
    (tmp_path / 'supcon' / 'data' / 'a.py').write_text('from supcon.training import b\n')
    (tmp_path / 'supcon' / 'training' / 'b.py').write_text('from supcon.data import a\n')
    modules = {'supcon.data.a': tmp_path / 'supcon/data/a.py'}
    modules['supcon.training.b'] = tmp_path / 'supcon/training/b.py'
    assert upward_imports(modules) == ['supcon.data.a imports supcon.training.b']


def test_no_sub_package_imports_a_later_one():
    """system < data < evaluation < objectives < training < the top-level modules."""
    assert upward_imports(project_modules()) == []


def package_modules():
    """Every module of supcon/ as (sub-package or '', module name), __init__ files left out."""
    found = []
    for path in sorted((REPO / 'supcon').rglob('*.py')):
        rel = path.relative_to(REPO / 'supcon')
        if path.stem != '__init__':
            found.append(('/'.join(rel.parts[:-1]), path.stem))
    return found


def test_the_package_is_split_by_job_with_few_modules_at_its_top():
    top = [name for package, name in package_modules() if not package]
    assert len(top) <= MAX_TOP_MODULES, top
    packages = {package for package, _ in package_modules() if package}
    assert packages == set(LAYERS) - {'errors'}


def test_the_package_map_and_the_readme_name_every_module():
    """supcon/__init__.py names every module (``name``) and README.md's file table every file."""
    package_map = (REPO / 'supcon' / '__init__.py').read_text()
    readme = (REPO / 'README.md').read_text()
    for package, name in package_modules():
        assert f'``{name}``' in package_map, f'supcon/__init__.py does not name {name}'
        path = f'supcon/{package}/' if package else 'supcon/'
        row = [line for line in readme.splitlines() if line.startswith(f'| `{path}')]
        assert row and f'`{name}' in row[0], f'README.md\'s file table does not list {path}{name}'
