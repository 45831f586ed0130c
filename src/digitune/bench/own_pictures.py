"""Pictures of a user's own: a study file that names only the data and a time budget, against
the network a careful person writes by hand, side by side on the same pictures and test set.

    digitune bench --only own-pictures --own-minutes 3

Three datasets: scikit-learn's 8x8 digits; a generated folder of 40x40 grey shapes in four
classes (1,000 pictures and a test/ folder of 400); and a generated folder in CIFAR-10's
format, 32x32 colour pictures in ten classes (3,000 and 1,000 to test; the real CIFAR-10 is
a download these machines cannot make). Each dataset's study is `digitune tune` in a fresh
project folder, with nothing in its file but [data] and the budget; its figure is the test
accuracy of the model it registers. The baseline is plain Keras: three convolution blocks
(as many as the pictures allow) with batch normalisation, random rotation and shift, Adam,
and early stopping with patience 25 on a 20% validation split, given the same time; its
figure is its test accuracy with the weights of its best epoch.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from digitune import config, data, sizing

SHAPES = ("circle", "square", "triangle", "cross")
SHAPES_SIDE = 40
COLOUR_CLASSES = (
    "disc",
    "ring",
    "square",
    "frame",
    "triangle",
    "cross",
    "diamond",
    "bars",
    "columns",
    "checks",
)
COLOUR_SIDE = 32


def _outline(kind: str, centre: tuple[float, float], radius: float, angle: float):
    """The polygon (or circle box) of a shape, rotated by `angle` radians about its centre."""
    corners = {"square": 4, "triangle": 3, "diamond": 4}.get(kind)
    x, y = centre
    if corners:
        turn = angle + (math.pi / 4 if kind == "diamond" else 0)
        return [
            (
                x + radius * math.cos(turn + 2 * math.pi * k / corners),
                y + radius * math.sin(turn + 2 * math.pi * k / corners),
            )
            for k in range(corners)
        ]
    return [(x - radius, y - radius), (x + radius, y + radius)]


def _draw(canvas, kind: str, rng: np.random.Generator, side: int, ink, width: int) -> None:
    draw = ImageDraw.Draw(canvas)
    radius = rng.uniform(0.2, 0.38) * side
    centre = tuple(rng.uniform(radius + 1, side - radius - 1, 2))
    angle = rng.uniform(0, 2 * math.pi)
    fill = ink if rng.random() < 0.5 else None
    if kind in ("circle", "disc", "ring"):
        box = _outline("circle", centre, radius, angle)
        draw.ellipse(box, outline=ink, width=width, fill=ink if kind == "disc" else fill)
        if kind == "ring":
            inner = _outline("circle", centre, radius * 0.55, angle)
            draw.ellipse(inner, outline=ink, width=width)
    elif kind in ("square", "triangle", "diamond", "frame"):
        shape = "square" if kind == "frame" else kind
        points = _outline(shape, centre, radius, angle)
        draw.polygon(points, outline=ink, width=width, fill=None if kind == "frame" else fill)
    elif kind == "cross":
        x, y = centre
        for turn in (angle, angle + math.pi / 2):
            dx, dy = radius * math.cos(turn), radius * math.sin(turn)
            draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=ink, width=width + 1)
    else:  # bars, columns, checks: stripes of a random pitch
        pitch = int(rng.integers(3, 7))
        offset = int(rng.integers(0, pitch))
        for index in range(offset, side, pitch * 2):
            if kind in ("bars", "checks"):
                draw.rectangle([0, index, side, index + pitch - 1], fill=ink)
            if kind in ("columns", "checks"):
                draw.rectangle([index, 0, index + pitch - 1, side], fill=ink)


def picture_folder(
    root: Path, classes, side: int, colour: bool, per_class: int, test_per_class: int, seed: int
):
    """Generated pictures of `classes` (see `_draw`), `side` pixels square, in train/<class>/
    and test/<class>/: grey ink on a dark noisy background, or one random colour on another."""
    rng = np.random.default_rng(seed)
    for part, count in (("train", per_class), ("test", test_per_class)):
        for kind in classes:
            folder = root / part / kind
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                if colour:
                    background = tuple(int(v) for v in rng.integers(0, 256, 3))
                    ink = tuple(int(v) for v in rng.integers(0, 256, 3))
                    width, spread, shape = int(rng.integers(1, 3)), 20, (side, side, 3)
                else:
                    background, ink = int(rng.integers(0, 60)), int(rng.integers(150, 256))
                    width, spread, shape = int(rng.integers(1, 4)), 18, (side, side)
                canvas = Image.new("RGB" if colour else "L", (side, side), background)
                _draw(canvas, kind, rng, side, ink, width)
                noisy = np.asarray(canvas, float) + rng.normal(0, spread, shape)
                Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{index}.png")
    return root


def shapes_folder(root: Path):
    """40x40 grey pictures of four shapes, outlined or filled, of any size, place and turn."""
    return picture_folder(root, SHAPES, SHAPES_SIDE, False, 250, 100, seed=1)


def colour_folder(root: Path):
    """32x32 colour pictures in ten classes (CIFAR-10's format): shapes and stripes."""
    return picture_folder(root, COLOUR_CLASSES, COLOUR_SIDE, True, 300, 100, seed=2)


DATASETS = {
    # name: the study file's [data] (as DataSettings' fields), and what writes its folder.
    "scikit-learn digits": ({"dataset": "sklearn-digits"}, None),
    "generated shapes (40x40 grey, 4 classes)": ({"folder": "pictures/shapes"}, shapes_folder),
    "generated CIFAR-10 format (32x32 colour, 10 classes)": (
        {"folder": "pictures/colour"},
        colour_folder,
    ),
}


def careful_baseline(dataset: data.Dataset, seconds: float, seed: int = 0) -> dict:
    """The network a careful person writes by hand, trained on the dataset's training
    pictures for at most `seconds`, and its test accuracy."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    images = data.preprocess(dataset.train_images)
    test_images = data.preprocess(dataset.test_images)
    shape, classes = images.shape[1:], len(dataset.class_names)
    blocks = sizing.Plan(len(images), shape, classes).max_blocks
    network = [
        layers.Input(shape),
        layers.RandomRotation(10 / 360),
        layers.RandomTranslation(0.1, 0.1),
    ]
    for block in range(blocks):
        network += [
            layers.Conv2D(32 * 2**block, 3, padding="same", activation="relu"),
            layers.BatchNormalization(),
            layers.MaxPooling2D(),
        ]
    network += [
        layers.Flatten(),
        layers.Dropout(0.3),
        layers.Dense(128, activation="relu"),
        layers.Dropout(0.3),
        layers.Dense(classes, activation="softmax"),
    ]
    model = keras.Sequential(network)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    deadline = time.monotonic() + seconds

    class TimeUp(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = self.model.stop_training or time.monotonic() > deadline

    stopping = keras.callbacks.EarlyStopping("val_accuracy", patience=25, restore_best_weights=True)
    started = time.monotonic()
    history = model.fit(
        images,
        dataset.train_labels,
        batch_size=32,
        epochs=1000,
        validation_split=0.2,
        callbacks=[stopping, TimeUp()],
        verbose=0,
    )
    probabilities = model.predict(test_images, batch_size=500, verbose=0)
    return {
        "test_accuracy": float(np.mean(probabilities.argmax(1) == dataset.test_labels)),
        "epochs": len(history.history["loss"]),
        "seconds": time.monotonic() - started,
    }


def default_study(folder: Path, data_line: str, minutes: float, seed: int = 0) -> dict:
    """`digitune tune` on a study file naming only the data and the time (and the round's
    seed), in `folder`."""
    (folder / "studies").mkdir(exist_ok=True)
    study = folder / "studies" / "own.toml"
    study.write_text(
        f'[study]\nname = "own"\ntimeout_minutes = {minutes}\nseed = {seed}\n\n'
        f"[data]\n{data_line}\n"
    )
    environment = {**os.environ, "DIGITUNE_HOME": str(folder)}
    environment.pop("MLFLOW_TRACKING_URI", None)
    started = time.monotonic()
    finished = subprocess.run(
        [sys.executable, "-m", "digitune", "tune", "--study", str(study), "--json"],
        capture_output=True,
        text=True,
        env=environment,
        cwd=folder,
        check=False,
    )
    if finished.returncode:
        raise RuntimeError(f"the default study failed:\n{finished.stderr[-3000:]}")
    summary = json.loads(finished.stdout)
    sized = next(
        (line for line in finished.stderr.splitlines() if "sized for" in line), "(not sized)"
    )
    return {
        "test_accuracy": summary["test_accuracy"],
        "trials": summary["trials"],
        "seconds": time.monotonic() - started,
        "sized": sized.split("sized for", 1)[1].strip(),
    }


def own_pictures(
    minutes: float,
    repeats: int = 1,
    datasets: tuple[str, ...] = tuple(DATASETS),
    first_round: int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every run, the medians side by side) of the default study against the careful
    baseline on each of `datasets`, `repeats` rounds from `first_round` (each seeded by its
    number, so that more rounds add to earlier ones), each in a fresh project folder."""
    runs = []
    for round_number in range(first_round, first_round + repeats):
        for name in datasets:
            settings, make = DATASETS[name]
            data_line = "\n".join(f'{key} = "{value}"' for key, value in settings.items())
            with tempfile.TemporaryDirectory(prefix="digitune-own-") as scratch:
                folder = Path(scratch)
                if make is not None:
                    make(folder / settings["folder"])
                with config.project_at(folder):
                    dataset = data.load(config.DataSettings(**settings))
                ours = default_study(folder, data_line, minutes, seed=round_number)
                baseline = careful_baseline(dataset, minutes * 60, seed=round_number)
            runs.append(
                {
                    "dataset": name,
                    "round": round_number,
                    "training pictures": len(dataset.train_labels),
                    "test pictures": len(dataset.test_labels),
                    "default study test accuracy": round(ours["test_accuracy"], 4),
                    "default study trials": ours["trials"],
                    "default study minutes": round(ours["seconds"] / 60, 2),
                    "baseline test accuracy": round(baseline["test_accuracy"], 4),
                    "baseline epochs": baseline["epochs"],
                    "baseline minutes": round(baseline["seconds"] / 60, 2),
                    "sized": ours["sized"],
                }
            )
    table = pd.DataFrame(runs)
    summary = (
        table.groupby("dataset", sort=False)[
            ["default study test accuracy", "baseline test accuracy", "default study trials"]
        ]
        .median()
        .reset_index()
    )
    summary["difference"] = (
        summary["default study test accuracy"] - summary["baseline test accuracy"]
    ).round(4)
    return table, summary
