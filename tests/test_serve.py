"""The prediction API against a real registered model: every input kind, every bad input."""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import threading

import mlflow
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import free_port, wait_for
from digitune import config, data, preprocessing, registry, serve, tracking
from digitune.data import mnist

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def started(app):
    """A client of `app` once its first model load has been tried (it loads in the
    background: the server listens at once)."""
    with TestClient(app) as test_client:
        assert app.state.holder.first_attempt.wait(120), "the model never finished loading"
        yield test_client


@pytest.fixture
def client(serving):
    with started(serve.create_app(poll_seconds=0)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def digits():
    from conftest import FIXTURE_DIR

    return mnist.load_folder(FIXTURE_DIR)


def png(image: np.ndarray, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buffer, format=format)
    return buffer.getvalue()


def as_a_person_would_draw_it(digit: np.ndarray, rng) -> np.ndarray:
    """An MNIST digit scaled up 2-4x, inverted (dark ink on white) and put somewhere on a
    larger canvas: nothing like MNIST until it is prepared."""
    size = int(rng.integers(56, 113))
    big = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BILINEAR))
    canvas = np.full((260, 200), 255, dtype=np.uint8)
    top, left = rng.integers(0, 260 - size), rng.integers(0, 200 - size)
    canvas[top : top + size, left : left + size] = 255 - big
    return canvas


def test_health_and_metadata(client):
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["version"] == "1"
    metadata = client.get("/metadata").json()
    assert metadata["model"] == "mnist-cnn" and metadata["alias"] == "champion"
    assert metadata["signature"]["inputs"][0]["tensor-spec"]["shape"] == [-1, 28, 28, 1]
    assert metadata["study"] == "served"
    assert client.get("/docs").status_code == 200
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_json_image_batch_and_scales(client, digits):
    images = digits.test_images[:20]
    reference = mlflow.pyfunc.load_model("models:/mnist-cnn@champion").predict(
        data.preprocess(images)
    )
    single = client.post("/predict", json={"image": images[0].tolist()}).json()
    assert single["model"] == "mnist-cnn" and single["version"] == "1"
    assert single["alias"] == "champion"
    assert single["predictions"][0]["digit"] == int(reference[0].argmax())
    assert sum(single["predictions"][0]["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    unit = client.post("/predict", json={"image": (images[0] / 255).tolist()}).json()
    assert unit["predictions"][0]["digit"] == single["predictions"][0]["digit"]
    batch = client.post("/predict", json={"images": images.tolist()}).json()
    assert [p["digit"] for p in batch["predictions"]] == reference.argmax(axis=1).tolist()
    np.testing.assert_allclose(
        [p["probabilities"] for p in batch["predictions"]], reference, atol=1e-5
    )


def test_pictures_are_prepared_like_mnist(client, digits):
    """Digits scaled up, inverted and moved on a big canvas read as the originals do."""
    rng = np.random.default_rng(0)
    originals = digits.test_images[:40]
    direct = client.post("/predict", json={"images": originals.tolist()}).json()["predictions"]
    agree, naive_agree = 0, 0
    for original, expected in zip(originals, direct, strict=True):
        picture = as_a_person_would_draw_it(original, rng)
        answer = client.post("/predict", files={"file": ("d.png", png(picture), "image/png")})
        assert answer.status_code == 200
        agree += answer.json()["predictions"][0]["digit"] == expected["digit"]
        # Without preparation: the same picture squeezed to 28x28 as it is.
        squeezed = np.asarray(Image.fromarray(picture).resize((28, 28)))
        naive = client.post("/predict", json={"image": squeezed.tolist()}).json()
        naive_agree += naive["predictions"][0]["digit"] == expected["digit"]
    assert agree >= 36, f"only {agree} of 40 prepared pictures read as their originals"
    assert naive_agree < agree - 10


def test_prepare_is_identity_on_mnist_and_undoes_a_drawing(digits):
    rng = np.random.default_rng(1)
    for digit in digits.test_images[:30]:
        original = digit.astype(np.float32) / 255
        # MNIST is MNIST-like already: only faint fringe pixels outside the crop may go.
        same = preprocessing.prepare(original)
        assert np.abs(same - original).max() < preprocessing.INK_THRESHOLD
        assert np.corrcoef(same.ravel(), original.ravel())[0, 1] > 0.999
        prepared = preprocessing.prepare(
            as_a_person_would_draw_it(digit, rng).astype(np.float32) / 255
        )
        assert np.corrcoef(prepared.ravel(), original.ravel())[0, 1] > 0.6
        centre = np.array(np.nonzero(prepared)).mean(axis=1)
        assert np.all(np.abs(centre - 14) < 3)


def test_raw_jpeg_body(client, digits):
    picture = as_a_person_would_draw_it(digits.test_images[1], np.random.default_rng(2))
    answer = client.post(
        "/predict", content=png(picture, "JPEG"), headers={"Content-Type": "image/jpeg"}
    )
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1


@pytest.mark.parametrize(
    ("request_kwargs", "status", "message"),
    [
        ({"content": b"hello", "headers": {"Content-Type": "image/png"}}, 422, "not a readable"),
        ({"files": {"file": ("x.png", b"not a png", "image/png")}}, 422, "not a readable"),
        ({"content": b"", "headers": {"Content-Type": "image/png"}}, 422, "empty"),
        ({"json": {"image": [[0] * 27] * 28}}, 422, "28x28"),
        ({"json": {"image": [[0, 1]]}}, 422, "shape (1, 2)"),
        ({"json": {"image": [[300] * 28] * 28}}, 422, "0-255 or 0-1"),
        ({"json": {"image": [[-1] * 28] * 28}}, 422, "0-255 or 0-1"),
        ({"json": {"image": [["a"] * 28] * 28}}, 422, "array of numbers"),
        ({"json": {"images": [[[0] * 28] * 28] * 257}}, 422, "at most 256"),
        ({"json": {"images": []}}, 422, "non-empty list"),
        ({"json": {"picture": 1}}, 422, '{"image"'),
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 422, "JSON"),
        ({"content": b"x" * 10, "headers": {"Content-Type": "text/plain"}}, 422, "content type"),
        (
            {
                "content": b"x" * (serve.MAX_BODY_BYTES + 1),
                "headers": {"Content-Type": "image/png"},
            },
            413,
            "limit",
        ),
        ({"files": {"file": ("w.png", png(np.full((40, 40), 255)), "image/png")}}, 422, "blank"),
    ],
)
def test_bad_input_gets_a_4xx_and_the_service_goes_on(client, request_kwargs, status, message):
    answer = client.post("/predict", **request_kwargs)
    assert answer.status_code == status
    assert message in answer.json()["detail"]
    assert client.get("/health").status_code == 200
    ok = client.post("/predict", json={"image": [[0] * 28] * 28})
    assert ok.status_code == 200


def test_nan_in_json(client):
    body = json.dumps({"image": [[0] * 28] * 28}).replace("0", "NaN", 1)
    answer = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 422 and "NaN" in answer.json()["detail"]


def test_true_and_false_in_json_are_not_pixels(client):
    """Found by Schemathesis's negative tests: JSON booleans passed as 1 and 0."""
    image = [[False] * 28 for _ in range(28)]
    image[3][4] = True
    answer = client.post("/predict", json={"image": image})
    assert answer.status_code == 422 and "not true or false" in answer.json()["detail"]


def test_no_model_is_503_not_a_crash(project):
    app = serve.create_app("models:/no-such-model@champion", poll_seconds=0)
    with started(app) as client:
        assert client.get("/health").status_code == 503
        answer = client.post("/predict", json={"image": [[0] * 28] * 28})
        assert answer.status_code == 503 and "no-such-model" in answer.json()["detail"]


def crown_a_new_version(mlflow_client):
    """Register version 1's model again, with its tags (digitune loads only what its studies
    registered), and make the new version @champion."""
    source = mlflow_client.get_model_version(config.REGISTERED_MODEL_NAME, "1")
    new = mlflow_client.create_model_version(
        config.REGISTERED_MODEL_NAME, source.source, tags=source.tags, model_id=source.model_id
    )
    mlflow_client.set_registered_model_alias(config.REGISTERED_MODEL_NAME, "champion", new.version)
    return new


def wait_until(condition, seconds: float = 60) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "waited in vain"
        time.sleep(0.01)


def test_alias_move_is_picked_up_without_failing_requests(project, champion_home, digits):
    """A copy of the champion store; a new version becomes champion while requests flow."""
    import shutil

    shutil.copytree(champion_home / "mlruns", project / "mlruns")
    app = serve.create_app(poll_seconds=0)
    image = {"image": digits.test_images[0].tolist()}
    with started(app) as client:
        assert client.post("/predict", json=image).json()["version"] == "1"
        failures, versions, stop = [], set(), threading.Event()

        def keep_asking():
            while not stop.is_set():
                answer = client.post("/predict", json=image)
                if answer.status_code != 200:
                    failures.append(answer.status_code)
                versions.add(answer.json().get("version"))

        worker = threading.Thread(target=keep_asking)
        worker.start()
        wait_until(lambda: "1" in versions)  # Requests are flowing before the swap...
        mlflow_client = tracking.configure(create=True)
        new = crown_a_new_version(mlflow_client)
        reloaded = client.post("/reload").json()
        assert reloaded["reloaded"] is True and reloaded["version"] == str(new.version)
        wait_until(lambda: str(new.version) in versions)  # ... and after it, on the new one.
        stop.set()
        worker.join()
    assert failures == []
    assert versions == {"1", str(new.version)}
    assert registry.versions_table(mlflow_client)["version"].tolist() == [1, int(new.version)]


def test_poller_follows_the_alias(project, champion_home):
    import shutil
    import time

    shutil.copytree(champion_home / "mlruns", project / "mlruns")
    with started(serve.create_app(poll_seconds=0.2)) as client:
        assert client.get("/health").json()["version"] == "1"
        mlflow_client = tracking.configure(create=True)
        new = crown_a_new_version(mlflow_client)
        deadline = time.monotonic() + 30
        while client.get("/health").json()["version"] != str(new.version):
            assert time.monotonic() < deadline, "the poller never picked up the new champion"
            time.sleep(0.1)


# Bounded work per request: what a hostile or unlucky client sends.
def png_with_huge_text_chunk() -> bytes:
    """A small PNG whose compressed text chunk inflates to 20 MB."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "0" * 20_000_000, zip=True)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def huge_blank_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), 255).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "content_type", "message"),
    [
        # 25 megapixels in 30 KB: refused from its header, before decoding.
        (huge_blank_png(5000), "image/png", "5000x5000 pixels; the limit is 16,777,216"),
        (png_with_huge_text_chunk(), "image/png", "not a readable PNG or JPEG"),
        (b"[" * 200_000, "application/json", "nests too deeply"),
        (
            b'{"image": [' + b",".join([b"[" + b",".join([b"9" * 4000] * 28) + b"]"] * 28) + b"]}",
            "application/json",
            "array of numbers",
        ),
        (
            b'{"image": ' + json.dumps([[0] * 28] * 28).encode() + b', "prepare": "yes"}',
            "application/json",
            "'prepare' must be true or false",
        ),
        (json.dumps({"image": "a" * 100_000}).encode(), "application/json", "28x28"),
        (b'{"image": [[Infinity]]}', "application/json", "28x28"),
        (
            b'{"image": ' + json.dumps([[0] * 28] * 28).encode() + b', "lable": 3}',
            "application/json",
            "unknown field(s) 'lable'",
        ),
    ],
    ids=["pixels", "zTXt", "nesting", "huge-numbers", "prepare", "string", "infinity", "unknown"],
)
def test_hostile_bodies_get_a_4xx_in_bounded_time(client, content, content_type, message):
    import time

    started = time.perf_counter()
    answer = client.post("/predict", content=content, headers={"Content-Type": content_type})
    assert answer.status_code == 422 and message in answer.json()["detail"], answer.text
    assert time.perf_counter() - started < 5
    assert client.get("/health").status_code == 200


def test_a_chunked_body_over_the_limit_is_refused_as_it_streams(client):
    sent = []

    def chunks():
        for _ in range(serve.MAX_BODY_BYTES // 65536 + 10):
            sent.append(65536)
            yield b"\0" * 65536

    answer = client.post("/predict", content=chunks(), headers={"Content-Type": "image/png"})
    assert answer.status_code == 413 and "over the limit" in answer.json()["detail"]
    assert "content-length" not in {k.lower() for k in answer.request.headers}


def test_a_phone_s_multi_picture_jpeg_is_read(client, digits):
    drawing = Image.fromarray(
        as_a_person_would_draw_it(digits.test_images[0], np.random.default_rng(0))
    )
    buffer = io.BytesIO()
    drawing.convert("RGB").save(
        buffer, "MPO", save_all=True, append_images=[drawing.convert("RGB")]
    )
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    answer = client.post(
        "/predict", content=buffer.getvalue(), headers={"Content-Type": "image/jpeg"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"][0]["digit"] == digits.test_labels[0]


def test_health_answers_at_once_while_a_big_picture_is_worked_on(client):
    import time

    picture = np.full((4096, 4096), 255, np.uint8)
    picture[1000:3000, 1800:2200] = 0
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, "PNG")
    durations = []
    # The model's first call compiles it, holding the interpreter for a while: done before
    # the measurement, as any served model has done it long before.
    client.post("/predict", content=buffer.getvalue(), headers={"Content-Type": "image/png"})

    def send_big_pictures():
        for _ in range(3):
            started = time.perf_counter()
            answer = client.post(
                "/predict", content=buffer.getvalue(), headers={"Content-Type": "image/png"}
            )
            durations.append(time.perf_counter() - started)
            assert answer.status_code == 200

    sender = threading.Thread(target=send_big_pictures)
    sender.start()
    latencies = []
    while sender.is_alive():
        started = time.perf_counter()
        assert client.get("/health").status_code == 200
        latencies.append(time.perf_counter() - started)
        time.sleep(0.01)
    sender.join()
    # Were the pictures worked on in the event loop, /health would wait for each of them: as
    # the pictures follow one another, most polls would take a good part of a picture's time.
    # The median poll, against the median picture: a few answers may stall while the other
    # test processes hold the cores.
    assert len(latencies) >= 10
    typical = statistics.median(latencies)
    assert typical < 0.25 * statistics.median(durations), (typical, durations)


def test_the_server_says_it_is_loading_until_the_model_is_ready(serving):
    app = serve.create_app(poll_seconds=0)
    with TestClient(app) as client:
        first = client.get("/health")
        assert first.status_code == 503 and first.json()["detail"].startswith("loading models:/")
        assert app.state.holder.first_attempt.wait(120)
        assert client.get("/health").status_code == 200


def test_a_version_whose_probe_fails_is_not_swapped_in(project, champion_home, monkeypatch):
    import shutil

    monkeypatch.setattr(serve, "RELOAD_INTERVAL_SECONDS", 0)  # Two reloads in a row here.
    shutil.copytree(champion_home / "mlruns", project / "mlruns")
    with started(serve.create_app(poll_seconds=0)) as client:
        # A champion whose weights are all NaN: it loads, but predicts nothing usable.
        from digitune import model

        broken = model.build_model({"num_conv_blocks": 2, "num_filters": 16, "dense_units": 64})
        broken.set_weights([np.full_like(w, np.nan) for w in broken.get_weights()])
        mlflow_client = tracking.configure(create=True)
        with mlflow.start_run():
            version = registry.register(
                broken,
                study_name="served",
                trial_number=1,
                params={},
                validation_accuracy=0.0,
                test_accuracy=0.0,
                test_images=300,
                data_sha256="0" * 64,
                alias=config.CHAMPION_ALIAS,
            )
        reloaded = client.post("/reload").json()
        assert reloaded["reloaded"] is False and reloaded["version"] == "1"
        assert "probe prediction" in reloaded["error"] and "NaN" in reloaded["error"]
        assert client.post("/predict", json={"image": [[0] * 28] * 28}).json()["version"] == "1"
        # Pointing the alias back clears the error: things are fine again.
        mlflow_client.set_registered_model_alias(config.REGISTERED_MODEL_NAME, "champion", "1")
        assert client.post("/reload").json()["error"] is None
        assert str(version.version) == "2"


def test_the_poller_survives_a_reload_that_raises(project, champion_home, monkeypatch):
    import shutil

    shutil.copytree(champion_home / "mlruns", project / "mlruns")
    app = serve.create_app(poll_seconds=0.1)
    with started(app) as client:
        holder = app.state.holder
        original, calls = holder.reload, []

        def reload_that_raises():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("anything at all")
            return original()

        monkeypatch.setattr(holder, "reload", reload_that_raises)
        wait_until(lambda: len(calls) >= 3)
        poller = [t for t in threading.enumerate() if t.name == "loader"]
        assert poller and poller[0].is_alive()
        assert client.get("/health").status_code == 200


def test_a_registry_that_is_down_at_start_up_is_reported_within_seconds(project, tmp_path):
    import os
    import subprocess
    import sys
    import time

    port = free_port()
    environment = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    environment.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "digitune", "serve", "--port", str(port)],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        started = time.monotonic()
        # 503, as it should be, saying that the registry cannot be reached.
        wait_for(
            f"http://127.0.0.1:{port}/health",
            accept=lambda status, body: (
                status == 503 and "cannot reach" in json.loads(body)["detail"]
            ),
            process=server,
            seconds=60,
        )
        listening_and_reported = time.monotonic() - started
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert listening_and_reported < 30


def test_a_model_whose_output_is_nan_gets_a_json_4xx(project, champion_home, digits):
    """A version that passes its probe (a blank image) but overflows on ink: its NaN answer
    is a JSON 422 naming the images, never a 500."""
    import shutil

    from digitune import model

    shutil.copytree(champion_home / "mlruns", project / "mlruns")
    overflowing = model.build_model({"num_conv_blocks": 1, "num_filters": 8, "dense_units": 16})
    # Kernels made non-negative, so that ink always reaches the last layer (a blank image
    # does not), whose kernel then overflows float32.
    weights = [np.abs(w) if w.ndim > 1 else w for w in overflowing.get_weights()]
    weights[-2] = np.full_like(weights[-2], 3e38)  # The last layer's kernel.
    overflowing.set_weights(weights)
    tracking.configure(create=True)
    with mlflow.start_run():
        registry.register(
            overflowing,
            study_name="served",
            trial_number=2,
            params={},
            validation_accuracy=0.0,
            test_accuracy=0.0,
            test_images=300,
            data_sha256="0" * 64,
            alias=config.CHAMPION_ALIAS,
        )
    with started(serve.create_app(poll_seconds=0)) as client:
        assert client.get("/health").json()["version"] == "2"
        blank = np.zeros((28, 28)).tolist()
        answer = client.post("/predict", json={"images": [blank, digits.test_images[0].tolist()]})
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"].startswith("the model gave NaN or infinite probabilities")
        assert "image(s) 1 of the request" in answer.json()["detail"]


def test_content_types_are_matched_whatever_their_case(client, digits):
    picture = png(digits.test_images[0])
    answer = client.post("/predict", content=picture, headers={"Content-Type": "Image/PNG"})
    assert answer.status_code == 200, answer.text
    answer = client.post(
        "/predict",
        content=json.dumps({"image": digits.test_images[0].tolist()}),
        headers={"Content-Type": "Application/JSON; charset=UTF-8"},
    )
    assert answer.status_code == 200, answer.text
    upload = client.post("/predict", files={"file": ("d.png", picture, "image/png")})
    assert upload.status_code == 200, upload.text


def test_what_nobody_foresaw_is_still_a_json_error(client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug, with /secret/paths in it")

    monkeypatch.setattr(preprocessing, "images_from", broken)
    with TestClient(client.app, raise_server_exceptions=False) as quiet:
        answer = quiet.post("/predict", content=b"x", headers={"Content-Type": "image/png"})
    assert answer.status_code == 500
    assert answer.json() == {"detail": "the server failed on this request (RuntimeError)"}
