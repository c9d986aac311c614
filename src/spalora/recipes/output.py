"""Where a job writes: the checks on its output folder before anything runs, and a fallback
folder when the final save fails after all, so trained work is never lost."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


class JobError(Exception):
    """An expected failure of a job (bad input, a refused output folder): the command line
    prints it as one `error:` line, without a traceback."""


def check_output_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that is a file, holds a finished run (unless resumed or overwritten) or
    cannot be written; creates it otherwise."""
    if out.exists() and not out.is_dir():
        raise JobError(f"output folder {out} is a file; choose another --output-dir")
    finished = (out / "adapter").exists() or (out / "metrics.json").exists()
    if finished and not (resume or overwrite):
        raise JobError(
            f"{out} holds a finished run (adapter/, metrics.json): pass --overwrite to "
            "replace it, --resume to continue it, or choose another --output-dir"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # what writing there really answers
    except OSError as exc:
        raise JobError(f"cannot write to output folder {out}: {exc.strerror or exc}") from exc


def remove_checkpoints(checkpoints: list[Path]) -> None:
    """--overwrite: the earlier run's checkpoints go, so they cannot mix with the new run's."""
    for path in checkpoints:
        shutil.rmtree(path)


def write_or_fall_back(out: Path, write: Callable[[Path], None]) -> tuple[Path, OSError | None]:
    """`write(out)`; if that fails, `write` into a fresh temporary folder instead. Returns the
    folder written and the error that moved it there (None: `out` itself)."""
    try:
        write(out)
        return out, None
    except OSError as exc:
        fallback = Path(tempfile.mkdtemp(prefix="spalora-run-"))
        write(fallback)
        return fallback, exc
