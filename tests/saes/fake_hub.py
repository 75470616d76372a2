"""A hub repository served from a local folder: `huggingface_hub.list_repo_files` and
`snapshot_download`, as `mlsae.saes.load` calls them, replaced for one test."""

import fnmatch
import shutil
from pathlib import Path

import huggingface_hub
import pytest

from mlsae.saes import load


class FakeHub:
    """The repository `repo_id` holding the files of `source`; `downloads` records the
    `allow_patterns` of every `snapshot_download`."""

    def __init__(self, repo_id: str, source: Path, cache: Path) -> None:
        self.repo_id = repo_id
        self.source = source
        self.cache = cache
        self.downloads: list[list[str]] = []

    def files(self) -> list[str]:
        return sorted(
            p.relative_to(self.source).as_posix() for p in self.source.rglob("*") if p.is_file()
        )

    def list_repo_files(self, repo_id: str, **kwargs) -> list[str]:
        assert repo_id == self.repo_id
        return self.files()

    def snapshot_download(self, repo_id: str, allow_patterns=None, **kwargs) -> str:
        assert repo_id == self.repo_id
        self.downloads.append(list(allow_patterns or ["*"]))
        snapshot = self.cache / f"snapshot-{len(self.downloads)}"
        for name in self.files():
            if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns or ["*"]):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(self.source / name, snapshot / name)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    def downloaded(self) -> list[str]:
        """The files of the last snapshot."""
        snapshot = self.cache / f"snapshot-{len(self.downloads)}"
        return sorted(
            p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()
        )


def serve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, repo_id: str, source: Path) -> FakeHub:
    """Serve `source` as the hub repository `repo_id`, the hub reachable."""
    hub = FakeHub(repo_id, source, tmp_path / "hub-cache")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", hub.list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    monkeypatch.setattr(load, "offline_reason", lambda: None)
    return hub
