"""A run's log: history.jsonl, written row by row as the run goes (so a killed run keeps its
curve), and the same scalars in TensorBoard when it is installed."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm


def tensorboard_writer(log_dir: str | None):
    """A SummaryWriter when a folder is asked for and TensorBoard is installed, else None."""
    if not log_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the `tensorboard` package
        tqdm.write(
            "[spalora] TensorBoard is not installed (pip install tensorboard): "
            "logging to history.jsonl only",
            file=sys.stderr,
        )
        return None
    return SummaryWriter(log_dir)


class RunLog:
    """history.jsonl and TensorBoard; `rows` (a resumed run's history) start the file again."""

    def __init__(
        self, path: str | None, tensorboard_dir: str | None, rows: Iterable[dict] = ()
    ) -> None:
        self.file = open(path, "w") if path else None  # noqa: SIM115  (closed in close())
        for row in rows if self.file is not None else ():
            self.file.write(json.dumps(row) + "\n")
        self.writer = tensorboard_writer(tensorboard_dir)

    def write(self, row: dict) -> None:
        """One row: {"step", "loss", "phase", "lr"} or {"step", "validation": {...}}."""
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, dict):  # {"validation": {"accuracy": ...}}
                    for name, v in value.items():
                        self.writer.add_scalar(f"{key}/{name}", v, row["step"])
                elif key in ("loss", "lr"):
                    self.writer.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        for handle in (self.file, self.writer):
            if handle is not None:
                handle.close()
        self.file = self.writer = None
