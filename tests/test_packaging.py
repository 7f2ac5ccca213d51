"""The install files agree, the package ships what it needs, the notebooks are output-free, the
README starts with the two commands.

Runs from the repository and against an installed copy (README, "Testing an installed copy"): the
tests that build a wheel from the sources skip where there are no sources next to ``tests/``."""

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

import ncis_core
from ncis_core import assets
from ncis_core.notebook import notebook_has_outputs, strip_outputs
from ncis_core.runner import NOTEBOOK_DIR

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(ncis_core.__file__).resolve().parent
# what the package ships besides its code, by repository path (ncis_core/assets/ links to each)
SHIPPED = ("notebooks", "data/demo/generator", "data/sd14_configs")
NOT_RUNTIME = ("pytest", "selenium", "jupyterlab")
needs_sources = pytest.mark.skipif(not (ROOT / "ncis_core" / "__init__.py").is_file(),
                                   reason="no package sources next to tests/ (an installed copy's check)")


def _pins(lines):
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert m, f"not an exact pin: {line!r}"
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _sections():
    """requirements.txt's pins by section (``# --- runtime ...``, ``# --- test ...``, ``# --- lab ...``)."""
    sections, name = {}, None
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"#\s*---\s*(\w+)", line)
        if m:
            name = m.group(1)
            sections[name] = []
        elif name is not None:
            sections[name].append(line)
        else:
            assert not line.split("#")[0].strip(), f"a pin before the first section: {line!r}"
    return {name: _pins(lines) for name, lines in sections.items()}


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_requirements_are_exact_pins_with_torch_2_13():
    pins = _pins((ROOT / "requirements.txt").read_text().splitlines())
    assert pins["torch"] == "2.13.0"
    assert "torchvision" not in pins
    for name in ["diffusers", "transformers", "accelerate", "numpy", "scipy", "scikit-learn",
                 "scikit-image", "umap-learn", "matplotlib", "jupyterlab", "ipywidgets", "ipykernel",
                 "papermill", "nbformat", "pillow", "safetensors", "tqdm", "pyyaml", "pytest", "selenium"]:
        assert name in pins, f"{name} is not pinned"


def test_requirements_sections_are_the_runtime_set_and_the_extras():
    sections = _sections()
    assert list(sections) == ["runtime", "test", "lab"]
    assert sections["runtime"]["torch"] == "2.13.0"   # torch in the same file as everything else
    for name in NOT_RUNTIME:
        assert name not in sections["runtime"], f"{name} is not a runtime dependency"
    # the runner executes notebooks headless; the explorer's widgets are part of the package
    assert {"papermill", "ipykernel", "nbformat", "ipywidgets"} <= set(sections["runtime"])
    assert {"pytest", "selenium"} <= set(sections["test"]) and "jupyterlab" in sections["lab"]


def test_pyproject_declares_the_same_pins_as_requirements_sections():
    project, sections = _pyproject(), _sections()
    assert "dependencies" not in project.get("dynamic", [])
    extras = project["optional-dependencies"]
    assert set(extras) == {"test", "lab"}
    assert _pins(project["dependencies"]) == sections["runtime"]
    # the browser test serves the explorer with JupyterLab: [test] includes the lab section
    assert _pins(extras["test"]) == {**sections["test"], **sections["lab"]}
    assert _pins(extras["lab"]) == sections["lab"]
    for name in NOT_RUNTIME:
        assert name not in _pins(project["dependencies"])
    # animal-mnist stays out of the metadata: it declares TensorFlow (installed with --no-deps)
    assert "animal-mnist" not in str(project)


def test_makefile_installs_what_each_target_needs():
    text = (ROOT / "Makefile").read_text()
    assert "-c requirements.txt" in text
    targets = dict(re.findall(r"^([\w-]+):[ \t]*([^\n=]*)$", text, flags=re.M))
    assert "setup" in targets["demo"] and "setup-test" not in targets["demo"]
    assert "setup-test" in targets["test"] and "setup-lab" in targets["lab"]
    assert '-e ".[test]"' in text and '-e ".[lab]"' in text
    assert "--allow-root" in text and "id -u" in text
    # the stamps reinstall when a requirements file or the package metadata changes
    assert re.search(r"^\$\(STAMP\):.*requirements\.txt.*requirements-nodeps\.txt.*pyproject\.toml",
                     text, flags=re.M)


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


@pytest.mark.parametrize("notebook", sorted(p.relative_to(NOTEBOOK_DIR).as_posix()
                                            for p in NOTEBOOK_DIR.rglob("*.ipynb")
                                            if ".ipynb_checkpoints" not in p.parts))
def test_committed_notebooks_carry_no_outputs_and_have_a_parameters_cell(notebook):
    """The notebooks as the package finds them: the repository's notebooks/, or an installed copy's."""
    import nbformat

    path = NOTEBOOK_DIR / notebook
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


@pytest.mark.heavy
def test_installed_set_is_pip_check_clean_but_for_animal_mnist_declared_deps():
    """`pip check` on the installed set: only animal-mnist's declared TensorFlow/pandas may be absent
    (installed with --no-deps on purpose; the kit reads its data files directly)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    problems = [line for line in proc.stdout.splitlines()
                if line.strip() and not line.lower().startswith("animal-mnist")
                and "no broken requirements" not in line.lower()]
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- shipped files
def test_the_package_finds_its_shipped_files_inside_itself(tmp_path, monkeypatch):
    """Presets, notebooks, the demo generator and SD 1.4's configs resolve through
    importlib.resources to paths inside the package, from any working directory: no path assumes
    the repository checkout."""
    from ncis_core import config, diffusion, plan

    monkeypatch.chdir(tmp_path)
    inside = [config.PRESET_DIR / "demo.yaml", NOTEBOOK_DIR / "00_data.ipynb",
              plan.SD14_CONFIGS / "unet" / "config.json", assets.path("data/demo/generator/model_index.json")]
    demo = config.load_config("demo")
    for key in (demo.diffusion.pipeline, "data/sd14_configs"):
        found = diffusion.local_source(key)
        assert found is not None, f"{key} does not resolve from {tmp_path}"
        inside.append(found)
    for path in inside:
        assert path.exists(), path
        assert path.absolute().is_relative_to(PACKAGE), f"{path} is outside the package {PACKAGE}"
    assert diffusion.pipeline_problem(demo) is None
    # the working directory still wins (a retrained generator saved under data/demo/generator)
    (tmp_path / "data" / "demo" / "generator").mkdir(parents=True)
    assert diffusion.local_source("data/demo/generator") == Path("data/demo/generator")
    with pytest.raises(ValueError, match="relative path"):
        assets.path("../pyproject.toml")


def test_git_commit_is_none_for_an_installed_copy(tmp_path, monkeypatch):
    from ncis_core.runs import git_commit

    assert git_commit(tmp_path) is None                                   # not a git checkout
    monkeypatch.setattr(assets, "checkout_root", lambda: None)          # an installed copy
    assert git_commit() is None


def test_an_installed_copy_runs_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "checkout_root", lambda: None)
    monkeypatch.chdir(tmp_path)
    assert assets.project_dir() == tmp_path


@needs_sources
def test_the_repository_links_the_shipped_folders_once():
    """ncis_core/assets/<path> is a link to the repository's <path>: each file is committed once."""
    for relative in SHIPPED:
        link = ROOT / "ncis_core" / "assets" / relative
        assert link.is_symlink(), f"{link} should link to {relative}"
        assert link.resolve() == (ROOT / relative).resolve()
    assert assets.checkout_root() == ROOT or assets.checkout_root() is None


def _copy_sources(target: Path) -> None:
    """What a wheel is built from (tracked files; links kept), without build folders or caches."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "pyproject.toml", "README.md",
                             "ncis_core", *SHIPPED], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"git ls-files failed: {listed.stderr.strip()}")
    for name in listed.stdout.splitlines():
        source, dest = ROOT / name, target / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            dest.symlink_to(source.readlink())
        else:
            shutil.copy2(source, dest)


@pytest.mark.heavy
@needs_sources
def test_the_wheel_carries_code_presets_notebooks_and_assets(tmp_path):
    """A wheel built from the sources (about 3 s) holds every module, the presets and every shipped
    file, as files; its metadata declares the runtime pins and the [test]/[lab] extras."""
    from importlib import metadata

    (need,) = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    minimum = int(re.fullmatch(r"setuptools>=(\d+)", need).group(1))
    try:
        have = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        have = "0"
    if int(have.split(".")[0]) < minimum:  # built without isolation: nothing is downloaded
        pytest.skip(f"building the wheel needs {need}; this environment has setuptools {have}")
    src, out = tmp_path / "src", tmp_path / "wheel"
    _copy_sources(src)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-cache-dir", "-q", str(src), "-w", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    expected = {p.relative_to(src).as_posix() for p in (src / "ncis_core").rglob("*.py")}
    expected |= {p.relative_to(src).as_posix() for p in (src / "ncis_core" / "presets").glob("*.yaml")}
    for relative in SHIPPED:
        pattern = "*.ipynb" if relative == "notebooks" else "*"
        expected |= {f"ncis_core/assets/{p.relative_to(src).as_posix()}"
                     for p in (src / relative).rglob(pattern) if p.is_file()}
    assert sorted(expected - names) == [], "missing from the wheel"
    tops = {n.split("/")[0] for n in names} - {"ncis_core"}
    assert len(tops) == 1 and re.fullmatch(r"ncis_kit-[^-]+\.dist-info", tops.pop()), "only ncis_core ships"
    assert wheel.stat().st_size < 30 * 2**20, f"wheel of {wheel.stat().st_size / 2**20:.1f} MiB"
    requires = re.findall(r"^Requires-Dist: (.+)$", metadata, flags=re.M)
    runtime = [r for r in requires if "extra ==" not in r]
    assert _pins(runtime) == _sections()["runtime"]
    for extra in ("test", "lab"):
        pins = _pins(r.split(";")[0] for r in requires if f'extra == "{extra}"' in r)
        assert pins == _pins(_pyproject()["optional-dependencies"][extra])
