"""A run's files: written whole even when another run removes their empty folder mid-write; folders kept while in use."""
from pathlib import Path

import pytest

from cookbook.checkpoint import load, save
from cookbook.files import remove_if_empty, write_whole


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "runs" / "r.pt"
    write_whole(path, lambda partial: partial.write_text("epoch 1"))

    def killed(partial):
        partial.write_text("half of epoch")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_whole(path, killed)
    assert path.read_text() == "epoch 1"


def test_the_folder_is_made_again_if_another_run_removed_it_empty(tmp_path):
    folder = tmp_path / "checkpoints"
    calls = []

    def write(partial):
        calls.append(partial)
        if len(calls) == 1:
            remove_if_empty(folder)  # another run, ending, between our mkdir and our open
        partial.write_text("epoch 1")

    write_whole(folder / "r.pt", write)
    assert (folder / "r.pt").read_text() == "epoch 1" and len(calls) == 2 and not list(folder.glob("*.partial"))


def test_a_checkpoint_is_written_when_another_run_removes_its_folder_after_our_mkdir(tmp_path, monkeypatch):
    """Runs started together in one folder: one ends and removes ./checkpoints, empty, as another is about to save."""
    made, mkdirs = Path.mkdir, []

    def mkdir_then_removed(self, *args, **kwargs):
        made(self, *args, **kwargs)
        mkdirs.append(self)
        if len(mkdirs) == 1:
            remove_if_empty(self)

    monkeypatch.setattr(Path, "mkdir", mkdir_then_removed)
    save(tmp_path / "checkpoints" / "r.pt", {"epoch": 1})
    assert load(tmp_path / "checkpoints" / "r.pt") == {"epoch": 1} and len(mkdirs) == 2


def test_a_missing_file_for_another_reason_is_not_retried(tmp_path):
    calls = []

    def write(partial):
        calls.append(partial)
        (tmp_path / "no" / "such").read_text()

    with pytest.raises(FileNotFoundError):
        write_whole(tmp_path / "r.json", write)
    assert len(calls) == 1


def test_only_an_empty_folder_is_removed(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "other-run.pt").write_text("x")
    (tmp_path / "empty").mkdir()
    for name in ("busy", "empty", "absent"):
        remove_if_empty(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
