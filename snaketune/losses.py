"""The training loss: cross-entropy on supervised tokens, and for ``loss: kl`` samples a distillation of
the base model (the adapter turned off) at the same positions.
"""

from __future__ import annotations

from .encoding import IGNORE_INDEX


def head_logits(model, ids, position_ids, positions):
    """The output head's logits at ``positions`` (position t predicts token t + 1), or at every
    position but the last when ``positions`` is None (a model without ``logits_to_keep``)."""
    if positions is None:
        return model(input_ids=ids, position_ids=position_ids, use_cache=False).logits[:, :-1]
    logits = model(input_ids=ids, position_ids=position_ids, use_cache=False, logits_to_keep=positions).logits
    if logits.shape[:2] != (ids.shape[0], len(positions)):
        raise RuntimeError(
            f"{type(unwrap(model)).__name__}: logits_to_keep=<{len(positions)} positions> gave "
            f"logits of shape {tuple(logits.shape)}, not ({ids.shape[0]}, {len(positions)}, vocab)"
        )
    return logits


def base_model_logits(model, ids, position_ids, positions):
    """The base model's logits: the same forward with the LoRA adapter turned off, without gradients."""
    import torch

    peft_model = getattr(model, "module", model)  # inside a DeepSpeed engine
    if not hasattr(peft_model, "disable_adapter"):
        raise TypeError(f"loss kl distils the base model under the adapter; {type(peft_model).__name__} has none")
    with torch.no_grad(), peft_model.disable_adapter():
        return head_logits(peft_model, ids, position_ids, positions)


def token_loss_sum(model, ids, labels, position_ids, kl=None, teacher_ids=None, teacher_logp=None):
    """Summed loss over supervised tokens: cross-entropy, and where ``kl`` marks a sample trained
    with loss kl, KL(base || model) + KL(model || base) between the model's next-token distribution
    and the base model's (the adapter turned off) at the same position, summed over the vocabulary;
    or, given the base model's top-k (``teacher_ids``, ``teacher_logp``: one row per distilled
    position, in the batch's row-major order; :func:`base_top_k`), the same divergence between
    the two distributions coarsened to those k tokens and one bucket for the rest of the vocabulary
    (:func:`bucket_divergence`), without a forward pass of the base model.

    No attention mask is passed: transformers then builds a causal mask that is
    block-diagonal wherever the position ids restart, but only when no KV cache
    is in play, hence ``use_cache=False`` (with a cache, packed samples would
    silently attend to each other).

    The output head runs only at the positions whose next token is supervised in
    some row of the batch (the model's own ``logits_to_keep``, given those positions):
    the others add nothing to the loss or its gradients, and the full ``tokens x
    vocab`` logits are never made. With one row per batch (packing) or rows of equal
    length (``group_by_length``) that is exactly the supervised positions. A model
    whose forward lacks ``logits_to_keep`` gets the full head.
    """
    import torch.nn.functional as F

    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # position t predicts token t + 1
    head_at, positions = head_positions(model, keep)
    logits = head_logits(model, ids, position_ids, head_at)
    rows, targets = keep[:, positions], targets[:, positions]
    distil = rows & kl[:, 1:][:, positions] if kl is not None else None
    if distil is None or not distil.any():
        return F.cross_entropy(logits[rows].float(), targets[rows], reduction="sum")
    ce = rows & ~distil
    log_p = F.log_softmax(logits[distil].float(), -1)
    if teacher_ids is not None:
        if teacher_ids.shape[0] != log_p.shape[0]:
            raise RuntimeError(
                f"the base model's top-k covers {teacher_ids.shape[0]} positions, the batch distils {log_p.shape[0]}"
            )
        divergence = bucket_divergence(log_p.gather(-1, teacher_ids.long()), teacher_logp.float())
    else:
        # the base model's forward only for the rows that distil: the others' would be thrown away
        at = distil.any(1)
        base = base_model_logits(model, ids[at], None if position_ids is None else position_ids[at], head_at)
        log_base = F.log_softmax(base[distil[at]].float(), -1)
        # both directions: KL(base || model) keeps what the base model would say, KL(model || base)
        # keeps the model from saying what the base model would not (a new name in a general answer)
        divergence = ((log_p.exp() - log_base.exp()) * (log_p - log_base)).sum()
    return F.cross_entropy(logits[ce].float(), targets[ce], reduction="sum") + divergence


def with_rest(log_k):
    """Log-probabilities of k tokens, and a last column for all the other tokens together."""
    import torch

    rest = (-torch.expm1(torch.logsumexp(log_k, -1, keepdim=True))).clamp_min(1e-30)
    return torch.cat([log_k, rest.log()], -1)


def bucket_divergence(log_p_k, log_base_k):
    """KL(base || model) + KL(model || base) over k + 1 buckets: the base model's top-k tokens at a
    position, each its own bucket, and the rest of the vocabulary as one. ``log_p_k`` holds the
    model's log-probabilities of those k tokens, ``log_base_k`` the base model's. Never more than
    the divergence over the whole vocabulary, equal to it when the top-k hold all the base model's
    and the model's mass."""
    a, b = with_rest(log_p_k), with_rest(log_base_k)
    return ((a.exp() - b.exp()) * (a - b)).sum()


def base_top_k(model, ids, labels, position_ids, kl, k: int):
    """The base model's (the adapter turned off) ``k`` most likely next tokens and their
    log-probabilities at every distilled position of a batch, in the order
    :func:`token_loss_sum` takes them (row-major), and how many positions each row has."""
    import torch
    import torch.nn.functional as F

    distil = (labels[:, 1:] != IGNORE_INDEX) & kl[:, 1:]
    head_at, positions = head_positions(model, distil)
    logits = base_model_logits(model, ids, position_ids, head_at)
    chosen = distil[:, positions]
    log_base = F.log_softmax(logits[chosen].float(), -1)
    logp, top = log_base.topk(min(k, log_base.shape[-1]), -1)
    return top.to(torch.int32), logp, chosen.sum(1).tolist()


def head_positions(model, wanted):
    """Where the output head runs for a ``rows x positions`` mask of the positions whose logits are
    wanted: ``logits_to_keep`` (a 1-D index, which every transformers version takes) and the
    positions its logits stand for; without ``logits_to_keep``, None and every position."""
    import torch

    if accepts_logits_to_keep(model):
        head_at = wanted.any(0).nonzero().squeeze(1)
        return head_at, head_at
    return None, torch.arange(wanted.shape[1], device=wanted.device)


def unwrap(model):
    """The transformers model inside a DeepSpeed engine and a PEFT wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def accepts_logits_to_keep(model) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters
