"""Getting the base model: the local link, and downloads up to the network boundary."""

import os

import pytest

from snaketune.config import ModelConfig
from snaketune.errors import OfflineError
from snaketune.fetch import fetch_model

from .helpers import TINY_BASE


def test_local_source_is_the_tutorials_symlink(tmp_path):
    out = tmp_path / "models/tiny"
    fetch_model(ModelConfig(source="local", path=str(TINY_BASE)), out, tmp_path / "cache")
    assert out.is_symlink() and out.resolve() == TINY_BASE.resolve()
    assert (out / "config.json").is_file()


def test_local_source_without_a_model_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*has no config.json"):
        fetch_model(ModelConfig(source="local", path=str(tmp_path)), tmp_path / "out", tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_existing_model_directory_is_never_replaced(tmp_path):
    out = tmp_path / "models/tiny"
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        fetch_model(ModelConfig(source="local", path=str(TINY_BASE)), out, tmp_path / "cache")
    assert (out / "mine.txt").read_text() == "keep me"


def test_modelscope_download_offline_fails_with_the_local_way_out(tmp_path):
    """This machine reaches no model hub: the real download code stops at the connection."""
    with pytest.raises(OfflineError) as err:
        fetch_model(
            ModelConfig(source="modelscope", id="Shanghai_AI_Laboratory/internlm2-chat-1_8b", revision="master"),
            tmp_path / "out",
            tmp_path / "cache",
        )
    assert "www.modelscope.cn" in str(err.value) and "source: local" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_huggingface_download_respects_hf_hub_offline(tmp_path, monkeypatch):
    monkeypatch.setitem(os.environ, "HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE=1.*source: local"):
        fetch_model(
            ModelConfig(source="huggingface", id="HuggingFaceTB/SmolLM2-135M-Instruct"),
            tmp_path / "out",
            tmp_path / "cache",
        )


# ---------------------------------------------------------------- a changed path, a damaged file


def test_a_changed_path_relinks_or_is_refused_naming_both_paths(tmp_path):
    """A model's path changed (in the config or by --set) after the model was fetched: the old link is
    never used without a word. fetch-model links the new path when it is a model; nothing else uses the link."""
    from snaketune.errors import ConfigError
    from snaketune.fetch import check_link

    out = tmp_path / "models/tiny"
    fetch_model(ModelConfig(source="local", path=str(TINY_BASE)), out, tmp_path / "cache")
    gone = ModelConfig(source="local", path=str(tmp_path / "nonexistent"))
    with pytest.raises(ConfigError, match=f"{out} links to {TINY_BASE.resolve()}, not to .* {gone.path}"):
        check_link(gone, out)
    with pytest.raises(ConfigError, match=f"{gone.path} has no config.json.*; {out} links to {TINY_BASE.resolve()}"):
        fetch_model(gone, out, tmp_path / "cache")
    assert out.resolve() == TINY_BASE.resolve()  # left as it was
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_bytes((TINY_BASE / "config.json").read_bytes())
    fetch_model(ModelConfig(source="local", path=str(other)), out, tmp_path / "cache")
    assert out.is_symlink() and out.resolve() == other.resolve()
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no temporary link left beside it
    check_link(ModelConfig(source="local", path=str(other)), out)


def test_a_command_refuses_a_model_link_the_config_no_longer_names(tmp_path, monkeypatch, capsys):
    from snaketune.cli import main

    from .helpers import tiny_config

    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path / "c.yaml")
    (tmp_path / "resources/models").mkdir(parents=True)
    (tmp_path / "resources/models/tiny").symlink_to(TINY_BASE)
    with pytest.raises(SystemExit):
        main(["check-custom-dataset", "--config", config, "--set", "models.tiny.path=/nonexistent"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"links to {TINY_BASE.resolve()}, not to the model's configured path " in err
    assert "/nonexistent" in err


def tiny_gguf(path):
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((32, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.0])
def test_a_truncated_gguf_file_is_named_as_damaged(tmp_path, keep):
    from snaketune.errors import CheckpointError

    path = tiny_gguf(tmp_path / "model.gguf")
    whole = path.read_bytes()
    path.write_bytes(whole[: int(len(whole) * keep)])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as err:
        fetch_model(ModelConfig(source="gguf", gguf={"path": str(path)}), out, tmp_path / "cache")
    assert err.value.one_line().startswith(f"{path}: truncated or damaged GGUF file (")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_a_file_that_is_not_gguf_says_so(tmp_path):
    from snaketune.errors import CheckpointError

    path = tmp_path / "model.gguf"
    path.write_text("<html>404 Not Found</html>")
    with pytest.raises(CheckpointError, match=r"model.gguf: not a GGUF file \(it starts with b'<htm', not b'GGUF'\)"):
        fetch_model(ModelConfig(source="gguf", gguf={"path": str(path)}), tmp_path / "out", tmp_path / "cache")
    assert not (tmp_path / "out").exists()
