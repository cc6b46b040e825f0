"""TensorBoard for experiment tracking (raymb.driver.report.tracking): scalars by step, the
config as hparams and text, in <run_dir>/tensorboard/; a run in an object store writes the
event files locally and uploads them every UPLOAD_S seconds and at finish. A resumed run
continues after the last step its event files hold."""

from __future__ import annotations

import json
import struct
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from raymb.storage import Location

if TYPE_CHECKING:
    from raymb.driver.report.tracking import Point

UPLOAD_S = 30.0
"""At most how often event files are uploaded to a run directory in an object store."""
ROLL_BYTES = 8 << 20
"""An uploaded event file this big is closed and a new one begun, so an upload stays small."""
HPARAM_METRICS = ("train_loss", "val_loss", "val_accuracy", "val_perplexity", "val_bits_per_byte")
"""The scalars TensorBoard's HParams table shows next to the config, and metrics.name's
val_<metric> columns of metrics.csv."""
_TB_STATUS = {"FINISHED": "STATUS_SUCCESS", "FAILED": "STATUS_FAILURE"}


class TensorBoard:
    """Scalars by step, the config as hparams and text, in <run_dir>/tensorboard/."""

    name = "tensorboard"

    def __init__(self, run_dir: Location, flat: dict, resumed: bool) -> None:
        from tensorboardX import summary

        self.dest = run_dir / "tensorboard"
        self.last_step = _last_event_step(self.dest) if resumed else -1
        if run_dir.local:
            self.tmp = None
            self.logdir = self.dest.path
        else:
            self.tmp = tempfile.TemporaryDirectory(prefix="raymb-tensorboard-")
            self.logdir = self.tmp.name
        self.sent: dict[str, int] = {}  # name -> size of each file uploaded
        self.sent_at = time.monotonic()
        self._open_writer()
        self.flat = flat
        self.declared = False
        """Whether the HParams experiment (the metrics it shows) is written: at the first rows,
        whose columns name metrics.name's metrics, or at finish."""
        _, session_start, _ = summary.hparams(flat, dict.fromkeys(HPARAM_METRICS))
        self.writer.file_writer.add_summary(session_start)
        table = "\n".join(f"| {k} | {v} |" for k, v in flat.items())
        self.writer.add_text("config", f"| key | value |\n|---|---|\n{table}", 0)
        self.writer.flush()

    def _open_writer(self) -> None:
        from tensorboardX import SummaryWriter

        # A name of its own: tensorboardX names a file by the second and the host only, and
        # TensorBoard reads the files of a directory in the order of their names.
        self.suffix = f".{time.time_ns()}"
        self.writer = SummaryWriter(self.logdir, flush_secs=10, filename_suffix=self.suffix)

    def declare(self, columns: tuple[str, ...] = ()) -> None:
        """The HParams experiment: the config's keys and the metrics, the built-in ones and
        the val_<metric> among metrics.csv's `columns`."""
        from tensorboardX import summary

        own = [c for c in columns if c.startswith("val_") and c not in HPARAM_METRICS]
        metrics = dict.fromkeys((*HPARAM_METRICS, *own))
        experiment, _, _ = summary.hparams(self.flat, metrics)
        self.writer.file_writer.add_summary(experiment)
        self.declared = True

    def log(self, new: list[Point], columns: tuple[str, ...] = ()) -> None:
        """`new` points; `columns`: metrics.csv's header (the HParams metrics)."""
        if not self.declared:
            self.declare(columns)
        for point in new:
            for name, value in point.values.items():
                self.writer.add_scalar(name, value, point.step)
        self.writer.flush()
        if self.tmp is not None and time.monotonic() - self.sent_at >= UPLOAD_S:
            self._upload()

    def finish(self, summary: dict | None, status: str, files: dict[str, Location]) -> None:
        if not self.declared:
            self.declare()
        if summary is not None:
            text = json.dumps(summary, indent=2, default=str)
            self.writer.add_text("summary", "\n".join("    " + line for line in text.splitlines()))
        self.writer.file_writer.add_summary(_session_end(status))
        self.writer.close()
        if self.tmp is not None:
            self._upload(final=True)
            self.tmp.cleanup()

    def _upload(self, final: bool = False) -> None:
        if not final:
            self.writer.flush()
            current = next(Path(self.logdir).glob(f"*{self.suffix}"))
            if current.stat().st_size >= ROLL_BYTES:
                self.writer.close()
                self._open_writer()
        for file in sorted(Path(self.logdir).iterdir()):
            size = file.stat().st_size
            if self.sent.get(file.name) != size:
                (self.dest / file.name).write_bytes(file.read_bytes())
                self.sent[file.name] = size
        self.sent_at = time.monotonic()


def _last_event_step(directory: Location) -> int:
    """The highest step of a summary in the event files in `directory` (-1 when none).

    An event file is a sequence of records: an 8-byte length, a 4-byte checksum of it, the
    serialized Event, and a 4-byte checksum of that."""
    from google.protobuf.message import DecodeError
    from tensorboardX.proto.event_pb2 import Event

    last = -1
    for file in directory.children():
        if ".tfevents." not in file.name:
            continue
        data, at = file.read_bytes(), 0
        while at + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, at)
            end = at + 12 + length
            if end + 4 > len(data):  # the last record cut short (the writer was killed)
                break
            try:
                event = Event.FromString(data[at + 12 : end])
            except DecodeError:  # not an event file after all, or a damaged one
                break
            if event.HasField("summary"):
                last = max(last, event.step)
            at = end + 4
    return last


def _session_end(status: str):
    """The HParams plugin's record of how the run ended."""
    from tensorboardX.proto.api_pb2 import Status
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

    end = SessionEndInfo(status=Status.Value(_TB_STATUS.get(status, "STATUS_UNKNOWN")))
    content = HParamsPluginData(session_end_info=end, version=0).SerializeToString()
    plugin = SummaryMetadata.PluginData(plugin_name="hparams", content=content)
    value = Summary.Value(
        tag="_hparams_/session_end_info", metadata=SummaryMetadata(plugin_data=plugin)
    )
    return Summary(value=[value])
