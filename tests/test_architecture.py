"""The package's imports run one way (docs/architecture.md).

Every import statement of the package, top-level or inside a function, is read with ``ast``
(nothing is imported) and resolved to the project module it names. The test fails on an
edge that goes up the layering below, on a module that belongs to no layer, and on an
import cycle between project modules.

    tools -> kd -> networks.managers -> networks.engines -> networks.models
          -> networks.layers | networks.encoders | networks.decoders
          -> dataloaders -> configs -> utils

A module may import its own layer and any layer below it. ``configs`` (plain settings) and
``dataloaders`` (datasets and transforms, which read only ``utils``) sit under ``networks``,
so every part of the networks, ``kd`` and ``tools`` may read them, while they never import
a network.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('configs', 'dataloaders', 'kd', 'networks', 'tools', 'utils')

# Module prefix -> layer (higher may import lower or equal, never higher).
LAYERS = {
    'utils': 0,
    'configs': 1,
    'dataloaders': 2,
    'networks': 3,  # the empty package itself
    'networks.layers': 3,
    'networks.encoders': 3,
    'networks.decoders': 3,
    'networks.models': 4,
    'networks.engines': 5,
    'networks.managers': 6,
    'kd': 7,
    'tools': 8,
}


def project_modules(root=ROOT, packages=PACKAGES):
    """``{dotted module name: file path}`` of every ``.py`` file of the packages."""
    mods = {}
    for pkg in packages:
        for folder, dirs, files in os.walk(os.path.join(root, pkg)):
            dirs[:] = [d for d in dirs if d != '__pycache__']
            for name in files:
                if name.endswith('.py'):
                    path = os.path.join(folder, name)
                    rel = os.path.relpath(path, root)[:-3].replace(os.sep, '.')
                    mods[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = path
    return mods


def imports_of(module, source, is_package, known):
    """``[(target module, line, top_level)]`` for the project modules ``source`` imports.

    ``from a.b import c`` names ``a.b.c`` when that is a module, else ``a.b``; relative
    imports are resolved against ``module``. Imports of other distributions are ignored.
    """
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = module.split('.')
                if not is_package:
                    parts = parts[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = '.'.join(parts + ([base] if base else []))
            targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in known else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name in a.b
                target = target.rpartition('.')[0]
            if target:
                found.append((target, node.lineno, id(node) in top))
    return sorted(set(found))


def import_graph(root=ROOT, packages=PACKAGES):
    mods = project_modules(root, packages)
    graph = {}
    for name, path in mods.items():
        with open(path, encoding='utf-8') as f:
            source = f.read()
        graph[name] = imports_of(name, source, path.endswith('__init__.py'), mods)
    return graph


def layer_of(module):
    parts = module.split('.')
    for n in range(len(parts), 0, -1):
        prefix = '.'.join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    return None


def cycles(graph):
    """Strongly connected components of more than one module (or a module importing itself)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):  # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in {t for t, _, _ in graph.get(v, ())}:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or any(t == v for t, _, _ in graph.get(v, ())):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope='module')
def graph():
    return import_graph()


def test_reader_sees_function_local_and_relative_imports():
    known = {'kd', 'kd.losses', 'kd.distiller', 'networks.managers.trainer', 'utils.io'}
    source = ('from .losses import linear_cka\n'
              'import utils.io as io\n'
              'import numpy\n'
              'def f():\n'
              '    from networks.managers.trainer import Trainer\n'
              '    from . import losses\n')
    got = imports_of('kd.distiller', source, False, known)
    assert got == [('kd.losses', 1, True), ('kd.losses', 6, False),
                   ('networks.managers.trainer', 5, False), ('utils.io', 2, True)]
    assert cycles({'a': [('b', 1, True)], 'b': [('a', 3, False)], 'c': [('a', 1, True)]}) \
        == [['a', 'b']]


def test_the_walk_covers_the_package(graph):
    # A few known edges, so that a broken walk (no files, no resolution) cannot pass.
    assert len(graph) > 80
    edges = {(a, t) for a, targets in graph.items() for t, _, _ in targets}
    assert ('kd.distiller', 'networks.managers.train_step') in edges
    assert ('networks.models.deaot', 'networks.layers.transformer') in edges


def test_every_module_has_a_layer(graph):
    assert [m for m in graph if layer_of(m) is None] == []


def test_no_import_goes_up_a_layer(graph):
    upward = [f'{src} (layer {layer_of(src)}) -> {dst} (layer {layer_of(dst)}) at line {line}'
              + ('' if top else ', inside a function')
              for src, targets in sorted(graph.items()) for dst, line, top in targets
              if layer_of(dst) > layer_of(src)]
    assert upward == []


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_cli_flag_tables_name_real_flags_and_fields():
    """Every row of the tools' flag -> field tables names a flag the parser defines and a
    field the config declares (a typo would silently drop the flag)."""
    from configs.default import build_config
    from tools import eval as eval_tool
    from tools import train as train_tool

    for parser, table, stage in ((eval_tool.build_parser(), eval_tool.EVAL_FLAGS, 'pre_dav'),
                                 (train_tool.build_parser(), train_tool.TRAIN_FLAGS, 'pre')):
        dests = {a.dest for a in parser._actions}
        cfg = build_config(stage, 'x', 'deaott')
        for flag, field, _ in table:
            assert flag in dests, flag
            assert hasattr(cfg, field), field
