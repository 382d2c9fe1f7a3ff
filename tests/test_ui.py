"""The MLflow UI in a real headless Chromium: one row per pipeline execution, and `lr`
compares against the evaluation accuracy across them.

Also `python tests/test_ui.py docs/mlflow-ui.png` (`make screenshot`): the README's screenshot,
taken from real runs on the full sample data.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest
from conftest import FAST_PARAMS, ROOT, dvc, git, make_repo, mlflow_runs
from servers import MlflowServer, mlflow_ui

BASE_LR = str(FAST_PARAMS["lr"])  # the built repo's lr

CHROMIUM = Path(os.environ.get("IMGPIPE_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("IMGPIPE_CHROMEDRIVER", "/usr/bin/chromedriver"))
# Nothing may reach out of the machine, and each browser starts from a clean profile.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-dev-shm-usage", "--window-size=1600,1000"]
WAIT = 120  # seconds for a page to show what we look for; the UI is slow on a busy machine


def browser(profile: Path):
    """Headless system Chromium through chromedriver; fails with the fix if either is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: run `make browser` (as root it runs "
                    "`apt-get install chromium chromium-driver`), or set IMGPIPE_CHROMIUM "
                    "and IMGPIPE_CHROMEDRIVER", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager never runs, so nothing is downloaded.
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


def pipeline_runs(repo: Path) -> tuple[str, list]:
    """The experiment id and the parent runs (one per execution, holding lr and eval_*)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("imgpipe")
    runs = client.search_runs([experiment.experiment_id], "tags.`imgpipe.stage` = 'pipeline'")
    return experiment.experiment_id, runs


def page_text(driver) -> str:
    """Everything the page shows, as text."""
    return driver.find_element("tag name", "body").text


def wait_for(driver, what: str, check) -> None:
    """Wait until check(driver) holds; on timeout, fail with what the page showed."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, WAIT, poll_frequency=0.5).until(check)
    except TimeoutException:
        pytest.fail(f"the MLflow UI never showed {what}; page was:\n{page_text(driver)[:2000]}")


def open_runs_page(driver, url: str, experiment_id: str, run_names: list[str]) -> None:
    """The experiment's run list, waiting until every run is listed."""
    driver.get(f"{url}/#/experiments/{experiment_id}/runs")
    wait_for(driver, f"the runs {run_names}",
             lambda d: all(name in page_text(d) for name in run_names))


def open_compare_page(driver, url: str, experiment_id: str, run_ids: list[str]) -> list[str]:
    """The compare-runs page for run_ids, once it plots lr against eval_accuracy (MLflow's
    first metric by name); returns the lr row's values, one per run."""
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids),
                                    "experiments": json.dumps([experiment_id])})
    driver.get(f"{url}/#/compare-runs?{query}")
    row = "//tr[th[normalize-space()='lr']]/td"
    wait_for(driver, "an lr row with one value per run",
             lambda d: len(d.find_elements("xpath", row)) == len(run_ids))
    wait_for(driver, "a plot of lr against eval_accuracy",
             lambda d: {"lr", "eval_accuracy"} <= set(plot_axes(d).split()))
    return [cell.text.strip() for cell in driver.find_elements("xpath", row)]


def plot_axes(driver) -> str:
    """The parallel coordinates plot's text: its axes' names and ticks."""
    plots = driver.find_elements("css selector", ".js-plotly-plot .parcoords")
    return plots[0].find_element("xpath", "./ancestor::*[contains(@class, 'js-plotly-plot')]"
                                 ).text if plots else ""


def close_assistant(driver) -> None:
    """Close MLflow's assistant side panel, if it is open, so that the page is visible."""
    for button in driver.find_elements("xpath", "//*[contains(., 'MLflow Assistant')]"
                                                "/ancestor::*[.//button][1]//button"):
        if (button.get_attribute("aria-label") or "").lower() == "close":
            button.click()
            return


def test_ui_lists_runs_and_compares_lr(clone_built, tmp_path):
    repo = clone_built()
    # Start the UI first: it takes a while to boot, and the second run trains meanwhile.
    ui = MlflowServer(["ui", "--workers", "1"], repo, tmp_path / "ui.log")
    try:
        dvc(repo, "exp", "run", "-S", "lr=0.2")
        experiment_id, runs = pipeline_runs(repo)
        assert {r.data.params["lr"] for r in runs} == {BASE_LR, "0.2"}
        ui.wait_ready()
        driver = browser(tmp_path / "profile")
        try:
            # The list shows the executions; their stage runs fold away under them.
            open_runs_page(driver, ui.url, experiment_id, [r.info.run_name for r in runs])
            exp = next(r.info.run_name for r in runs if r.data.params["lr"] == "0.2")
            assert f"{exp}-train" not in page_text(driver)
            lrs = open_compare_page(driver, ui.url, experiment_id, [r.info.run_id for r in runs])
            assert sorted(float(v) for v in lrs) == [float(BASE_LR), 0.2]

            # The artifacts live in <root>/mlartifacts: the UI finds them through the store.
            first = next(r for r in mlflow_runs(repo) if r.data.params.get("lr") == BASE_LR
                         and r.data.tags["imgpipe.stage"] == "train")
            driver.get(f"{ui.url}/#/experiments/{experiment_id}/runs/{first.info.run_id}"
                       "/artifacts")
            shown = ("train.json", "evaluation", "plots")  # evaluate's files sit in folders
            wait_for(driver, f"the artifacts {shown}",
                     lambda d: all(name in page_text(d) for name in shown))
        finally:
            driver.quit()
    finally:
        ui.kill()


def screenshot(out: Path, lrs: tuple[str, ...] = ("0.01", "0.02", "0.1", "0.2")) -> None:
    """Train the full sample at several lr through the DVC queue, and screenshot the comparison."""
    work = Path(tempfile.mkdtemp(prefix="imgpipe-screenshot-"))
    try:
        repo = make_repo(work / "repo", images=None, params={
            "lr": 0.05, "preprocess": {"image_size": 16},
            "train": {"epochs": 5, "batch_size": 64}})
        from stages.sample import write_digits

        write_digits(repo / "data" / "raw")
        dvc(repo, "add", "-q", "data/raw")
        dvc(repo, "repro")  # the baseline (lr 0.05); the queued runs then only train
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "sample digits")
        for lr in lrs:
            dvc(repo, "exp", "run", "--queue", "-S", f"lr={lr}")
        dvc(repo, "queue", "start", "-j", "2")
        while any(word in dvc(repo, "queue", "status").stdout for word in ("Queued", "Running")):
            time.sleep(5)
        dvc(repo, "queue", "stop")
        experiment_id, runs = pipeline_runs(repo)
        print(f"{len(runs)} pipeline runs: {sorted(r.data.params['lr'] for r in runs)}")
        with mlflow_ui(repo) as ui:
            driver = browser(work / "profile")
            try:
                open_compare_page(driver, ui.url, experiment_id, [r.info.run_id for r in runs])
                close_assistant(driver)
                time.sleep(2)  # let the plot finish drawing
                driver.save_screenshot(str(out))
            finally:
                driver.quit()
        print(f"wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "mlflow-ui.png"))
