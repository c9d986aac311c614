"""Publishing the converted SmolLM2 folder when two processes convert it at once."""

from spalora.hub import publish_folder


def _folder(path, text):
    path.mkdir()
    (path / "model.safetensors").write_text(text)
    (path / "config.json").write_text("{}")
    return path


def test_a_complete_folder_published_first_is_kept(tmp_path):
    target = _folder(tmp_path / "model", "first")
    ours = _folder(tmp_path / ".convert-x", "second")
    publish_folder(ours, target)
    assert (target / "model.safetensors").read_text() == "first"  # a reader may be using it
    assert ours.exists()  # the caller discards its own copy


def test_a_half_folder_is_replaced_and_a_missing_one_created(tmp_path):
    half = tmp_path / "model"
    half.mkdir()
    (half / "config.json").write_text("{}")  # no weights: a conversion that never finished
    publish_folder(_folder(tmp_path / ".convert-a", "new"), half)
    assert (half / "model.safetensors").read_text() == "new"
    fresh = tmp_path / "other"
    publish_folder(_folder(tmp_path / ".convert-b", "made"), fresh)
    assert (fresh / "model.safetensors").read_text() == "made"
    assert not (tmp_path / ".convert-b").exists()
