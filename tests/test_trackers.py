"""Experiment trackers and sweep results on object storage (issue 14): TensorBoard event files written by the
progress logger, the sweep file's ``callbacks:`` section, results tables / best config / best student written
to and read from storage URIs (file:// and, when moto is installed, an in-process S3 server)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from raydistill.train.progress import TENSORBOARD_DIR, ProgressPrinter


def read_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from every event file under ``logdir`` (TFRecord framing: length, crc, data, crc), as
    TensorBoard reads them: a session start with a step (purge_step) drops the earlier events from that step on."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            record = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                out = {tag: {s: v for s, v in steps.items() if s < event.step} for tag, steps in out.items()}
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def _row(step: int, **extra) -> dict:
    return {"step": step, "loss": 1.0 / step, "task": 0.5 / step, "kd": 0.25 / step, "lr": 1e-3,
            "tokens_per_s": 100.0 * step, "step_time_s": 0.1, **extra}


def test_progress_writes_tensorboard_events(tmp_path, capsys):
    p = ProgressPrinter(tmp_path / "metrics.jsonl", max_steps=4, start_step=0, enabled=True)
    p.log(_row(2))
    p.log(_row(4, **{"val/loss": 2.0, "val/ppl": 7.4, "val/iia/mean": 0.5, "lm/task": 0.3}))
    p.close()
    scalars = read_scalars(tmp_path / TENSORBOARD_DIR)
    assert set(scalars) == {"loss", "task", "kd", "lr", "tokens_per_s", "step_time_s", "val/loss", "val/ppl",
                            "val/iia/mean", "lm/task"}
    assert scalars["loss"] == {2: pytest.approx(0.5), 4: pytest.approx(0.25)}
    assert scalars["val/ppl"] == {4: pytest.approx(7.4)}
    assert scalars["tokens_per_s"][4] == pytest.approx(400.0)
    # A resume from step 2 replaces the events of the steps it replays.
    p = ProgressPrinter(tmp_path / "metrics.jsonl", max_steps=4, start_step=2, enabled=True)
    p.log(_row(4, loss=9.0))
    p.close()
    assert read_scalars(tmp_path / TENSORBOARD_DIR)["loss"] == {2: pytest.approx(0.5), 4: pytest.approx(9.0)}


def test_progress_other_ranks_write_nothing(tmp_path):
    p = ProgressPrinter(tmp_path / "metrics.jsonl", max_steps=4, start_step=0, enabled=False)
    p.log(_row(2))
    p.close()
    assert not (tmp_path / TENSORBOARD_DIR).exists()
