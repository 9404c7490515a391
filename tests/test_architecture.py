"""The package's shape: no import circles, no test code in the wheel, one home per concept, and the
learner registry as the only list of methods (CLI, Space, config validation and README all follow it)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import hf_copa
from hf_copa import AdaptedHead, CopaConfig, Learner, register_learner
from hf_copa.cli import build_parser
from hf_copa.interactive import methods as space_methods
from hf_copa.learners import registry

from .conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "hf_copa"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports() -> dict[str, set[str]]:
    """Module -> the hf_copa modules it imports anywhere in its source (also inside functions)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def test_the_import_graph_has_no_circle():
    graph = package_imports()
    assert len(graph) > 30
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_leaf_modules_import_nothing_of_the_package_that_could_import_them_back():
    graph = package_imports()
    assert graph["hf_copa.validation"] == set()
    assert graph["hf_copa.learners.registry"] <= {"hf_copa.validation"}
    assert graph["hf_copa.frozen"] == set()


@pytest.mark.parametrize("module", ["hf_copa.heads", "hf_copa.learners.copa", "hf_copa.training.loop"])
def test_a_module_imports_on_its_own_in_a_fresh_interpreter(module):
    completed = subprocess.run(
        [sys.executable, "-c", f"import {module}"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr


def test_the_wheel_holds_the_package_and_no_test_code(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO_ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            tmp_path,
        ],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    (wheel,) = tmp_path.glob("hf_copa-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hf_copa/heads.py" in names and "hf_copa/learners/copa.py" in names
    assert any(n.startswith("hf_copa/assets/models/copa-mdl-small/") for n in names)
    assert not [n for n in names if n.startswith(("tests/", "hf_copa/testing/")) or "local_hub" in n]


def test_each_concept_has_one_home():
    assert AdaptedHead.__module__ == "hf_copa.heads"
    assert hf_copa.get_learner("copa").__class__.__module__ == "hf_copa.learners.copa"
    assert not hasattr(hf_copa, "testing")


# --- the registry is the only list of methods ---------------------------------------------------------


@pytest.fixture
def toy_learner():
    @register_learner("toy-scaled-ncc")
    class ToyLearner(Learner):
        description = "NCC with a tunable scale (a test learner)"
        default_hyperparameters = {"scale": 3.0, "sharpness": 2}
        presets = {"sharp": {"sharpness": 5}}

        def fit_batch(self, features, labels, num_classes):
            heads = hf_copa.get_learner("ncc").fit_batch(features, labels, num_classes)
            scale = self.hyperparameters["scale"] * self.hyperparameters["sharpness"]
            return [AdaptedHead(h.prototypes, scale=scale, method=self.name) for h in heads]

    yield ToyLearner
    registry._LEARNERS.pop("toy-scaled-ncc")


def method_choices(command: str) -> list[str]:
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return next(action.choices for action in sub._actions if action.dest == "method")


def test_a_learner_added_at_run_time_is_everywhere_methods_are_listed(toy_learner):
    assert "toy-scaled-ncc" in hf_copa.available_methods()
    for command in ("demo", "classify", "evaluate"):
        assert "toy-scaled-ncc" in method_choices(command)
    assert space_methods()["toy-scaled-ncc"] == toy_learner.description
    assert hf_copa.ADAPTATION_DEFAULTS["toy-scaled-ncc"] == {"scale": 3.0, "sharpness": 2}
    assert dict(hf_copa.ADAPTATION_PRESETS["toy-scaled-ncc"]["sharp"]) == {"sharpness": 5}
    # its own hyperparameter becomes a CLI flag, and a config may override it
    args = build_parser().parse_args(["demo", "--method", "toy-scaled-ncc", "--sharpness", "4"])
    assert args.sharpness == 4
    config = CopaConfig(adaptation={"toy-scaled-ncc": {"sharpness": 7}})
    assert config.adaptation_hyperparameters("toy-scaled-ncc")["sharpness"] == 7
    with pytest.raises(ValueError, match="sharpnes"):
        CopaConfig(adaptation={"toy-scaled-ncc": {"sharpnes": 7}})
    features, labels = torch.randn(6, 4), torch.tensor([0, 1, 2] * 2)
    head = hf_copa.adapt(features, labels, method="toy-scaled-ncc", preset="sharp")
    assert head.scale == 15.0


def test_the_tables_are_read_only_views_of_the_learners():
    with pytest.raises(TypeError):
        hf_copa.ADAPTATION_DEFAULTS["copa"]["lr"] = 1.0
    assert hf_copa.ADAPTATION_DEFAULTS["copa"] == hf_copa.get_learner("copa").default_hyperparameters


def test_every_hyperparameter_a_learner_declares_is_a_cli_flag():
    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    flags = {action.dest for action in demo._actions}
    declared = {name for m in hf_copa.available_methods() for name in hf_copa.ADAPTATION_DEFAULTS[m]}
    assert declared == {
        "steps", "lr", "weight_decay", "tau", "scale", "lr_beta", "adapter_lr_scale",
        "optimizer", "classifier", "weight_norm", "seed", "beta", "heads", "blocks",
        "lr_times_classes", "urt_head",
    }  # fmt: skip
    assert declared <= flags
    args = build_parser().parse_args(
        ["demo", "--method", "finetune", "--optimizer", "gd", "--weight-norm", "false", "--steps", "3"]
    )
    assert (args.optimizer, args.weight_norm, args.steps) == ("gd", False, 3)


def readme_method_table() -> dict[str, tuple[dict[str, float], set[str]]]:
    """The README's method table: method -> (the defaults it lists, the presets it names)."""
    rows = {}
    for line in (REPO_ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`[\w+-]+`", cells[0]):
            defaults = {k: _cell_value(v) for k, v in re.findall(r"(\w+)=([-\w.]+)", cells[2])}
            presets = set(re.findall(r"`([\w-]+)`", cells[3]))
            rows[cells[0].strip("`")] = (defaults, presets)
    return rows


def _cell_value(text: str):
    """A default as the table writes it: a number, true / false, or a word."""
    if text in ("true", "false"):
        return text == "true"
    try:
        return float(text)
    except ValueError:
        return text


def _as_listed(value):
    return value if isinstance(value, bool | str) else float(value)


def test_the_readme_method_table_matches_the_registry():
    table = readme_method_table()
    assert set(table) == set(hf_copa.available_methods())
    for method, (defaults, presets) in table.items():
        # A default of None is a required setting (urt's trained layer), listed without a value.
        expected = {k: _as_listed(v) for k, v in hf_copa.ADAPTATION_DEFAULTS[method].items() if v is not None}
        assert defaults == expected, method
        assert presets == set(hf_copa.ADAPTATION_PRESETS[method]), method
