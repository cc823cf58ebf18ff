"""The shape of the package: no import cycles, a one-way model layer, no task or head name compared
outside its own package, no module over 500 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from vembed.errors import VembedError
from vembed.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1] / "vembed"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module → the vembed modules it imports (anywhere in it: functions too)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
                # `from package import submodule` imports the submodule; any other name, the module
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_no_import_cycles():
    graph = imports()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_model_layer_imports_only_downwards():
    forbidden = ("vembed.settings", "vembed.cli", "vembed.training", "vembed.evaluation", "vembed.tasks")
    bad = {
        (name, target)
        for name, targets in imports().items()
        if name.startswith("vembed.models")
        for target in targets
        if target.startswith(forbidden)
    }
    assert not bad, sorted(bad)


def test_no_task_name_or_head_kind_compared_outside_the_tasks():
    pattern = re.compile(r'segmentation"|"classifier"|task ==|"segmenter"|"retrieval"')
    places = [ROOT / "training" / "loop.py", ROOT / "training" / "preflight.py", ROOT / "export.py"]
    places += sorted((ROOT / "cli").glob("*.py"))
    found = [
        f"{p.name}:{i}"
        for p in places
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("@")
    ]
    assert not found, found


def test_no_module_over_500_lines():
    long = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if len(p.read_text().splitlines()) > 500]
    assert not long, long


@pytest.mark.parametrize(
    "task,key",
    [
        ("retrieval", "rerank_from=runs/x/final"),
        ("segmentation", "hard_negatives=2"),
        ("retrieval", "towers=image"),
    ],
)
def test_a_key_of_another_task_is_refused_not_ignored(tmp_path, task, key):
    from vembed.settings import load_settings
    from vembed.training.preflight import check_settings

    records = tmp_path / "train.jsonl"
    records.write_text('{"image": "a.png", "label": 0}\n')
    settings = load_settings(None, [f"data.train={records}", f"train.task={task}", f"train.{key}"])
    with pytest.raises(
        VembedError,
        match=rf"train\.{key.split('=')[0]} applies to train\.task=\w+ only; this run is train\.task={task}",
    ):
        check_settings(settings)


def test_every_task_declares_its_own_keys():
    from vembed.settings import TrainSettings

    owners: dict[str, str] = {}
    for name, cls in TASKS.items():
        for key in cls.keys:
            assert key in TrainSettings.model_fields, (name, key)
            assert owners.setdefault(key, name) == name, f"train.{key} claimed by {owners[key]} and {name}"
