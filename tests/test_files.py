"""A run's files: written whole even when another run removes their empty folder mid-write; folders kept while in use."""
import pytest

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
