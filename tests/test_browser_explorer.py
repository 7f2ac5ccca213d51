"""The class explorer of ``07_explore.ipynb`` in a real browser: JupyterLab serves a copy of the
notebook pointed at the shared smoke run, headless Debian Chromium (driven by Selenium through
Debian's chromedriver: nothing is downloaded) runs all its cells, and the test reads the widgets'
DOM: the gallery holds as many ``<img>`` as the slider says, each captioned with its nearest-ID
distance and invariant energy; the map keeps its aspect ratio; choosing another class in the
dropdown replaces the images; a click on an image selects that outlier (detail, frame, ringed map).

Needs ``chromium`` and ``chromium-driver`` (Debian packages; ``make browser`` installs them as
root). Without them the test is skipped, unless ``NCIS_REQUIRE_BROWSER=1`` (CI), where it fails.
Deselect it with ``-m "not browser"``. Waits are generous (a cold kernel imports torch and
compiles UMAP's numba code on a 2-core machine) and nothing is timed.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from diffusion_fixtures import ROOT, copy_run

from ncis_core.runner import NOTEBOOK_DIR

pytestmark = [pytest.mark.browser, pytest.mark.heavy]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
NOTEBOOK = NOTEBOOK_DIR / "07_explore.ipynb"
WAIT = 600          # seconds, for anything that waits on the kernel
GALLERY_SIZE = 3    # the notebook's gallery_size here: fewer than the 4 images per smoke class


@pytest.fixture(scope="session")
def chromium_available():
    """Skips (or, with NCIS_REQUIRE_BROWSER=1, fails) before any smoke run is built for nothing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the Python package selenium (requirements.txt)")
    if missing:
        reason = (f"no browser for the explorer test: {', '.join(missing)} missing; install with "
                  f"`make browser` (apt-get install chromium chromium-driver)")
        if os.environ.get("NCIS_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " [NCIS_REQUIRE_BROWSER=1]")
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc): the server's kernels run in sessions of their own."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _write_notebook(folder: Path, run_dir: Path) -> Path:
    """07_explore.ipynb with its parameters pointed at ``run_dir`` (the smoke run)."""
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = (f'preset = "smoke"\nrun_dir = {str(run_dir)!r}\noverrides = []\n'
                   f"gallery_size = {GALLERY_SIZE}\nneighbours = 2\ntwin_classes = 1\n")
    target = folder / NOTEBOOK.name
    nbformat.write(nb, str(target))
    return target


def _user_settings(config_dir: Path) -> None:
    """JupyterLab settings for a test browser: every cell in the DOM, no news fetched."""
    settings = config_dir / "lab" / "user-settings" / "@jupyterlab"
    for plugin, values in [("notebook-extension/tracker", {"windowingMode": "none"}),
                           ("apputils-extension/notification", {"fetchNews": "false"})]:
        file = settings / f"{plugin}.jupyterlab-settings"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(values))


@pytest.fixture
def lab(chromium_available, smoke_run_1_to_4, tmp_path, request):
    """A JupyterLab server on 127.0.0.1 serving a folder with the notebook; yields
    ``(notebook URL, run folder)``. Stopped (its process group and its kernels) also on failure."""
    run_dir = copy_run(smoke_run_1_to_4, tmp_path / "run")
    served = tmp_path / "lab"
    served.mkdir()
    _write_notebook(served, run_dir)
    jupyter = tmp_path / "jupyter"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(jupyter / "config"),
           "JUPYTER_DATA_DIR": str(jupyter / "data"), "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"),
           "IPYTHONDIR": str(jupyter / "ipython"), "JUPYTER_PLATFORM_DIRS": "1",
           "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    _user_settings(jupyter / "config")
    port, token = _free_port(), secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={served}",
               "--LabApp.expose_app_in_browser=True"]  # window.jupyterapp: run cells by command
    if os.geteuid() == 0:
        command.append("--allow-root")
    log_file = tmp_path / "jupyterlab.log"
    with open(log_file, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=served,
                                  start_new_session=True)

    def stop():
        kernels = _children(server.pid)
        try:
            os.killpg(server.pid, signal.SIGTERM)  # the server shuts its kernels down on SIGTERM
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        except ProcessLookupError:
            pass
        for pid in kernels:  # any kernel that outlived its server, with its own process group
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    request.addfinalizer(stop)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + WAIT
    while True:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with {server.returncode}:\n{log_file.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=10) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"JupyterLab did not answer /api/status in {WAIT} s:\n{log_file.read_text()[-3000:]}")
        time.sleep(0.5)
    yield f"{base}/lab/tree/{NOTEBOOK.name}?token={token}", run_dir


@pytest.fixture
def browser(chromium_available, tmp_path, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never fetch a driver or browser
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,1800", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", f"--user-data-dir={tmp_path / 'chromium'}"]:
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


# JavaScript run in the page, through JupyterLab's application object (window.jupyterapp).
_KERNEL_IDLE = """
const app = window.jupyterapp; const panel = app && app.shell.currentWidget;
if (!panel || !panel.sessionContext || !panel.context || !panel.context.isReady) return false;
const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
return !!kernel && kernel.status === 'idle';"""
_CELLS = """
const cells = window.jupyterapp.shell.currentWidget.content.widgets.filter(c => c.model.type === 'code');
const errors = [];
for (const c of cells) for (const o of c.model.outputs.toJSON())
  if (o.output_type === 'error') errors.push(o.ename + ': ' + o.evalue);
const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
return {errors: errors, done: cells.every(c => c.model.executionCount !== null) && kernel.status === 'idle'};"""


def _gallery(driver):
    """(img srcs, button titles) of the outlier gallery as the browser shows it."""
    from selenium.webdriver.common.by import By

    images = driver.find_elements(By.CSS_SELECTOR, ".ncis-gallery .ncis-outlier-image")
    buttons = driver.find_elements(By.CSS_SELECTOR, ".ncis-gallery .ncis-outlier-select")
    return [im.get_attribute("src") for im in images], [b.get_attribute("title") for b in buttons]


def _no_errors(driver):
    state = driver.execute_script(_CELLS)
    if state["errors"]:
        pytest.fail("the notebook raised in the browser: " + "; ".join(state["errors"]))
    return state


def test_explorer_runs_in_jupyterlab_and_follows_the_class_dropdown(lab, browser, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, run_dir = lab
    # a class change replaces the gallery's elements while a poll may still be reading the old ones
    wait = WebDriverWait(browser, WAIT, poll_frequency=1, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(url)
    wait.until(lambda d: d.execute_script(_KERNEL_IDLE))
    browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")

    # the gallery appears once the explorer cell has run
    def gallery_of(prefix):
        def ready(driver):
            _no_errors(driver)
            srcs, titles = _gallery(driver)
            return (srcs, titles) if titles and all(t.startswith(prefix) for t in titles) and \
                len(srcs) == len(titles) and all(srcs) else False
        return ready

    srcs, titles = wait.until(gallery_of("ncis/0/"))
    readout = browser.find_element(By.CSS_SELECTOR, ".ncis-count .widget-readout").text
    assert len(srcs) == int(readout) == GALLERY_SIZE
    captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, ".ncis-gallery .ncis-outlier-caption")]
    assert len(captions) == GALLERY_SIZE
    assert all("nearest-ID distance" in c and "(L2)" in c and "invariant energy" in c and "(mean z²)" in c
               for c in captions), captions
    # the map is shown at its own aspect ratio (it was stretched to the gallery's height)
    shape = browser.execute_script(
        "const m = document.querySelector('.ncis-map'); return [m.naturalWidth, m.naturalHeight, "
        "m.getBoundingClientRect().width, m.getBoundingClientRect().height];")
    assert shape[0] > 0 and shape[2] > 0
    assert shape[2] / shape[3] == pytest.approx(shape[0] / shape[1], rel=0.02), shape
    assert len(browser.find_elements(By.CSS_SELECTOR, ".ncis-id-gallery img.ncis-id-image")) == 8
    assert browser.find_elements(By.CSS_SELECTOR, ".ncis-detail img.ncis-detail-image")

    # another class: new images, all of that class
    dropdown = browser.find_element(By.CSS_SELECTOR, ".ncis-class-dropdown select")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", dropdown)
    Select(dropdown).select_by_visible_text("bird")
    new_srcs, new_titles = wait.until(gallery_of("ncis/1/"))
    assert len(new_srcs) == GALLERY_SIZE and not set(new_srcs) & set(srcs)

    # a click on an outlier's image shows it in the detail view, frames it and rings it on the map
    from selenium.webdriver.common.action_chains import ActionChains

    # first the class change's own selection (its first outlier, and its map: a UMAP fit in a cold
    # kernel) has to have arrived
    first = new_titles[0].split(" ")[0].removeprefix("ncis/")
    wait.until(lambda d: first in d.find_element(By.CSS_SELECTOR, ".ncis-detail").text)
    map_before = browser.find_element(By.CSS_SELECTOR, ".ncis-map").get_attribute("src")
    image = browser.find_elements(By.CSS_SELECTOR, ".ncis-gallery .ncis-outlier-image")[1]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", image)
    ActionChains(browser).move_to_element(image).click().perform()  # where the image is on screen
    chosen = new_titles[1].split(" ")[0].removeprefix("ncis/")
    wait.until(lambda d: chosen in d.find_element(By.CSS_SELECTOR, ".ncis-detail").text)
    selected = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".ncis-gallery .ncis-outlier.ncis-selected"))
    assert len(selected) == 1 and selected[0].find_element(
        By.CSS_SELECTOR, ".ncis-outlier-select").get_attribute("title") == new_titles[1]
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".ncis-map").get_attribute("src") != map_before)

    # the rest of the notebook ran too: its static twins are in the run folder
    wait.until(lambda d: _no_errors(d)["done"])
    assert (run_dir / "figures" / "07_all_classes_ncis.png").exists()
    assert list((run_dir / "figures").glob("07_detail_ncis_*.png"))

    explorer_box = browser.find_element(By.CSS_SELECTOR, ".ncis-explorer")
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", explorer_box)
    shot = tmp_path / "explorer.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
