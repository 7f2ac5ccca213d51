"""The install files agree, the notebooks are output-free, the README starts with the two commands."""

import re
from pathlib import Path

import pytest
import yaml

from ncis_core.notebook import notebook_has_outputs, strip_outputs

ROOT = Path(__file__).resolve().parent.parent


def _pins(lines):
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert m, f"not an exact pin: {line!r}"
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_requirements_are_exact_pins_with_torch_2_13():
    pins = _pins((ROOT / "requirements.txt").read_text().splitlines())
    assert pins["torch"] == "2.13.0"
    assert "torchvision" not in pins
    for name in ["diffusers", "transformers", "accelerate", "numpy", "scipy", "scikit-learn",
                 "scikit-image", "umap-learn", "matplotlib", "jupyterlab", "ipywidgets",
                 "papermill", "pillow", "safetensors", "tqdm", "pyyaml", "pytest"]:
        assert name in pins, f"{name} is not pinned"


def test_environment_yml_has_the_same_pins():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _pins(pip_section) == _pins((ROOT / "requirements.txt").read_text().splitlines())


def test_demo_data_package_is_installed_without_deps():
    assert _pins((ROOT / "requirements-nodeps.txt").read_text().splitlines()) == {"animal-mnist": "0.4"}
    assert "--no-deps -r requirements-nodeps.txt" in (ROOT / "Makefile").read_text()


def test_readme_starts_with_make_demo_then_make_test():
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"^make (\w+)", text, flags=re.M)
    assert commands[:2] == ["demo", "test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("notebook", sorted(p.relative_to(ROOT).as_posix()
                                            for p in (ROOT / "notebooks").rglob("*.ipynb")
                                            if ".ipynb_checkpoints" not in p.parts))
def test_committed_notebooks_carry_no_outputs_and_have_a_parameters_cell(notebook):
    import nbformat

    path = ROOT / notebook
    assert not notebook_has_outputs(path), f"{notebook} has outputs: run `make strip`"
    nb = nbformat.read(str(path), as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{notebook} needs exactly one cell tagged 'parameters'"
    assert {"preset", "run_dir", "overrides"} <= set(re.findall(r"^(\w+)\s*=", tagged[0].source, re.M))


def test_strip_outputs_removes_outputs(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("1 + 1")
    cell.outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=1)]
    cell.execution_count = 1
    nb.cells.append(cell)
    nbformat.write(nb, str(tmp_path / "a.ipynb"))
    assert notebook_has_outputs(tmp_path / "a.ipynb")
    assert strip_outputs(tmp_path / "a.ipynb")
    assert not notebook_has_outputs(tmp_path / "a.ipynb")
    assert not strip_outputs(tmp_path / "a.ipynb")


def test_installed_set_is_pip_check_clean_but_for_animal_mnist_declared_deps():
    """`pip check` on the installed set: only animal-mnist's declared TensorFlow/pandas may be absent
    (installed with --no-deps on purpose; the kit reads its data files directly)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    problems = [line for line in proc.stdout.splitlines()
                if line.strip() and not line.lower().startswith("animal-mnist")
                and "no broken requirements" not in line.lower()]
    assert not problems, "\n".join(problems)
