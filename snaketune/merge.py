"""``merge``: a base model and an adapter -> one model that plain transformers loads."""

from __future__ import annotations

import logging
import os

from .adapter import check_finite
from .config import MergeConfig
from .files import atomic_dir

log = logging.getLogger(__name__)


def merge(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    template: str,
    merge: MergeConfig,
    *,
    trust_remote_code: bool = False,
) -> None:
    """``xtuner convert merge``: base + adapter -> one model that plain transformers loads.

    Runs on the CPU (XTuner's default ``--device cuda`` runs out of memory on
    large models). The tokenizer gets a chat template and the generation config
    the stop tokens of the training template, so chat tools format and stop
    as in training.
    """
    from .encoding import encode_prompt, resolve_template, stop_token_ids
    from .model import load_base, load_peft_model, load_tokenizer
    from .templates import TOKENIZER_TEMPLATE

    tokenizer = load_tokenizer(base_dir, trust_remote_code)
    model = load_peft_model(load_base(base_dir, merge.dtype, trust_remote_code), adapter_dir).merge_and_unload()
    check_finite(model.state_dict().items(), f"merging {adapter_dir} into {base_dir}")
    tmpl = resolve_template(template)
    if tmpl != TOKENIZER_TEMPLATE:
        uses_bos = (
            encode_prompt("x", tokenizer, tmpl)[0]
            != tokenizer.encode(tmpl.format_input("x"), add_special_tokens=False)[0]
        )
        tokenizer.chat_template = tmpl.chat_template(bos=uses_bos)
    stops = stop_token_ids(tokenizer, tmpl)
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=merge.max_shard_size)
        tokenizer.save_pretrained(tmp)
    log.info("merged model written to %s", out)
