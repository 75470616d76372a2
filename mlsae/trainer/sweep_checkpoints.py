"""A sweep's checkpoints: every SAE's checkpoint of a step, then a commit marker.

`<sweep>/checkpoints/step=<s>/<run>.ckpt` holds each SAE's checkpoint of step `s`; once
every SAE has written its own, `committed.json` names `s` (written atomically), and the
older step folders go. A kill at any moment leaves `committed.json` naming a step that
every SAE has, and a resume continues all of them from it (docs/sweeps.md).
"""

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from mlsae.cli import ConfigError
from mlsae.files import atomic_output, remove_partials

logger = logging.getLogger(__name__)

COMMIT_MARKER = "committed.json"


def step_folder(folder: Path, step: int) -> Path:
    return folder / f"step={step}"


class SweepCheckpoints:
    """Writes the sweep's checkpoints of `names` under `folder` and commits each step."""

    def __init__(self, folder: Path, names: list[str]) -> None:
        self.folder = Path(folder)
        self.names = names
        self._saved: dict[int, set[str]] = {}

    def path(self, step: int, name: str) -> Path:
        return step_folder(self.folder, step) / f"{name}.ckpt"

    def saved(self, step: int, name: str) -> None:
        """`name`'s checkpoint of `step` is written; commit the step once all are."""
        written = self._saved.setdefault(step, set())
        written.add(name)
        if written == set(self.names):
            self.commit(step)
            del self._saved[step]

    def commit(self, step: int) -> None:
        record = {"step": step, "runs": self.names}
        with atomic_output(self.folder / COMMIT_MARKER, what="the sweep's commit marker") as out:
            out.write_text(json.dumps(record, indent=1) + "\n")
        for other in self.folder.glob("step=*"):
            if other != step_folder(self.folder, step):
                shutil.rmtree(other, ignore_errors=True)


def committed_checkpoints(folder: str | Path, names: list[str]) -> tuple[int, dict[str, Path]]:
    """The last committed step of the sweep checkpoint folder `folder` and each SAE's
    checkpoint of it; removes the step folders that were never committed."""
    folder = Path(folder)
    if folder.is_file():
        raise ConfigError(
            f"--checkpoint_path of a sweep takes the sweep's checkpoint folder (the one that "
            f"holds {COMMIT_MARKER}), not the file {folder}"
        )
    marker = folder / COMMIT_MARKER
    if not marker.is_file():
        raise ConfigError(f"{folder} holds no {COMMIT_MARKER}: no step of a sweep was committed")
    record: dict[str, Any] = json.loads(marker.read_text())
    step = int(record["step"])
    if sorted(record.get("runs", [])) != sorted(names):
        raise ConfigError(
            f"cannot resume from {folder}, which a sweep of other SAEs wrote (runs "
            f"{' '.join(record.get('runs', []))}, now {' '.join(names)}): resume with its options"
        )
    paths = {name: step_folder(folder, step) / f"{name}.ckpt" for name in names}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise ConfigError(f"the sweep's committed step {step} lacks {', '.join(missing)}")
    remove_partials(folder)
    for other in folder.glob("step=*"):
        if other != step_folder(folder, step):
            logger.info("removing %s, a step that not every SAE of the sweep saved", other)
            shutil.rmtree(other, ignore_errors=True)
    return step, paths
