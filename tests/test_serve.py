"""The prediction API against a real registered model: every input kind, every bad input."""

from __future__ import annotations

import io
import json
import threading

import mlflow
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from digitune import config, data, imaging, registry, serve, tracking

pytestmark = pytest.mark.slow


@pytest.fixture
def client(serving):
    with TestClient(serve.create_app(poll_seconds=0)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def mnist():
    from conftest import FIXTURE_DIR

    return data.load_folder(FIXTURE_DIR)


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


def test_json_image_batch_and_scales(client, mnist):
    images = mnist.test_images[:20]
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


def test_pictures_are_prepared_like_mnist(client, mnist):
    """Digits scaled up, inverted and moved on a big canvas read as the originals do."""
    rng = np.random.default_rng(0)
    originals = mnist.test_images[:40]
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


def test_prepare_is_identity_on_mnist_and_undoes_a_drawing(mnist):
    rng = np.random.default_rng(1)
    for digit in mnist.test_images[:30]:
        original = digit.astype(np.float32) / 255
        # MNIST is MNIST-like already: only faint fringe pixels outside the crop may go.
        same = imaging.prepare(original)
        assert np.abs(same - original).max() < imaging.INK_THRESHOLD
        assert np.corrcoef(same.ravel(), original.ravel())[0, 1] > 0.999
        prepared = imaging.prepare(as_a_person_would_draw_it(digit, rng).astype(np.float32) / 255)
        assert np.corrcoef(prepared.ravel(), original.ravel())[0, 1] > 0.6
        centre = np.array(np.nonzero(prepared)).mean(axis=1)
        assert np.all(np.abs(centre - 14) < 3)


def test_raw_jpeg_body(client, mnist):
    picture = as_a_person_would_draw_it(mnist.test_images[1], np.random.default_rng(2))
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
            {"content": b"x" * (2 * 1024 * 1024 + 1), "headers": {"Content-Type": "image/png"}},
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


def test_no_model_is_503_not_a_crash(project):
    app = serve.create_app("models:/no-such-model@champion", poll_seconds=0)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 503
        answer = client.post("/predict", json={"image": [[0] * 28] * 28})
        assert answer.status_code == 503 and "no-such-model" in answer.json()["detail"]


def crown_a_new_version(mlflow_client):
    """Register version 1's model again and make the new version @champion."""
    source = mlflow_client.get_model_version(config.REGISTERED_MODEL_NAME, "1")
    new = mlflow_client.create_model_version(
        config.REGISTERED_MODEL_NAME, source.source, model_id=source.model_id
    )
    mlflow_client.set_registered_model_alias(config.REGISTERED_MODEL_NAME, "champion", new.version)
    return new


def test_alias_move_is_picked_up_without_failing_requests(project, champion_home, mnist):
    """A copy of the champion store; a new version becomes champion while requests flow."""
    import shutil

    shutil.copytree(champion_home / "mlruns", project / "mlruns")
    app = serve.create_app(poll_seconds=0)
    image = {"image": mnist.test_images[0].tolist()}
    with TestClient(app) as client:
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
        mlflow_client = tracking.configure()
        new = crown_a_new_version(mlflow_client)
        reloaded = client.post("/reload").json()
        assert reloaded["reloaded"] is True and reloaded["version"] == str(new.version)
        for _ in range(5):
            assert client.post("/predict", json=image).json()["version"] == str(new.version)
        stop.set()
        worker.join()
    assert failures == []
    assert versions <= {"1", str(new.version)}
    assert registry.versions_table(mlflow_client)["version"].tolist() == [1, int(new.version)]


def test_poller_follows_the_alias(project, champion_home):
    import shutil
    import time

    shutil.copytree(champion_home / "mlruns", project / "mlruns")
    with TestClient(serve.create_app(poll_seconds=0.2)) as client:
        assert client.get("/health").json()["version"] == "1"
        mlflow_client = tracking.configure()
        new = crown_a_new_version(mlflow_client)
        deadline = time.monotonic() + 30
        while client.get("/health").json()["version"] != str(new.version):
            assert time.monotonic() < deadline, "the poller never picked up the new champion"
            time.sleep(0.1)
