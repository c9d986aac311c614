"""A training run's checkpoints as steps of the `Trainer`: find the one to resume from (after
every check on it), restore from it, and save one when due.

Invariants: a checkpoint is never taken while mask statistics accumulate (they are not part of
one); every check on an earlier checkpoint comes before anything changes; every rank resumes
from the same checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm.auto import tqdm

from .checkpoint import (
    check_resumable,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
)
from .distributed import agree, gather_objects


class ResumableMixin:
    """The Trainer's checkpoint steps (it provides cfg, model, optimizer, schedule, ...)."""

    latest: Path | None

    def find_checkpoint(self) -> None:
        """The checkpoint to resume from (None: a fresh run), after every check on it."""
        cfg = self.cfg
        if (cfg.checkpoint_every or cfg.resume) and not self.is_spalora:
            raise ValueError("checkpoints and resume are for spalora models only")
        existing = list_checkpoints(cfg.checkpoint_dir) if cfg.checkpoint_dir else []
        if self.world > 1 and cfg.checkpoint_dir:  # every rank resumes from the same checkpoint
            agree(
                [p.name for p in existing],
                f"the checkpoints in {cfg.checkpoint_dir} (every node must see that folder)",
            )
        if existing and not cfg.resume and cfg.checkpoint_every:
            raise ValueError(
                f"{cfg.checkpoint_dir} holds checkpoints of an earlier run: resume it, "
                "or remove them or choose another output folder"
            )
        if cfg.resume and not existing and self.main:
            where = cfg.checkpoint_dir or "(no checkpoint folder given)"
            tqdm.write(
                f"[spalora] resume: no checkpoint in {where}; starting a fresh run",
                file=sys.stderr,
            )
        self.latest = existing[-1] if cfg.resume and existing else None
        if self.latest is not None:
            check_resumable(self.latest, self.recipe, self.signature)

    def resume(self) -> None:
        """Restore adapter, optimizer, RNG, schedule and position from the checkpoint, if any."""
        self.model.train()
        if self.latest is None:
            return
        saved = load_checkpoint(self.latest, self.model, self.optimizer, rank=self.rank)
        self.step, self.lr_step, self.consumed = saved["step"], saved["lr_step"], saved["consumed"]
        self.resumed_from = self.step
        self.history = saved["history"]
        self.schedule.load_state_dict(saved["schedule"])
        if self.main:
            tqdm.write(
                f"[spalora] resumed from {self.latest} (step {self.step}, "
                f"phase {self.schedule.phase})",
                file=sys.stderr,
            )

    def checkpoint_due(self) -> bool:
        """Every `checkpoint_every` steps, except while mask statistics accumulate (they are
        not part of a checkpoint)."""
        every = self.cfg.checkpoint_every
        return bool(every) and self.step % every == 0 and self.schedule.phase != "collect"

    def save_checkpoint(self) -> None:
        state = {
            "step": self.step,
            "lr_step": self.lr_step,
            "consumed": self.consumed,
            "signature": self.signature,
            "recipe": self.recipe,
            "schedule": self.schedule.state_dict(),
            "history": self.history,
        }
        rank_rng = gather_objects(rng_state()) if self.world > 1 else None  # all ranks
        if self.main:
            cfg = self.cfg
            save_checkpoint(
                cfg.checkpoint_dir, self.model, self.optimizer, state, cfg.keep_last, rank_rng
            )
