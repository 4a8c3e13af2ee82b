"""Feature vectors from an ONNX backbone: the paper's M* (Algorithm 3, lines 2-3).

The trained network is cut before its last linear layer (see
:mod:`vbsw_cli.onnx_graph`) and run with onnxruntime over the input in batches,
so memory stays flat however many rows there are:

* a ``.npy`` file is read through a memory map (from stdin, row by row after
  its header);
* a Parquet file is read in record batches (from stdin it is buffered first,
  because a Parquet footer sits at the end of the file);
* a folder of PNG/JPEG images, one sub-folder per class, is decoded lazily.

Each row is reshaped to the model's input shape and cast to its dtype. The
caller gets :class:`FeatureBatch` objects: a 2-D float32 feature array and the
carried columns (id, label, and for images the file path).
"""

from __future__ import annotations

import math
import mmap
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vbsw_cli import io
from vbsw_cli.errors import DataError, UsageError
from vbsw_cli.progress import NullProgress

DEVICES = ("auto", "cuda", "cpu")
DEFAULT_BATCH = 256
# The tensor column tried first, then the fallback, when none is named.
TENSOR_COLUMNS = ("image", "features")
STDIN = "stdin"
# Options that only some kinds of input use (see check_options_apply).
IMAGE_OPTIONS = ("--image-size", "--mean", "--std", "--skip-bad-images")
COLUMN_OPTIONS = ("--tensor-column", "--id-column", "--label-column")
COLUMNS_INSTEAD = {
    "npy": "(its rows are the tensors, the row number becomes the id)",
    "image folder": "(the sub-folder name becomes the label, the position in "
                    "sorted order the id)",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# onnxruntime severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
QUIET_LOG, DEFAULT_LOG = 4, 2
# Memory-mapped input already embedded is dropped from the resident set in
# steps of this size.
RELEASE_BYTES = 16 * 2**20

if TYPE_CHECKING:  # onnx and onnxruntime load only when a model is (0.6 s)
    import onnx

ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64,
    "tensor(float16)": np.float16, "tensor(int64)": np.int64,
    "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
}


# ---------------------------------------------------------------------------
# The backbone


@dataclass
class Backbone:
    """An onnxruntime session of the model cut at ``tensor``.

    ``row_shape`` is the input shape without the batch dimension, ``dtype`` the
    input's NumPy dtype, ``provider`` the execution provider the session got,
    ``layer`` the --layer that chose the cut (its keywords in lower case).
    """

    path: str
    tensor: str
    input_name: str
    row_shape: tuple[int, ...]
    dtype: np.dtype
    provider: str
    session: object
    fixed_batch: int | None = None
    notices: list[str] = field(default_factory=list)
    in_flight: int = 1
    threads: int = 0
    layer: str = "auto"

    @property
    def n_values(self) -> int:
        """Values per input row: the product of ``row_shape``."""
        return math.prod(self.row_shape)

    def run(self, X: np.ndarray) -> np.ndarray:
        """Features of a batch.

        Parameters
        ----------
        X : ndarray of shape (n_samples, *row_shape), of ``dtype``.

        Returns
        -------
        features : float32 ndarray of shape (n_samples, n_features).
        """
        out = self.session.run([self.tensor], {self.input_name: X})[0]
        return np.asarray(out).reshape(len(X), -1).astype(np.float32, copy=False)


def load_backbone(path: str, *, layer: str = "auto", device: str = "auto",
                  input_shape: Sequence[int] | None = None,
                  quiet_runtime: bool = True) -> Backbone:
    """Load the model, cut it at ``layer`` and open a session on ``device``.

    ``input_shape`` (without the batch dimension) fills in the sizes the model
    leaves open. ``quiet_runtime`` keeps onnxruntime's own log (for example
    its complaints when CUDA libraries are missing) off stderr.
    """
    from vbsw_cli import onnx_graph

    check_device(device)
    model = onnx_graph.load_model(path)
    check_one_input(model, path)
    try:
        tensor = onnx_graph.find_cut(model, layer)
    except DataError as error:  # onnx_graph does not know the file's name
        raise DataError(f"{path}: {error}") from error
    body = onnx_graph.cut(model, tensor)

    in_flight, threads = cpu_layout()
    session, provider, notices = open_session(body, device, path, quiet_runtime,
                                              threads=threads)
    if provider != CPU:
        in_flight, threads = 1, 0
    spec = session.get_inputs()[0]
    dtype = _input_dtype(spec.type, path)
    fixed_batch, row_shape = resolve_shape(spec.shape, input_shape, path,
                                           spec.name)
    return Backbone(path, tensor, spec.name, row_shape, dtype, provider, session,
                    fixed_batch, notices, in_flight, threads,
                    onnx_graph.layer_keyword(model, layer))


def cpu_layout(cores: int | None = None) -> tuple[int, int]:
    """``(batches in flight, onnxruntime threads per batch)`` on the CPU.

    Two batches run side by side, each on half the cores (one thread each on
    two cores). A batch spread over every core waits at each operator for its
    slowest thread, so the thread that writes the output, taking a core now
    and then, stalls every operator of a small backbone; batches side by side
    share no such barrier. Both layouts infer equally fast when nothing else
    runs (benchmarks/embed.py measures both).
    """
    from vbsw_cli.neighbors import thread_count

    cores = cores or thread_count(None)
    in_flight = 2 if cores >= 2 else 1
    return in_flight, max(1, cores // in_flight)


def check_one_input(model: "onnx.ModelProto", path: str) -> None:
    """Refuse a model that takes more than one input (or none)."""
    constants = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in constants]
    if len(names) != 1:
        shown = f" ({', '.join(names)})" if names else ""
        raise DataError(f"{path}: the model takes {len(names)} inputs{shown}; "
                        "vbsw embed supports models with exactly one input")


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise UsageError(f"--device {device}: choose one of " + ", ".join(DEVICES))


def open_session(model: "onnx.ModelProto", device: str, path: str,
                 quiet_runtime: bool = True, threads: int = 0):
    """``(session, provider, notices)`` on the device asked for.

    onnxruntime falls back to the CPU without an error when the CUDA provider
    cannot load, so the provider the session reports is what decides. A CPU
    session runs each batch on ``threads`` threads (0: onnxruntime's choice).
    """
    import onnxruntime as ort

    level = QUIET_LOG if quiet_runtime else DEFAULT_LOG
    ort.set_default_logger_severity(level)
    data = model.SerializeToString()
    if device == "cpu":
        return _session(ort, data, [CPU], level, path, threads), CPU, []

    reason = None
    if CUDA not in ort.get_available_providers():
        reason = "this onnxruntime build has no CUDA provider (onnxruntime-gpu has)"
    else:
        session = _session(ort, data, [CUDA, CPU], level, path)
        if session.get_providers()[0] == CUDA:
            return session, CUDA, []
        reason = ("onnxruntime could not start its CUDA provider: no GPU, or "
                  "the CUDA/cuDNN libraries it needs are missing")
    if device == "cuda":
        raise DataError(f"--device cuda: CUDA is not usable here; {reason} "
                        "(use --device cpu or auto)")
    notice = f"CUDA is not usable here, running on the CPU; {reason}"
    return _session(ort, data, [CPU], level, path, threads), CPU, [notice]


def _session(ort, data: bytes, providers: list[str], level: int, path: str,
             threads: int = 0):
    options = ort.SessionOptions()
    options.log_severity_level = level
    options.intra_op_num_threads = threads  # 0: onnxruntime's choice
    try:
        return ort.InferenceSession(data, options, providers=providers)
    except Exception as error:  # onnxruntime raises its own unrelated types
        text = str(error).strip().splitlines()
        raise DataError(f"{path}: onnxruntime cannot run the model "
                        f"({text[0] if text else type(error).__name__})")


def _input_dtype(kind: str, path: str) -> np.dtype:
    if kind not in ORT_DTYPES:
        raise DataError(f"{path}: the model's input is {kind}; vbsw embed feeds "
                        "numeric tensors (" + ", ".join(ORT_DTYPES) + ")")
    return np.dtype(ORT_DTYPES[kind])


def resolve_shape(declared: Sequence, given: Sequence[int] | None, path: str,
                  name: str) -> tuple[int | None, tuple[int, ...]]:
    """``(fixed batch size or None, row shape)`` from the model and the option.

    ``declared`` is the model's input shape, batch dimension first; sizes it
    leaves open are strings or None and must come from ``given``.
    """
    if not declared:
        raise DataError(f"{path}: input '{name}' has no declared shape; it "
                        "needs at least a batch dimension")
    batch, rows = declared[0], list(declared[1:])
    fixed = batch if isinstance(batch, int) and batch > 0 else None
    shown = "x".join(str(d) for d in declared)
    if given is not None:
        given = list(given)
        if len(given) != len(rows):
            raise UsageError(f"--input-shape {_dims(given)}: the model's input "
                             f"'{name}' ({shown}) has {len(rows)} dimensions "
                             "after the batch")
        for position, (want, got) in enumerate(zip(rows, given)):
            if isinstance(want, int) and want > 0 and want != got:
                raise UsageError(f"--input-shape {_dims(given)}: dimension "
                                 f"{position + 1} of '{name}' is {want}")
        return fixed, tuple(int(g) for g in given)
    open_dims = [i + 1 for i, d in enumerate(rows)
                 if not (isinstance(d, int) and d > 0)]
    if open_dims:
        raise DataError(f"{path}: input '{name}' ({shown}) leaves dimension(s) "
                        f"{open_dims} open; give --input-shape (the sizes after "
                        "the batch, e.g. 3,224,224)")
    return fixed, tuple(rows)


def _dims(shape: Sequence[int]) -> str:
    return ",".join(str(d) for d in shape)


def parse_shape(text: str | None, option: str) -> tuple[int, ...] | None:
    """``"1,8,8"`` (or ``1x8x8``) as a tuple of positive sizes."""
    if text is None:
        return None
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise UsageError(f"{option} {text}: expected positive sizes such as "
                         "1,8,8")
    return shape


# ---------------------------------------------------------------------------
# Inputs


@dataclass
class RawBatch:
    """Input rows and the columns carried beside them.

    values : ndarray of shape (n_samples, ...) of any numeric dtype.
    carried : column name -> Arrow array of n_samples values.
    first_row : index of the batch's first row in the input.
    """

    values: np.ndarray
    carried: dict[str, pa.Array]
    first_row: int


class Source:
    """An input read in batches: ``name``, ``n_rows`` (or None), ``fields``."""

    name: str = ""
    kind: str = ""
    n_rows: int | None = None
    fields: list[pa.Field] = []
    metadata: dict[bytes, bytes] | None = None
    skipped: list[str] = []

    def batches(self, batch_size: int) -> Iterator[RawBatch]:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{io.describe(self.name)} ({self.kind})"


def _row_ids(start: int, stop: int) -> dict[str, pa.Array]:
    return {io.ID_COLUMN: io.from_numpy(np.arange(start, stop, dtype=np.int64))}


class NpySource(Source):
    """A ``.npy`` array, memory-mapped from a file or streamed from stdin.

    Pages of the map that have been embedded are released from the resident
    set as the batches go (they stay in the page cache), so the process's
    memory does not grow with the file.
    """

    kind = "npy"

    def __init__(self, name: str, handle=None):
        self.name, self.handle = name, handle
        self.fields = [pa.field(io.ID_COLUMN, pa.int64())]
        self.mapped = self.array = None
        self.released = 0
        if handle is None:
            self.mapped, self.array, self.offset = _map_npy(name)
            shape, dtype = self.array.shape, self.array.dtype
        else:
            shape, dtype, fortran = _npy_header(handle, name)
            if fortran and len(shape) > 1:
                raise DataError(f"{io.describe(name)}: a Fortran-ordered .npy "
                                "cannot be streamed; save it C-ordered or pass "
                                "a file")
            _check_npy(shape, dtype, name)
        self.shape, self.dtype = shape, dtype
        self.n_rows = shape[0]

    def batches(self, batch_size: int) -> Iterator[RawBatch]:
        for start in range(0, self.n_rows, batch_size):
            stop = min(start + batch_size, self.n_rows)
            if self.array is not None:
                values = np.ascontiguousarray(self.array[start:stop])
            else:
                values = self._read_rows(stop - start)
            yield RawBatch(values, _row_ids(start, stop), start)
            self._release(stop)

    def _read_rows(self, n_rows: int) -> np.ndarray:
        row_shape = self.shape[1:]
        size = n_rows * math.prod(row_shape) * self.dtype.itemsize
        data = self.handle.read(size)
        if len(data) != size:
            raise DataError(f"{io.describe(self.name)}: the .npy data ends "
                            "before the rows its header announces")
        return np.frombuffer(data, self.dtype).reshape(n_rows, *row_shape)

    def _release(self, stop: int) -> None:
        """Drop the mapped pages of rows before ``stop`` from the resident set."""
        if self.mapped is None or not self.array.flags.c_contiguous:
            return
        if not hasattr(self.mapped, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        end = self.offset + stop * self.array[0].nbytes
        end -= end % mmap.PAGESIZE
        # In steps of RELEASE_BYTES (and at the end): each madvise call makes
        # the kernel flush the TLBs of onnxruntime's threads.
        due = end - self.released >= RELEASE_BYTES or stop == self.n_rows
        if due and end > self.released:
            self.mapped.madvise(mmap.MADV_DONTNEED, self.released,
                                end - self.released)
            self.released = end


def _map_npy(path: str):
    """``(mmap, array view, data offset)`` of a .npy file, read-only."""
    with open(path, "rb") as handle:
        if handle.read(6) != io.NPY_MAGIC:
            raise DataError(f"{path}: not a .npy file")
        shape, dtype, fortran = _npy_header(handle, path)
        _check_npy(shape, dtype, path)
        offset = handle.tell()
        needed = offset + math.prod(shape) * dtype.itemsize
        if os.fstat(handle.fileno()).st_size < needed:
            raise DataError(f"{path}: the file is shorter than the array its "
                            "header announces (truncated?)")
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    array = np.ndarray(shape, dtype, buffer=mapped, offset=offset,
                       order="F" if fortran else "C")
    return mapped, array, offset


def _npy_header(handle, name: str):
    """``(shape, dtype, fortran)`` of a .npy whose 6 magic bytes were read."""
    from numpy.lib import format as npy

    try:
        major, minor = handle.read(2)
        if major == 1:
            shape, fortran, dtype = npy.read_array_header_1_0(handle)
        elif major == 2:
            shape, fortran, dtype = npy.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy version {major}.{minor}")
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"{io.describe(name)}: not a readable .npy file "
                        f"({_short(error)})")
    return shape, dtype, fortran


def _check_npy(shape, dtype: np.dtype, name: str) -> None:
    if dtype.names is not None or dtype.kind not in "biuf":
        raise DataError(f"{io.describe(name)}: the array holds {dtype}, expected "
                        "numbers")
    if len(shape) < 2:
        raise DataError(f"{io.describe(name)}: a {len(shape)}-D array; expected "
                        "one row per sample (at least 2-D)")
    if shape[0] == 0:
        raise DataError(f"{io.describe(name)}: the array has no rows")


def check_column_roles(tensor_column: str | None, id_column: str | None,
                       label_column: str | None, present=None) -> None:
    """Refuse one column in two roles, the defaults counted.

    The input's ``id`` column is always carried as the id, so it cannot be the
    label; nor can the column named with --id-column be the label (by default
    ``label``). These two are checked only once the input's columns
    (``present``) are known, and only for a column it has: a missing one gets
    the missing-column message instead.
    """
    named = [("--tensor-column", tensor_column), ("--id-column", id_column),
             ("--label-column", label_column)]
    for i, (option, column) in enumerate(named):
        for other, same in named[i + 1:]:
            if column is not None and column == same:
                raise UsageError(f"{option} {column} and {other} {same} name "
                                 "the same column; each role needs its own")
    if present is None:
        return
    label = label_column or io.DEFAULT_LABEL
    if label == io.ID_COLUMN and label in present:
        raise UsageError(f"--label-column {label}: '{label}' cannot be both the "
                         "id and the label (an input's id column is always "
                         "carried as the id); carry another column as the label")
    if id_column == label and label in present:
        raise UsageError(f"--id-column {id_column}: '{label}' cannot be both the "
                         "id and the label (it is the default label column); "
                         "carry another column as the id, or name the label "
                         "with --label-column")


class ParquetSource(Source):
    """A Parquet file read in record batches: a tensor column and carried ones."""

    kind = "parquet"

    def __init__(self, name: str, source, *, tensor_column: str | None,
                 id_column: str | None, label_column: str | None):
        self.name = name
        self._width: tuple[int, int] | None = None  # (width, row): batch one
        try:
            self.file = pq.ParquetFile(source)
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as error:
            raise DataError(f"{io.describe(name)}: not a readable Parquet file "
                            f"({_short(error)})")
        schema = self.file.schema_arrow
        io.refuse_duplicate_columns(schema, name)
        self.metadata = schema.metadata
        self.n_rows = self.file.metadata.num_rows
        self.tensor = self._tensor_column(schema, tensor_column)
        self.carry = self._carried(schema, id_column, label_column)
        self.fields = [schema.field(c) for c in self.carry]
        if io.ID_COLUMN not in self.carry:
            self.fields.insert(0, pa.field(io.ID_COLUMN, pa.int64()))
        if self.n_rows == 0:
            raise DataError(f"{io.describe(name)}: the file has no rows")

    def describe(self) -> str:
        return f"{io.describe(self.name)} (Parquet, tensor column '{self.tensor}')"

    def _tensor_column(self, schema: pa.Schema, column: str | None) -> str:
        names = schema.names
        if column is not None:
            if column not in names:
                raise DataError(self._missing(schema, column, "tensor")
                                + "; name it with --tensor-column")
            return column
        for candidate in TENSOR_COLUMNS:
            if candidate in names:
                return candidate
        raise DataError(self._missing(schema, TENSOR_COLUMNS[0], "tensor")
                        + f" nor '{TENSOR_COLUMNS[1]}'; name it with "
                        "--tensor-column")

    def _carried(self, schema, id_column, label_column) -> list[str]:
        """Carried columns: the input's ``id`` (always, when present), the
        --id-column one and the label. Named ones must exist, default ones
        may be absent."""
        check_column_roles(None, id_column, label_column, schema.names)
        carry = []
        for column, default, role in ((None, io.ID_COLUMN, "id"),
                                      (id_column, None, "id"),
                                      (label_column, io.DEFAULT_LABEL, "label")):
            self._refuse_tensor(column, role)
            wanted = column or default
            if wanted is None or wanted in carry:
                continue
            if wanted in schema.names and wanted != self.tensor:
                carry.append(wanted)
            elif column is not None:
                raise DataError(self._missing(schema, column, role)
                                + f" (given with --{role}-column)")
        return carry

    def _refuse_tensor(self, column: str | None, role: str) -> None:
        if column is not None and column == self.tensor:
            raise UsageError(f"--{role}-column {column}: '{column}' is the "
                             f"tensor column of {io.describe(self.name)}, "
                             "fed to the model; carry another column as "
                             f"the {role}, or pick the tensor column with "
                             "--tensor-column")

    def _missing(self, schema: pa.Schema, column: str, role: str) -> str:
        empty = pa.Table.from_batches([], schema=schema)
        return io.missing_column_message(empty, column, self.name, role)

    def batches(self, batch_size: int) -> Iterator[RawBatch]:
        start = 0
        columns = [self.tensor] + self.carry
        try:
            for batch in self.file.iter_batches(batch_size=batch_size,
                                                columns=columns):
                yield self._batch(batch, start)
                start += batch.num_rows
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as error:
            raise DataError(f"{io.describe(self.name)}: cannot read rows from "
                            f"{start} on ({_short(error)})")

    def _batch(self, batch: pa.RecordBatch, start: int) -> RawBatch:
        column = pa.chunked_array([batch.column(self.tensor)])
        # The first batch's width is the one every later batch must have.
        values = io.list_column_matrix(column, self.name, self.tensor,
                                       first_row=start, expected=self._width)
        if self._width is None and len(values):
            self._width = (values.shape[1], start)
        if not (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
            raise DataError(f"{io.describe(self.name)}: column '{self.tensor}' "
                            f"holds {values.dtype}, expected numbers")
        carried = {c: batch.column(c) for c in self.carry}
        if io.ID_COLUMN not in carried:
            carried = {**_row_ids(start, start + batch.num_rows), **carried}
        return RawBatch(values, carried, start)


@dataclass
class ImageOptions:
    """How images become tensors: size (H, W) and per-channel mean and std.

    Pixels are scaled to [0, 1], then ``(x - mean) / std`` per channel. A model
    with an integer input gets the raw 0-255 values instead.
    """

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    skip_bad: bool = False


def parse_floats(text: str | None, option: str, default: tuple[float, ...],
                 positive: bool = False) -> tuple[float, ...]:
    """``"0.5,0.5,0.5"`` as floats (one value, or one per channel)."""
    if text is None:
        return default
    try:
        values = tuple(float(p) for p in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{option} {text}: expected numbers such as 0.5 or "
                         "0.485,0.456,0.406")
    if positive and min(values) <= 0:
        raise UsageError(f"{option} {text}: every value must be above 0")
    return values


class ImageFolderSource(Source):
    """A folder with one sub-folder of PNG/JPEG images per class."""

    kind = "image folder"

    def __init__(self, folder: str, layout: "ImageLayout", options: ImageOptions):
        self.name, self.layout, self.options = folder, layout, options
        self.files = _image_files(folder)
        self.n_rows = len(self.files)
        self.fields = [pa.field(io.ID_COLUMN, pa.int64()),
                       pa.field(io.DEFAULT_LABEL, pa.string()),
                       pa.field("path", pa.string())]
        self.skipped = []
        self.mean = _per_channel(options.mean, layout.channels, "--mean")
        self.std = _per_channel(options.std, layout.channels, "--std")

    def batches(self, batch_size: int) -> Iterator[RawBatch]:
        for start in range(0, self.n_rows, batch_size):
            chosen = self.files[start:start + batch_size]
            decoded = [(i, f, self._decode(f)) for i, f in enumerate(chosen, start)]
            good = [(i, f, x) for i, f, x in decoded if x is not None]
            if not good:
                continue
            values = np.stack([x for _, _, x in good])
            carried = {
                io.ID_COLUMN: pa.array([i for i, _, _ in good], pa.int64()),
                io.DEFAULT_LABEL: pa.array([f.parent.name for _, f, _ in good]),
                "path": pa.array([str(f.relative_to(self.name)) for _, f, _ in good]),
            }
            yield RawBatch(values, carried, start)

    def _decode(self, path: Path) -> np.ndarray | None:
        from PIL import Image, UnidentifiedImageError

        layout = self.layout
        try:
            with Image.open(path) as image:
                image = image.convert("L" if layout.channels == 1 else "RGB")
                if image.size != (layout.width, layout.height):
                    image = image.resize((layout.width, layout.height),
                                         Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            if self.options.skip_bad:
                self.skipped.append(str(path))
                return None
            raise DataError(f"{path}: cannot decode the image ({_short(error)}); "
                            "use --skip-bad-images to skip such files")
        return layout.arrange(self._normalise(pixels))

    def _normalise(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W) or (H, W, C) pixels 0-255 -> (H, W, C) model values."""
        pixels = pixels.reshape(pixels.shape[0], pixels.shape[1], -1)
        if self.layout.integer:
            return pixels
        return (pixels / 255.0 - self.mean) / self.std


def _per_channel(values: tuple[float, ...], channels: int, option: str
                 ) -> np.ndarray:
    if len(values) not in (1, channels):
        raise UsageError(f"{option}: give one value or {channels} (one per "
                         f"channel), not {len(values)}")
    return np.broadcast_to(np.asarray(values, np.float32), (channels,)).copy()


def _image_files(folder: str) -> list[Path]:
    """Image files in class sub-folders, sorted by class then name."""
    loose, classes = _scan(Path(folder))
    by_class = {c: _scan(c) for c in classes}
    files = [f for images, _ in by_class.values() for f in images]
    if files:
        _refuse_odd_classes(folder, by_class)
    if files and loose:
        raise DataError(f"{folder}: {len(loose)} image(s) lie directly in the "
                        f"folder beside its class sub-folders (first: "
                        f"{loose[0].name}); images must sit in class "
                        "sub-folders (the folder name is the label)")
    if files:
        return files
    if loose:
        raise DataError(f"{folder}: images lie directly in the folder; put them "
                        "in one sub-folder per class (the folder name is the "
                        "label)")
    raise DataError(f"{folder}: no PNG or JPEG images in its sub-folders "
                    "(expected one sub-folder of images per class)")


def _scan(folder: Path) -> tuple[list[Path], list[Path]]:
    """``(images, sub-folders)`` directly in ``folder``, sorted; hidden
    folders left out. One directory read, no extra call per file."""
    images, folders = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                if not entry.name.startswith("."):
                    folders.append(Path(entry.path))
            elif entry.is_file() and _has_image_suffix(entry.name):
                images.append(Path(entry.path))
    return sorted(images), sorted(folders)


def _refuse_odd_classes(folder: str, by_class: dict) -> None:
    """A class sub-folder without images of its own would drop out silently
    (its images one level deeper, or a stray folder beside the classes), and
    so would images in a folder inside a class's folder."""
    deeper = {c: [d for d in inner if _scan(d)[0]]
              for c, (_, inner) in by_class.items() if inner}
    for name, (images, _) in by_class.items():
        if images and deeper.get(name):
            raise DataError(f"{folder}: the class sub-folder {name.name}/ has "
                            f"images in its folder {deeper[name][0].name}/ too; "
                            "images must sit directly in their class's folder")
    empty = [c for c, (images, _) in by_class.items() if not images]
    if not empty:
        return
    inner = by_class[empty[0]][1]
    where = (f"; its images must sit in it directly, not in {inner[0].name}/"
             if inner else "; remove it or add its images")
    more = f" ({len(empty) - 1} more sub-folder(s) alike)" if len(empty) > 1 else ""
    raise DataError(f"{folder}: the class sub-folder {empty[0].name}/ holds no "
                    f"PNG or JPEG image{where}{more}")


def _has_image_suffix(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


@dataclass
class ImageLayout:
    """Where the channels go in the model's input row, and its size."""

    channels: int
    height: int
    width: int
    channels_first: bool
    integer: bool

    def arrange(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W, C) values -> the model's row layout."""
        return np.moveaxis(pixels, -1, 0) if self.channels_first else pixels


def image_layout(backbone: Backbone, size: tuple[int, int] | None) -> ImageLayout:
    """Read channels and size from a (C, H, W) or (H, W, C) model input."""
    shape = backbone.row_shape
    integer = np.issubdtype(backbone.dtype, np.integer)
    if len(shape) == 3 and shape[0] in (1, 3):
        layout = ImageLayout(shape[0], shape[1], shape[2], True, integer)
    elif len(shape) == 3 and shape[2] in (1, 3):
        layout = ImageLayout(shape[2], shape[0], shape[1], False, integer)
    elif len(shape) == 2:
        layout = ImageLayout(1, shape[0], shape[1], True, integer)
    else:
        raise DataError(f"{backbone.path}: input '{backbone.input_name}' rows "
                        f"are {_dims(shape)}; images need C,H,W or H,W,C with 1 "
                        "or 3 channels (see --input-shape)")
    if size is not None and size != (layout.height, layout.width):
        raise UsageError(f"--image-size {size[0]}x{size[1]}: the model's input "
                         f"'{backbone.input_name}' is {layout.height}x"
                         f"{layout.width}; give its open sizes with "
                         "--input-shape instead")
    if len(shape) == 2:
        layout.channels_first = False
    return layout


def open_input(path: str, backbone: Backbone, *, tensor_column: str | None = None,
               id_column: str | None = None, label_column: str | None = None,
               images: ImageOptions | None = None) -> Source:
    """The right :class:`Source` for a ``.npy``, a Parquet file, a folder or ``-``."""
    kind = input_kind(path)
    if kind == STDIN:
        return _stdin_source(tensor_column, id_column, label_column)
    if kind == ImageFolderSource.kind:
        layout = image_layout(backbone, (images or ImageOptions()).size)
        return ImageFolderSource(path, layout, images or ImageOptions())
    if kind == NpySource.kind:
        return NpySource(path)
    return ParquetSource(path, path, tensor_column=tensor_column,
                         id_column=id_column, label_column=label_column)


def input_kind(path: str) -> str:
    """``"npy"``, ``"parquet"`` or ``"image folder"`` from the path and the
    file's first bytes; ``"stdin"`` for ``-``, which is read only when opened.
    """
    if path == io.STDIO:
        return STDIN
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        return ImageFolderSource.kind
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty")
    kind = io.data_kind(path)
    if kind == "npy":
        return NpySource.kind
    if kind == "parquet":
        return ParquetSource.kind
    raise DataError(f"{path}: neither a .npy nor a Parquet file (nor a folder "
                    "of images)")


def check_options_apply(kind: str, given: dict[str, object]) -> None:
    """Refuse options that would do nothing with this kind of input.

    ``given`` maps option names (``--mean``) to their values, None when not
    given. For stdin (``kind`` "stdin") only the image options can be judged.
    """
    for option, value in given.items():
        if value is None or value is False:
            continue
        if option in IMAGE_OPTIONS and kind != ImageFolderSource.kind:
            raise UsageError(f"{option}: applies to a folder of images only, "
                             f"and the input is {_kind_text(kind)}")
        if option in COLUMN_OPTIONS and kind in (NpySource.kind,
                                                 ImageFolderSource.kind):
            raise UsageError(f"{option} {value}: applies to Parquet input only;"
                             f" {_kind_text(kind)} has no columns "
                             + COLUMNS_INSTEAD[kind])


def _kind_text(kind: str) -> str:
    return {NpySource.kind: "a .npy array", ParquetSource.kind: "a Parquet file",
            ImageFolderSource.kind: "a folder of images",
            STDIN: "stdin"}[kind]


def _stdin_source(tensor_column, id_column, label_column) -> Source:
    stream = sys.stdin.buffer
    head = stream.read(6)
    if head == io.NPY_MAGIC:
        return NpySource(io.STDIO, stream)
    if head.startswith(io.PARQUET_MAGIC[:4]):
        data = head + stream.read()
        return ParquetSource(io.STDIO, pa.BufferReader(data),
                             tensor_column=tensor_column, id_column=id_column,
                             label_column=label_column)
    if not head:
        raise DataError("stdin: no data on standard input")
    raise DataError("stdin: neither .npy nor Parquet data on standard input")


# ---------------------------------------------------------------------------
# Embedding


@dataclass
class FeatureBatch:
    """features : float32 ndarray (n_samples, n_features); carried columns."""

    features: np.ndarray
    carried: dict[str, pa.Array]


def embed(backbone: Backbone, source: Source, *, batch_size: int = DEFAULT_BATCH,
          progress=None) -> Iterator[FeatureBatch]:
    """Run the backbone over every row of ``source``, one batch at a time.

    Raises :class:`DataError` when a row cannot become the model's input (its
    number of values, a non-integral value for an integer input, NaN), or
    when the backbone gives a NaN or infinite feature.
    """
    check_batch_size(batch_size)
    fixed = backbone.fixed_batch
    if fixed is not None and fixed > 1 and (source.n_rows or 0) % fixed:
        raise DataError(f"{backbone.path}: the model's batch dimension is fixed "
                        f"at {fixed}, which does not divide the {source.n_rows} "
                        "rows; export it with a dynamic batch dimension")
    if fixed is not None:
        batch_size = fixed
    task = (progress or NullProgress()).task("embed", source.n_rows)
    try:
        parts = _model_inputs(backbone, source, batch_size)
        done = 0
        for batch in run_in_order(backbone, parts):
            _check_features(batch.features, done, backbone)
            yield batch
            done += len(batch.features)
            task.advance(len(batch.features))
    finally:
        task.close()


def _check_features(features: np.ndarray, first_row: int, backbone: Backbone
                    ) -> None:
    """Refuse NaN or infinite features (a weigh of them would fail later)."""
    if np.isfinite(features).all():
        return
    row, column = np.argwhere(~np.isfinite(features))[0]
    raise DataError(f"{backbone.path}: the backbone gave a non-finite feature "
                    f"({features[row, column]}) at row {first_row + row}, "
                    f"feature {column} of {backbone.tensor}")


def _model_inputs(backbone: Backbone, source: Source, batch_size: int
                  ) -> Iterator[tuple[np.ndarray, dict[str, pa.Array]]]:
    """``(model input, carried columns)`` of each batch the model will run."""
    for raw in source.batches(batch_size):
        X = model_input(raw, backbone, source)
        for part, row in _fixed_batches(X, backbone.fixed_batch):
            yield part, _slice(raw.carried, row)


def run_in_order(backbone: Backbone, parts) -> Iterator[FeatureBatch]:
    """Features of each ``(X, carried)`` part, in order, ``in_flight`` at a time.

    onnxruntime releases the GIL while it runs, so the batches in flight run
    on their own cores while this thread prepares the next input. Inputs are
    checked here, in order, so the first bad row is still the one reported.
    """
    if backbone.in_flight == 1:
        for X, carried in parts:
            yield FeatureBatch(backbone.run(X), carried)
        return

    from concurrent.futures import ThreadPoolExecutor

    pending: deque = deque()
    with ThreadPoolExecutor(backbone.in_flight,
                            thread_name_prefix="vbsw-embed") as pool:
        try:
            for X, carried in parts:
                pending.append((pool.submit(backbone.run, X), carried))
                if len(pending) > backbone.in_flight:
                    yield _done(pending.popleft())
            while pending:
                yield _done(pending.popleft())
        finally:  # an error or an early stop: drop what has not started
            for future, _ in pending:
                future.cancel()


def _done(item) -> FeatureBatch:
    future, carried = item
    return FeatureBatch(future.result(), carried)


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")


def _fixed_batches(X: np.ndarray, fixed: int | None):
    """The whole batch, or slices of a model's fixed batch size."""
    if fixed is None or len(X) == fixed:
        yield X, None
        return
    if fixed != 1:  # a skipped image left a short batch
        raise DataError(f"the model's batch dimension is fixed at {fixed}; "
                        "export it with a dynamic batch dimension")
    for row in range(len(X)):
        yield X[row:row + 1], row


def _slice(carried: dict[str, pa.Array], row: int | None) -> dict[str, pa.Array]:
    if row is None:
        return carried
    return {name: values.slice(row, 1) for name, values in carried.items()}


def model_input(raw: RawBatch, backbone: Backbone, source: Source) -> np.ndarray:
    """Reshape and cast a batch to the model's input, or say why it cannot be."""
    values, name = raw.values, io.describe(source.name)
    n_values = math.prod(values.shape[1:])
    if n_values != backbone.n_values:
        raise DataError(f"{name}: rows have {_size(values.shape[1:])}; the "
                        f"model's input '{backbone.input_name}' takes "
                        f"{_size(backbone.row_shape)}; see --input-shape")
    X = values.reshape(len(values), *backbone.row_shape)
    if X.dtype.kind == "f":
        _check_finite(X, name, raw.first_row)
    target = backbone.dtype
    if np.can_cast(X.dtype, target, casting="safe"):
        return np.ascontiguousarray(X, dtype=target)

    where = f"{name}: the model's input '{backbone.input_name}' is {target}"
    if target.kind in "iu":
        _check_integers(X, target, where, raw.first_row)
    with np.errstate(over="ignore"):
        cast = np.ascontiguousarray(X, dtype=target)
    if target.kind == "f":  # a wider float or a large integer became inf
        fits = np.isfinite(cast)
        if not fits.all():
            largest = np.finfo(target).max
            raise DataError(f"{where} (magnitudes up to {largest:g}); the rows "
                            "hold values that do not fit"
                            + _first_bad(X, fits, raw.first_row))
    return cast


def _size(shape: Sequence[int]) -> str:
    """``64 values (1x8x8)``; the shape only when it has several dimensions."""
    text = f"{math.prod(shape)} values"
    return text + (f" ({'x'.join(map(str, shape))})" if len(shape) > 1 else "")


def _check_integers(X: np.ndarray, target: np.dtype, where: str,
                    first_row: int) -> None:
    """Refuse values an integer cast would wrap around or truncate.

    Fractional values are refused rather than rounded: a float file fed to an
    integer input is more likely the wrong file (or unscaled pixels) than
    values meant to be rounded.
    """
    info = np.iinfo(target)
    lo, hi = _bounds(X.dtype, target)
    fits = (X >= lo) & (X <= hi)
    if not fits.all():
        raise DataError(f"{where} ({info.min} to {info.max}); the rows hold "
                        "values that do not fit" + _first_bad(X, fits, first_row))
    if X.dtype.kind == "f":
        whole = X == np.round(X)
        if not whole.all():
            raise DataError(f"{where}; the rows hold fractional values, which "
                            "it would truncate (round them first)"
                            + _first_bad(X, whole, first_row))


def _bounds(source: np.dtype, target: np.dtype):
    """The target's integer range, as values of the source's dtype (exact)."""
    info = np.iinfo(target)
    if source.kind in "iu":
        own = np.iinfo(source)
        return (source.type(max(info.min, own.min)),
                source.type(min(info.max, own.max)))
    own = np.finfo(source)
    with np.errstate(over="ignore"):
        lo, hi = source.type(info.min), source.type(info.max)
    lo, hi = max(lo, -own.max), min(hi, own.max)
    if int(hi) > info.max:  # int64's maximum rounds up to 2**63 as a float
        hi = np.nextafter(hi, source.type(0))
    return lo, hi


def _first_bad(X: np.ndarray, good: np.ndarray, first_row: int) -> str:
    flat = good.reshape(-1)
    position = int(np.argmin(flat))
    row = first_row + position // max(1, flat.size // len(X))
    value = X.reshape(-1)[position]
    return f" (first: row {row}, value {value.item()!r})"


def _check_finite(X: np.ndarray, name: str, first_row: int) -> None:
    finite = np.isfinite(X).reshape(len(X), -1).all(axis=1)
    if not finite.all():
        row = first_row + int(np.argmin(finite))
        raise DataError(f"{name}: NaN or infinite values in the input (first: "
                        f"row {row})")


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


__all__ = ["Backbone", "FeatureBatch", "ImageOptions", "Source",
           "check_column_roles", "check_options_apply", "embed", "input_kind",
           "load_backbone", "open_input", "parse_floats", "parse_shape"]
