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
    assert 'util' in graph and 'supcon.data' in graph  # the scan found the project
    assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_util_imports_only_the_leaf_modules_of_the_package():
    """util.py is the reference's API; it may lean only on modules that import nothing of ours."""
    modules = project_modules()
    leaves = imports_of(modules['util'], modules)
    assert leaves == {'supcon.errors', 'supcon.atomic'}
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
