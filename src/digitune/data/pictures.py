"""Pictures kept on disk rather than in memory: a folder's decoded pixels, as uint8 rows of a
NumPy `.npy` file, read a slice or a batch at a time.

`Pictures` stands where a dataset's image array would (`data.Dataset`, `data.Split`): it has
the array's length, shape and dtype; a slice of it is another `Pictures` (nothing is read);
an index array, or `np.asarray`, reads those rows into an array. `data.preprocess` of it is
the same rows, model-ready (float32 in [0, 1], with a channel axis), converted as they are
read. Each read maps the file only while it copies the rows out, so the process holds no
more of it than the batch it asked for, however large the folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Rows per read when a whole `Pictures` is hashed or predicted, a few MB of pixels.
CHUNK_ROWS = 4096


class Pictures:
    """Rows `rows` of the uint8 pictures in the .npy file `path`; `ready`: read as the model
    takes them (`data.preprocess`)."""

    def __init__(self, path: Path, rows: range | None = None, ready: bool = False):
        stored = np.load(path, mmap_mode="r")
        self.path, self.ready, self._frame = Path(path), ready, stored.shape[1:]
        self.rows = range(len(stored)) if rows is None else rows
        del stored

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"Pictures({self.path}, rows {self.rows.start}-{self.rows.stop}, {self.dtype})"

    @property
    def shape(self) -> tuple[int, ...]:
        grey = len(self._frame) == 2
        return (len(self), *self._frame, *((1,) if self.ready and grey else ()))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("float32" if self.ready else "uint8")

    def model_ready(self) -> Pictures:
        return Pictures(self.path, self.rows, ready=True)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return Pictures(self.path, self.rows[key], self.ready)
        if isinstance(key, int | np.integer):
            return self[[key]][0]
        positions = np.asarray(key)
        if positions.dtype == bool:
            positions = np.flatnonzero(positions)
        positions = np.where(positions < 0, positions + len(self), positions)
        if positions.size and not (0 <= positions.min() and positions.max() < len(self)):
            raise IndexError(f"rows {key} of {len(self)} pictures")
        rows = self.rows.start + positions.astype(np.int64) * self.rows.step
        order = np.argsort(rows, kind="stable")  # Read in file order; answer in theirs.
        stored = np.load(self.path, mmap_mode="r")
        pixels = np.empty((len(rows), *self._frame), np.uint8)
        pixels[order] = stored[rows[order]]
        del stored
        return self._converted(pixels)

    def __array__(self, dtype=None, copy=None):
        stored = np.load(self.path, mmap_mode="r")
        step = self.rows.step
        pixels = np.array(stored[self.rows.start : self.rows.stop : step])
        del stored
        pixels = self._converted(pixels)
        return pixels if dtype is None else pixels.astype(dtype, copy=False)

    def chunks(self, rows: int | None = None):
        """The pictures as arrays of at most `rows` (CHUNK_ROWS) rows, in order."""
        rows = rows or CHUNK_ROWS
        for start in range(0, len(self), rows):
            yield np.asarray(self[start : start + rows])

    def _converted(self, pixels: np.ndarray) -> np.ndarray:
        if not self.ready:
            return pixels
        from digitune import data

        return data.preprocess(pixels)


def chunks(images, rows: int | None = None):
    """An array's or a `Pictures`' rows, `rows` (CHUNK_ROWS) at a time."""
    if isinstance(images, Pictures):
        yield from images.chunks(rows)
    else:
        rows = rows or CHUNK_ROWS
        for start in range(0, len(images), rows):
            yield images[start : start + rows]
