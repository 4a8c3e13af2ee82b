"""``vbsw embed``: feature vectors of every input row from an ONNX backbone."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Annotated, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import typer

from vbsw_cli import io
from vbsw_cli.cli._common import (DebugOpt, QuietOpt, Reporter, VerboseOpt,
                                  command, keyword, resolve_output)
from vbsw_cli.embed import (DEFAULT_BATCH, DEVICES, ImageOptions,
                            check_batch_size,
                            check_column_roles, check_device,
                            check_options_apply, embed,
                            input_kind, load_backbone, open_input, parse_floats,
                            parse_shape)
from vbsw_cli.errors import DataError, UsageError

EXAMPLE = ("vbsw embed sample_data/digits_backbone.onnx "
           "sample_data/digits_train.parquet -o features.parquet")
FEATURES = io.DEFAULT_FEATURES
# Rows are written in row groups of about this many bytes of features (at least
# one batch), so memory stays flat and readers do not meet tiny row groups.
GROUP_BYTES = 8 * 2**20
# Output to stdout held back until it passes this much (see _RefusableStream).
HOLD_BYTES = 64 * 2**20
MAX_GROUP_ROWS = 65536
PARQUET_SUFFIXES = (".parquet", ".pq")
# Parquet codecs for --compression. None is the default: features are dense
# floats, which snappy shrinks by a third at most (ReLU zeros) while it costs
# about as much time per row as the whole inference of a small backbone.
COMPRESSIONS = ("none", "snappy", "zstd", "lz4", "gzip")
DEFAULT_COMPRESSION = "none"

OutputOpt = Annotated[Optional[str], typer.Option(
    "--output", "-o", metavar="PATH",
    help="Output Parquet file, or - for stdout. Default: stdout when it is a "
         "pipe, else <input name>.features.parquet.")]


@command("embed", EXAMPLE)
def embed_cli(
    model: Annotated[str, typer.Argument(
        metavar="MODEL.onnx", help="The trained network, exported to ONNX.")],
    source: Annotated[Optional[str], typer.Argument(
        metavar="INPUT", help=".npy array, Parquet file with a tensor column, "
        "folder of images (one sub-folder per class), or - for stdin.")] = None,
    output: OutputOpt = None,
    layer: Annotated[str, typer.Option(
        "--layer", metavar="auto|output|NAME", help="auto: the input of the last "
        "linear layer (the paper's M*); output: the model's output as it is; or "
        "any tensor name from --list-layers.")] = "auto",
    list_layers: Annotated[bool, typer.Option(
        "--list-layers", help="Print the tensors one can cut at, with their "
        "shapes, on stdout, and stop.")] = False,
    device: Annotated[str, typer.Option(
        "--device", metavar="auto|cuda|cpu", help="auto: CUDA when onnxruntime "
        "really gets it, else the CPU; cuda: fail when CUDA is unusable.")
    ] = "auto",
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Rows per onnxruntime call.")] = DEFAULT_BATCH,
    tensor_column: Annotated[Optional[str], typer.Option(
        "--tensor-column", metavar="COLUMN", help="Parquet column of the input "
        "tensors (a list of numbers per row). Default: image, else features.")
    ] = None,
    id_column: Annotated[Optional[str], typer.Option(
        "--id-column", metavar="COLUMN", help="A further id column, carried "
        "under its own name. The input's id column is always carried unchanged "
        "when present; only without one does the row number become id.")
    ] = None,
    label_column: Annotated[Optional[str], typer.Option(
        "--label-column", "--label", metavar="COLUMN", help="Column carried as "
        "the label (default: label when present).")] = None,
    input_shape: Annotated[Optional[str], typer.Option(
        "--input-shape", metavar="D1,D2,...", help="The input sizes after the "
        "batch dimension, for a model that leaves some open (e.g. 3,224,224).")
    ] = None,
    image_size: Annotated[Optional[str], typer.Option(
        "--image-size", metavar="HxW", help="Images are resized to the model's "
        "input size; this only checks it (use --input-shape for open sizes).")
    ] = None,
    mean: Annotated[Optional[str], typer.Option(
        "--mean", metavar="M[,M,M]", help="Per-channel mean subtracted from "
        "pixels scaled to [0, 1].")] = None,
    std: Annotated[Optional[str], typer.Option(
        "--std", metavar="S[,S,S]", help="Per-channel std the pixels are "
        "divided by, after the mean.")] = None,
    skip_bad_images: Annotated[bool, typer.Option(
        "--skip-bad-images", help="Skip images that fail to decode (and count "
        "them) instead of stopping.")] = False,
    compression: Annotated[str, typer.Option(
        "--compression", metavar="|".join(COMPRESSIONS), help="Parquet codec of "
        "the output. none is fastest; snappy or zstd make files of ReLU "
        "features about a third smaller, at some speed.")
    ] = DEFAULT_COMPRESSION,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Turn every input row into the backbone's feature vector.

    Cuts the network before its last linear layer (--layer auto) and writes
    Parquet with the id and label columns and a features column (float32
    list), ready for vbsw weigh.
    """
    reporter = Reporter(verbose=verbose, quiet=quiet)
    device = keyword(device, DEVICES)
    check_device(device)
    check_batch_size(batch_size)
    compression = check_compression(compression)
    shape = parse_shape(input_shape, "--input-shape")
    images = ImageOptions(size=_image_size(image_size),
                          mean=parse_floats(mean, "--mean", (0.0,)),
                          std=parse_floats(std, "--std", (1.0,), positive=True),
                          skip_bad=skip_bad_images)
    if list_layers:
        _refuse_with_list_layers(source=source, output=output)
        _list_layers(model, layer)
        return
    if source is None:
        raise UsageError("missing INPUT: give a .npy, Parquet file, image "
                         "folder or - (or use --list-layers)")
    _refuse_swapped(model, source)
    check_column_roles(tensor_column, id_column, label_column)
    destination = resolve_output(output, source, ".features.parquet")
    _check_destination(destination)
    io.refuse_overwrite(destination, "-o", [source, model])
    given = {"--image-size": image_size, "--mean": mean, "--std": std,
             "--skip-bad-images": skip_bad_images,
             "--tensor-column": tensor_column, "--id-column": id_column,
             "--label-column": label_column}
    check_options_apply(input_kind(source), given)

    backbone = load_backbone(model, layer=layer, device=device, input_shape=shape,
                             quiet_runtime=not debug)
    data = open_input(source, backbone, tensor_column=tensor_column,
                      id_column=id_column, label_column=label_column,
                      images=images)
    check_options_apply(data.kind, given)  # stdin's kind is known only now

    parameters = _parameters(model, source, layer, device, batch_size, backbone,
                             data, images)
    parameters["compression"] = compression
    started = time.perf_counter()
    batches = embed(backbone, data, batch_size=batch_size,
                    progress=reporter)
    # The report waits for the first embedded batch, so that a run failing on
    # its input (shape, dtype, NaN, ragged rows) prints its error line alone.
    batches = _after_first(batches, lambda: _report(reporter, backbone, layer,
                                                    data, batch_size))
    n_rows, n_features = write_features(batches, data, destination, parameters,
                                        inputs=[model, source],
                                        compression=compression)
    _summary(reporter, n_rows, n_features, time.perf_counter() - started, data,
             destination)


# ---------------------------------------------------------------------------
# Options and messages


def _image_size(text: str | None) -> tuple[int, int] | None:
    size = parse_shape(text, "--image-size")
    if size is None:
        return None
    if len(size) > 2:
        raise UsageError(f"--image-size {text}: give HxW or one size")
    return (size[0], size[-1])


def _check_destination(destination: str) -> None:
    """A writable Parquet path, stdout or the null device (embed writes no
    .npy)."""
    io.check_output_path(destination, "-o")
    suffix = Path(destination).suffix.lower()
    if suffix not in PARQUET_SUFFIXES and not (
            destination == io.STDIO or io.is_devnull(destination)):
        raise UsageError(f"-o {destination}: vbsw embed writes Parquet; give a "
                         ".parquet file name, or - for stdout")


def _refuse_swapped(model: str, source: str) -> None:
    """An ONNX file given as INPUT: swapped with MODEL, or given twice."""
    if source.lower().endswith(".onnx"):
        where = "the model comes first" if not model.lower().endswith(".onnx") \
            else "INPUT is the data to embed"
        raise UsageError(f"INPUT {source} is an ONNX model: {where} (vbsw "
                         "embed MODEL.onnx INPUT)")


def _refuse_with_list_layers(**given) -> None:
    """--list-layers only reads the model: an INPUT or -o would be ignored."""
    names = {"source": "INPUT", "output": "-o"}
    extra = [names[key] for key, value in given.items() if value is not None]
    if extra:
        raise UsageError(f"--list-layers reads only MODEL.onnx and prints on "
                         f"stdout; drop {' and '.join(extra)}")


def _list_layers(model_path: str, layer: str) -> None:
    """Print ``tensor  op  shape`` lines on stdout, marking the cut of --layer."""
    from vbsw_cli import onnx_graph

    model = onnx_graph.load_model(model_path)
    try:
        chosen = onnx_graph.find_cut(model, layer)
    except DataError:
        chosen = None
    rows = [(name, op, _shape_text(shape))
            for name, op, shape in onnx_graph.list_layers(model)]
    width = max(len(name) for name, _, _ in rows)
    op_width = max(len(op) for _, op, _ in rows)
    lines = [f"{name:<{width}}  {op:<{op_width}}  {dims}"
             + (f"  <- --layer {layer}" if name == chosen else "")
             for name, op, dims in rows]
    io.write_stdout(("\n".join(lines) + "\n").encode())


def _shape_text(shape) -> str:
    if shape is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _after_first(batches, announce):
    """The batches, calling ``announce()`` once the first has been embedded."""
    announced = False
    for batch in batches:
        if not announced:
            announce()
            announced = True
        yield batch


def _notice_fixed_batch(reporter: Reporter, backbone, batch_size: int) -> None:
    """A fixed batch dimension overrides --batch-size: say so when one was set."""
    fixed = backbone.fixed_batch
    if fixed is not None and batch_size not in (DEFAULT_BATCH, fixed):
        rows = "row" if fixed == 1 else "rows"
        reporter.notice(f"the model's batch dimension is fixed at {fixed}: "
                        f"batches of {fixed} {rows}, not --batch-size {batch_size}")


def _report(reporter: Reporter, backbone, layer: str, data, batch_size: int
            ) -> None:
    _report_model(reporter, backbone, layer)
    _notice_fixed_batch(reporter, backbone, batch_size)
    reporter.say(f"input: {data.describe()}, {data.n_rows} rows")


def _report_model(reporter: Reporter, backbone, layer: str) -> None:
    shape = "x".join(str(d) for d in backbone.row_shape)
    batch = backbone.fixed_batch or "N"
    reporter.say(f"model: {backbone.path}, input '{backbone.input_name}' "
                 f"{backbone.dtype} {batch}x{shape}")
    how = {"auto": "the input of the last linear layer",
           "output": "the model's output"}.get(backbone.layer,
                                               "named with --layer")
    reporter.say(f"features: tensor '{backbone.tensor}' ({how})")
    device = backbone.provider.replace("ExecutionProvider", "")
    if backbone.threads:
        plural = "s" if backbone.threads > 1 else ""
        device += (f", {backbone.in_flight} batches at a time on "
                   f"{backbone.threads} thread{plural} each")
    reporter.say(f"device: {device}")
    for notice in backbone.notices:
        reporter.notice(notice)


def _parameters(model, source, layer, device, batch_size, backbone, data,
                images) -> dict:
    parameters = {
        "model": model, "model_sha256": io.sha256_of(model), "input": source,
        "input_kind": data.kind, "layer": backbone.layer,
        "tensor": backbone.tensor,
        "model_input": backbone.input_name,
        "input_shape": list(backbone.row_shape), "dtype": str(backbone.dtype),
        "device": device, "provider": backbone.provider,
        "batch_size": batch_size,
        "columns": [f.name for f in data.fields],
    }
    if getattr(data, "tensor", None):
        parameters["tensor_column"] = data.tensor
    if data.kind == "image folder":
        parameters["images"] = {"size": [data.layout.height, data.layout.width],
                                "channels": data.layout.channels,
                                "mean": list(images.mean), "std": list(images.std),
                                "skip_bad_images": images.skip_bad}
    return parameters


def _summary(reporter, n_rows, n_features, seconds, data, destination) -> None:
    rate = n_rows / seconds if seconds > 0 else float("inf")
    reporter.say(f"embedded {io.counted(n_rows, 'row')} into "
                 f"{io.counted(n_features, 'feature')} in "
                 f"{seconds:.2f} s ({rate:,.0f} rows/s)")
    if data.skipped:
        shown = ", ".join(data.skipped[:3]) + (", ..." if len(data.skipped) > 3
                                               else "")
        reporter.notice(f"skipped {io.counted(len(data.skipped), 'image')} that "
                        f"failed to decode: {shown}")
    reporter.say(f"wrote {'stdout' if destination == io.STDIO else destination}")


# ---------------------------------------------------------------------------
# Writing row groups as the batches come


def write_features(batches, data, destination: str, parameters: dict, *,
                   inputs, compression: str = DEFAULT_COMPRESSION
                   ) -> tuple[int, int]:
    """Write the feature batches as Parquet row groups; ``(rows, features)``.

    A file goes to a temporary path renamed on success, so a failed or
    interrupted run leaves nothing. stdout is written as the rows come, once
    past HOLD_BYTES (a run that fails before writes nothing); a run that fails
    later leaves it without the Parquet footer, so readers refuse it.
    """
    if destination == io.STDIO:
        stream = _RefusableStream()
        counts = _write_groups(batches, data, pa.PythonFile(stream, mode="w"),
                               parameters, compression, on_failure=stream.refuse)
        stream.release()
        io.data_stdout().flush()
        io.written.append("stdout")
        return counts
    with io.atomic_output(destination, inputs=inputs) as temporary:
        return _write_groups(batches, data, temporary, parameters, compression)


def check_compression(compression: str) -> str:
    """The codec's name in lower case (ZSTD is zstd), or a usage error."""
    if compression.lower() not in COMPRESSIONS:
        raise UsageError(f"--compression {compression}: choose one of "
                         + ", ".join(COMPRESSIONS))
    return compression.lower()


def _write_groups(batches, data, sink, parameters, compression, *,
                  on_failure=lambda: None) -> tuple[int, int]:
    batches = iter(batches)
    writer = None
    try:
        first = next(batches, None)
        if first is None:
            raise DataError(f"{io.describe(data.name)}: no rows could be "
                            "embedded (every image was skipped)")
        n_features = first.features.shape[1]
        writer = _BackgroundWriter(sink, _schema(data, n_features, parameters),
                                   compression)
        group_rows = _group_rows(n_features, len(first.features))
        n_rows = _put_all(itertools.chain([first], batches), writer, group_rows)
        writer.close()
    except BaseException:
        # Refused first: the Parquet writer, closed here or destroyed later,
        # would otherwise end a failed stream with a valid footer.
        on_failure()
        if writer is not None:
            writer.abandon()
        raise
    return n_rows, n_features


def _put_all(batches, writer, group_rows: int) -> int:
    """Hand the batches to the writer in row groups; the number of rows."""
    pending, n_pending, n_rows = [], 0, 0
    for batch in batches:
        pending.append(batch)
        n_pending += len(batch.features)
        if n_pending >= group_rows:
            n_rows += writer.put(_table(writer.schema, pending))
            n_pending = 0
    if pending:
        n_rows += writer.put(_table(writer.schema, pending))
    return n_rows


class _RefusableStream:
    """stdout for the Parquet writer, cut off for good once the run fails.

    The first HOLD_BYTES are held back, so a run that fails before its output
    passes them (most failures: a bad row, a wrong model) writes nothing at
    all. After ``refuse()`` every write raises OSError, so the footer that
    pyarrow's close or the C++ writer's destructor would add never gets out.
    """

    def __init__(self):
        self.stream, self.refused = None, False  # stdout, once released
        self.held, self.held_bytes = [], 0

    def refuse(self) -> None:
        self.refused = True
        self.held, self.held_bytes = [], 0

    def write(self, data) -> int:
        if self.refused:
            raise OSError("the run failed: no more output to stdout")
        if self.held is None:
            return self.stream.write(data)
        self.held.append(bytes(data))
        self.held_bytes += len(data)
        if self.held_bytes > HOLD_BYTES:
            self.release()
        return len(data)

    def release(self) -> None:
        """Send what is held back; write straight through from now on."""
        if self.refused or self.held is None:
            return
        held, self.held = self.held, None
        self.stream = io.data_stdout()  # from here an interrupt cuts a stream
        for data in held:
            self.stream.write(data)

    def flush(self) -> None:
        if not self.refused and self.held is None:
            self.stream.flush()

    def close(self) -> None:
        """The stream belongs to the command, which closes it at the end."""

    @property
    def closed(self) -> bool:
        return self.stream is not None and self.stream.closed


class _BackgroundWriter:
    """Writes row groups in a thread while the next batches are embedded.

    Encoding Parquet costs about a tenth of the inference time of a small
    backbone (a third with snappy); pyarrow releases the GIL, so the two
    overlap. At most two row groups wait in the queue, so memory stays bounded.
    """

    def __init__(self, sink, schema: pa.Schema, compression: str):
        import queue
        import threading

        carried = [f.name for f in schema][:-1]
        # Dictionary encoding and statistics of float features cost time and
        # help nobody; the carried columns keep statistics, and text labels
        # a dictionary (integer ids and labels are faster written plain).
        self.writer = pq.ParquetWriter(sink, schema,
                                       use_dictionary=io.dictionary_columns(schema),
                                       write_statistics=carried,
                                       compression=compression)
        self.schema, self.error, self.abandoned = schema, None, False
        self.queue = queue.Queue(maxsize=2)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (table := self.queue.get()) is not None:
            if self.error is None and not self.abandoned:
                try:
                    self.writer.write_table(table, row_group_size=len(table))
                except BaseException as error:  # re-raised in the caller
                    self.error = error

    def put(self, table: pa.Table) -> int:
        if self.error is not None:
            raise self.error
        self.queue.put(table)
        return table.num_rows

    def close(self) -> None:
        """Write what is queued, then the footer (not after a failed write)."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        self.writer.close()

    def abandon(self) -> None:
        """Stop after a failure: queued row groups are dropped, not written."""
        self.abandoned = True
        self.queue.put(None)
        self.thread.join()
        try:
            # Closed now, as a refused footer fails quietly here, whereas
            # pyarrow's __del__ would print the error as a traceback.
            self.writer.close()
        except Exception:  # noqa: BLE001 - the run's own error is raised
            pass


def _schema(data, n_features: int, parameters: dict) -> pa.Schema:
    fields = list(data.fields)
    fields.append(pa.field(FEATURES, pa.list_(pa.float32(), n_features)))
    record = io.provenance("embed", {**parameters, "n_features": n_features})
    empty = pa.Table.from_batches([], schema=pa.schema(fields))
    return io.with_provenance(empty, record, data.metadata).schema


def _group_rows(n_features: int, batch_rows: int) -> int:
    rows = GROUP_BYTES // (4 * max(n_features, 1))
    return max(batch_rows, min(rows, MAX_GROUP_ROWS))


def _table(schema: pa.Schema, pending: list) -> pa.Table:
    """One row group from the pending batches (which it empties).

    The batches stay separate chunks: the Parquet writer encodes a row group
    chunk by chunk, so joining them first would only copy every value once more.
    """
    names = [f.name for f in schema][:-1]
    columns = [pa.chunked_array([b.carried[n] for b in pending], type=f.type)
               for n, f in zip(names, schema)]
    columns.append(pa.chunked_array([io.fixed_size_list(b.features)
                                     for b in pending], type=schema.field(-1).type))
    pending.clear()
    return pa.Table.from_arrays(columns, schema=schema)
