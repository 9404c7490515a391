"""The README's commands are what CI runs, and the `hf-copa` command works end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hf_copa.cli import main

from .conftest import REPO_ROOT


def readme_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)[:2]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    setup_and_run, setup_and_test = readme_commands()
    assert "hf-copa demo" in setup_and_run and "pip install" in setup_and_run
    assert "pytest" in setup_and_test
    ci_lines = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_and_test in ci_lines


def test_demo_classifies_the_bundled_images(capsys):
    assert main(["demo", "--method", "ncc", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 9
    for item in results:
        assert {p["label"] for p in item["predictions"]} == {"apple", "bicycle", "fish"}
        assert sum(p["score"] for p in item["predictions"]) == pytest.approx(1.0, abs=1e-5)


def test_classify_reports_bad_folders_without_a_traceback(tmp_path, capsys):
    (tmp_path / "only_class").mkdir()
    assert main(["classify", str(tmp_path), str(tmp_path)]) == 2
    assert "hf-copa: error:" in capsys.readouterr().err
    assert main(["classify", str(tmp_path / "missing"), "x.png"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("method", "options"), [("tsa", ["--lr-beta", "0.5"]), ("copa+tsa", ["--adapter-lr-scale", "0.5"])]
)
def test_demo_runs_the_tsa_methods_with_their_own_options(capsys, method, options):
    """TSA's adapters need a ResNet: the small bundled one (the default, EfficientNet-Lite0, refuses them)."""
    demo = ["demo", "--model", "hf_copa:copa-mdl-small", "--method", method, "--steps", "3", *options]
    assert main([*demo, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 9
    assert all(
        sum(p["score"] for p in item["predictions"]) == pytest.approx(1.0, abs=1e-5) for item in results
    )


@pytest.mark.parametrize("method", ["tsa", "copa+tsa"])
def test_the_default_refuses_the_tsa_methods_in_one_line_naming_what_runs(capsys, method):
    assert main(["demo", "--method", method]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1 and "residual-adapter" in captured.err
    assert "hf_copa:copa-mdl-small" in captured.err and "copa, copa-transformer" in captured.err


def test_an_option_a_method_does_not_take_is_a_clean_error(capsys):
    assert main(["demo", "--method", "tsa", "--weight-decay", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "hf-copa: error:" in err and "weight_decay" in err and "Traceback" not in err


def test_only_user_errors_become_a_clean_exit_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    import hf_copa.cli as cli
    from hf_copa.validation import CopaTypeError

    def user_mistake(*args, **kwargs):
        raise CopaTypeError("labels must be hashable")

    monkeypatch.setattr(cli, "_classify", user_mistake)
    assert main(["demo"]) == 2
    assert "hf-copa: error: labels must be hashable" in capsys.readouterr().err

    def bug(*args, **kwargs):
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr(cli, "_classify", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["demo"])


def test_the_readmes_several_backbone_commands_run_as_written(datasets_dir, tmp_path):
    """Stand-in sdl checkpoints -> convert -> bundle -> sur -> train-urt -> sur + urt, in bash from the
    repository root; only runs/ (to a temporary folder), the shared datasets' place and the episode
    counts are changed."""
    import os
    import subprocess
    import sys

    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- several-backbones:start -->\n```bash\n(.+?)\n```", text, re.S).group(1)
    script = block.replace("runs/", f"{tmp_path}/runs/").replace("../shared/datasets/", f"{datasets_dir}/")
    script = re.sub(r"--episodes \d+", "--episodes 3", script)
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"PATH": f"{bin_dir}:{env.get('PATH', '')}", "HF_COPA_CACHE": str(tmp_path / "cache")}
    env |= {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", "-e", "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (
        "wrote" in done.stdout
        and "8 backbones (ilsvrc_2012, omniglot, aircraft, cu_birds, dtd" in done.stdout
    )
    tables = [line for line in done.stdout.splitlines() if line.startswith("| mnist |")]
    assert [t.count("±") for t in tables] == [1, 2]  # sur alone, then sur and urt
    layer = json.loads((tmp_path / "runs" / "urt" / "urt_config.json").read_text())
    assert layer["num_backbones"] == 8 and layer["training"]["episodes"] == 3
