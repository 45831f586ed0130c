"""The drawing page in a real browser: headless Chromium draws a digit and reads the answer.

Needs Debian's chromium and chromium-driver (`.ci/run` installs them); skipped, saying so,
where they are missing.
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import uvicorn

from conftest import free_port, use_project, wait_for
from digitune import config, model, registry, serve, study, study_file, tracking

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "Chromium and ChromeDriver are not installed (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def server(serving):
    """`digitune serve` on a free localhost port, in this process."""
    yield from _serve(serve.create_app(poll_seconds=0))


def _serve(app):
    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not instance.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    # It listens at once and loads the model in the background: ready once /health says so.
    wait_for(f"http://127.0.0.1:{port}/health", seconds=60)
    yield f"http://127.0.0.1:{port}/"
    instance.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=900,700",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


# Strokes as a person draws them on the 280x280 pad, in pad pixels.
STROKES = {
    1: [[(150, 40), (145, 240)]],
    7: [[(70, 60), (210, 60), (120, 240)]],
    0: [
        [
            (140, 40),
            (90, 70),
            (70, 140),
            (90, 210),
            (140, 240),
            (190, 210),
            (210, 140),
            (190, 70),
            (140, 40),
        ]
    ],
}


def draw(driver, canvas, strokes) -> None:
    """Drag the mouse along each stroke, from the canvas's centre-relative offsets."""
    half = canvas.size["width"] / 2, canvas.size["height"] / 2
    for stroke in strokes:
        actions = ActionChains(driver, duration=10)
        x, y = stroke[0]
        actions.move_to_element_with_offset(canvas, int(x - half[0]), int(y - half[1]))
        actions.click_and_hold()
        for next_x, next_y in stroke[1:]:
            # Small steps, as a hand moves, so the page sees a continuous line.
            for step in range(1, 11):
                actions.move_by_offset(
                    int(round((next_x - x) * step / 10))
                    - int(round((next_x - x) * (step - 1) / 10)),
                    int(round((next_y - y) * step / 10))
                    - int(round((next_y - y) * (step - 1) / 10)),
                )
            x, y = next_x, next_y
        actions.release()
        actions.perform()


@pytest.mark.parametrize("digit", [1, 7, 0])
def test_drawing_a_digit_shows_the_prediction(server, browser, digit, tmp_path):
    browser.get(server)
    canvas = browser.find_element(By.ID, "pad")
    draw(browser, canvas, STROKES[digit])
    browser.find_element(By.ID, "predict").click()
    shown = WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "digit").text or d.find_element(By.ID, "error").text
    )
    browser.save_screenshot(str(tmp_path / f"page-{digit}.png"))
    assert browser.find_element(By.ID, "error").text == ""
    assert shown == str(digit)
    assert "mnist-cnn version 1 (@champion)" in browser.find_element(By.ID, "model").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 10
    # The likeliest digit's bar is drawn, filled as far as its probability goes.
    fill = browser.find_element(By.CSS_SELECTOR, "#bars .bar.best .fill")
    track = browser.find_element(By.CSS_SELECTOR, "#bars .bar.best .track")
    assert fill.size["width"] > 0.3 * track.size["width"]

    browser.find_element(By.ID, "clear").click()
    assert browser.find_element(By.ID, "digit").text == ""


@pytest.fixture
def colour_server(tmp_path, monkeypatch):
    """A champion of colour pictures, 16x16 RGB of two classes ("blue", "red"), served."""
    import json

    import keras
    import mlflow
    import numpy as np

    use_project(monkeypatch, tmp_path)
    params = {"image_height": 16, "image_width": 16, "image_channels": 3, "num_classes": 2}
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 0.3, (200, 16, 16, 3)).astype("float32")
    labels = np.arange(200) % 2
    images[labels == 0, ..., 2] += 0.7  # blue
    images[labels == 1, ..., 0] += 0.7  # red
    keras.utils.set_random_seed(0)
    cnn = model.build_model(params)
    cnn.fit(images, labels, epochs=3, batch_size=20, verbose=0)
    with mlflow.start_run(
        experiment_id=tracking.experiment_id(tracking.configure(create=True), "colours")
    ):
        registry.register(
            cnn,
            model_name="colours-cnn",
            study_name="colours",
            trial_number=0,
            params=params,
            validation_accuracy=1.0,
            test_accuracy=1.0,
            test_images=0,
            data_sha256="0" * 64,
            extra_tags={"class_names": json.dumps(["blue", "red"]), "dataset": "colours"},
            alias=config.CHAMPION_ALIAS,
        )
    yield from _serve(serve.create_app("models:/colours-cnn@champion", poll_seconds=0))
    mlflow.set_tracking_uri(None)


def test_a_colour_model_gets_an_upload_form_instead_of_the_drawing_pad(
    colour_server, browser, tmp_path
):
    from PIL import Image

    browser.get(colour_server)
    upload = WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "upload").is_displayed() and d.find_element(By.ID, "upload")
    )
    assert not browser.find_element(By.ID, "drawing").is_displayed()
    hint = browser.find_element(By.ID, "hint").text
    assert "blue, red" in hint and "16x16 colour pictures" in hint
    picture = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (230, 20, 20)).save(picture)  # resized to 16x16 by the service
    upload.send_keys(str(picture))
    shown = WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "digit").text or d.find_element(By.ID, "error").text
    )
    browser.save_screenshot(str(tmp_path / "page-colour.png"))
    assert shown == "red"
    labels = [
        bar.text.split("\n")[0] for bar in browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    ]
    assert [label.split()[0] for label in labels] == ["blue", "red"]


def test_the_dashboard_shows_single_and_multi_objective_studies(project, browser):
    """`digitune dashboard` (optuna-dashboard) on a storage holding a single- and a
    multi-objective study that digitune created: their trials and metric names show."""
    import subprocess
    import sys
    from pathlib import Path

    import optuna

    from conftest import write_study

    storage = config.default_storage("watched")
    files = []
    for name, objectives_table in (
        ("watched", ""),
        ("watched-edge", '[objectives]\nminimize = ["params"]\n'),
    ):
        files.append(
            write_study(
                project,
                f'[study]\nname = "{name}"\n{objectives_table}[space]\n'
                'num_filters = { type = "int", low = 4, high = 32 }\n',
                f"{name}.toml",
            )
        )
        definition = study_file.load(files[-1])
        watched = study.load_or_create(definition, storage)
        for number, filters in enumerate((4, 12, 32)):
            values = [0.9 + number / 100] + ([filters * 100.0] if objectives_table else [])
            watched.add_trial(
                optuna.trial.create_trial(
                    values=values,
                    params={"num_filters": filters},
                    distributions={"num_filters": definition.distributions["num_filters"]},
                )
            )
    command = [str(Path(sys.executable).parent / "digitune"), "dashboard", "--study", str(files[0])]
    dashboard = subprocess.Popen(
        [*command, "--port", "0"], cwd=project, stdout=subprocess.PIPE, text=True
    )
    try:
        first = dashboard.stdout.readline()
        assert "optuna-dashboard for study 'watched' at http://127.0.0.1:" in first
        url = first.split(" at ")[1].split()[0]
        for study_id, metrics in ((1, ["val_accuracy"]), (2, ["val_accuracy", "params"])):
            browser.get(f"{url}/studies/{study_id}/trials")
            WebDriverWait(browser, 60).until(lambda driver: "Trial 2" in _text(driver))
            assert all(f"Trial {number}" in _text(browser) for number in range(3))
            browser.get(f"{url}/studies/{study_id}")
            WebDriverWait(browser, 60).until(lambda driver: "val_accuracy" in _text(driver))
            assert all(metric in _text(browser) for metric in metrics)
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)


def _text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text
