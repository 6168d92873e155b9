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
