"""Which devices a job uses: its GPUs, its ranks checked against them, and the dtype it computes in.

Every choice here is made from what the job was given (Snakemake's ``resources.gpu``, SLURM's
``CUDA_VISIBLE_DEVICES``) and what the process can see (``torch.cuda.device_count()``), and is a
plain function of those numbers, so that it is tested on a machine without a GPU:

- :func:`assign_gpus`: on a local run, Snakemake counts GPUs (``--resources gpu=N``) but does
  not say which ones a job may use; each GPU job takes its own from lock files under
  ``.snakemake/`` and sets ``CUDA_VISIBLE_DEVICES`` before anything touches CUDA, and a job given
  none sees none.
- :func:`check_ranks`: the training ranks against the job's GPUs and the experiment's ``gpus``.
- :func:`inference_placement`: evaluation and replay generation on the job's GPU, in half
  precision, or on the CPU in fp32.
- :func:`training_dtype`: what training computes in besides its fp32 loss and LoRA weights.
- :func:`agreed_minimum`: a per-rank measurement that changes how many collective calls a rank
  makes (free memory) reduced to one value all ranks share.
- :func:`inference_bytes`: what a model needs in memory to answer, for sizing the profiles.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import DeviceError

log = logging.getLogger(__name__)

# Where local GPU jobs take their devices: one lock file per GPU and host, under Snakemake's own
# directory of the working directory the jobs run in.
LOCK_DIR = Path(".snakemake", "snaketune-gpus")
VISIBLE = "CUDA_VISIBLE_DEVICES"
_held: list[int] = []  # the lock files' descriptors: the claim lasts as long as the process (and its exec)


def cuda_device_count() -> int:
    """GPUs this process can use (``CUDA_VISIBLE_DEVICES`` applied); 0 without CUDA. Counted through
    NVML where torch can (not ``is_available()``, which initialises the driver): the visible set may
    still be changed afterwards."""
    import torch

    return torch.cuda.device_count()


def assign_gpus(
    n: int | None, *, total: int | None = None, lock_dir: Path = LOCK_DIR, wait_s: float = 120
) -> list[int] | None:
    """Give this job ``n`` GPUs of its own on this host and make them the only ones it sees.

    A job given none (``n`` 0: resources.gpu=0) sees none, so it runs on the CPU as its experiment
    says instead of on GPU 0, which a GPU job may hold. Nothing to do (None) by hand (``n`` None),
    when ``CUDA_VISIBLE_DEVICES`` is set already (SLURM sets it to the job's allocation; a user may
    set it by hand), or when there is no GPU.
    Otherwise the first ``n`` GPUs whose lock file no other process holds are taken (``flock``: the
    kernel releases them when the job's process ends, however it ends), and ``CUDA_VISIBLE_DEVICES``
    names them. The lock stays held across the training job's relaunch (the descriptors are
    inherited by ``exec``). A job that finds too few free GPUs waits ``wait_s`` for a finishing job to
    let go of its own, then fails.
    """
    if n == 0:
        os.environ[VISIBLE] = ""
        return None
    if n is None or VISIBLE in os.environ:
        return None
    total = cuda_device_count() if total is None else total
    if total == 0:
        return None
    if n > total:
        raise DeviceError(
            f"this job asks for {n} GPUs (resources gpu={n}) and this machine has {total}",
            hint=f"ask for at most {total}: the experiment's gpus, or --set-resources",
        )
    here = lock_dir / socket.gethostname()
    here.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        taken = _try_claim(n, total, here)
        if taken is not None:
            os.environ[VISIBLE] = ",".join(map(str, taken))
            log.info("GPUs: %s of %d (%s=%s)", taken, total, VISIBLE, os.environ[VISIBLE])
            return taken
        if time.monotonic() > deadline:
            raise DeviceError(
                f"this job needs {n} of this machine's {total} GPUs, and other jobs hold them (lock files in {here})",
                hint="give Snakemake --resources gpu=N no larger than the GPUs the jobs may share",
            )
        time.sleep(0.5)


def _try_claim(n: int, total: int, here: Path) -> list[int] | None:
    held: list[tuple[int, int]] = []
    for gpu in range(total):
        fd = os.open(here / f"gpu{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        held.append((gpu, fd))
        if len(held) == n:
            break
    if len(held) < n:
        for _, fd in held:
            os.close(fd)  # lets go of the lock
        return None
    for _, fd in held:
        os.set_inheritable(fd, True)
        _held.append(fd)
    return [gpu for gpu, _ in held]


def check_ranks(ranks: int, *, job_gpus: int | None, experiment_gpus: int | None, cuda_devices: int) -> None:
    """Refuse a training whose ranks do not match its GPUs, before any rank starts.

    ``job_gpus``: the job's ``resources.gpu`` (None when run by hand); ``experiment_gpus``: the
    experiment's ``gpus`` (None by hand); ``cuda_devices``: the GPUs the process sees.
    """
    if experiment_gpus and job_gpus is not None and job_gpus != experiment_gpus:
        raise DeviceError(
            f"train: the experiment asks for gpus: {experiment_gpus} but the job was given {job_gpus} "
            f"(resources gpu={job_gpus}: a profile's set-resources or --set-resources changed it); the "
            "global batch would silently change with the ranks",
            hint=f"make them equal: set the experiment's gpus to {job_gpus}, or the job's gpu to {experiment_gpus}",
        )
    if cuda_devices == 0:
        if job_gpus:
            log.warning(
                "train: the job was given %d GPU(s) but no CUDA device is visible: training on the CPU", job_gpus
            )
        return  # CPU ranks (gloo): any number
    if ranks > cuda_devices:
        raise DeviceError(
            f"train: {ranks} ranks, but this job sees {cuda_devices} GPU(s) "
            f"({VISIBLE}={os.environ.get(VISIBLE, 'unset')}); each rank needs a GPU of its own",
            hint=f"set the experiment's ranks (or gpus) to at most {cuda_devices}, or give the job more GPUs",
        )
    if job_gpus and ranks > job_gpus:
        raise DeviceError(
            f"train: {ranks} ranks, but the job was given {job_gpus} GPU(s) (resources gpu={job_gpus})",
            hint=f"set the experiment's ranks to at most {job_gpus}, or its gpus to {ranks}",
        )
    if ranks < cuda_devices:
        log.warning("train: %d rank(s) on %d visible GPUs: %d GPU(s) idle", ranks, cuda_devices, cuda_devices - ranks)


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" or "cpu"
    dtype: str  # a torch dtype's name


def inference_placement(job_gpus: int | None, cuda_devices: int, bf16_supported: bool, saved_dtype: str | None = None):
    """Where and in what dtype a job answers prompts (evaluate, replay generation).

    On the job's GPU when it was given one (``job_gpus`` > 0; None, by hand: whenever one is
    visible): in the model's own 16-bit dtype when it was saved in one (a merged fp16 model is
    then read exactly as written), else bf16 where the GPU has it, else fp16. On the CPU: fp32,
    where half precision has no fast kernels. A job given no GPU never takes one unannounced.
    """
    if cuda_devices == 0 or job_gpus == 0:
        if job_gpus:
            log.warning("the job was given %d GPU(s) but no CUDA device is visible: running on the CPU", job_gpus)
        return Placement("cpu", "float32")
    if saved_dtype == "float16" or (saved_dtype == "bfloat16" and bf16_supported):
        return Placement("cuda", saved_dtype)
    return Placement("cuda", "bfloat16" if bf16_supported else "float16")


def training_dtype(device: str, bf16_supported: bool) -> str:
    """The dtype a training computes in besides its fp32 loss, LoRA master weights, gradients and
    optimizer: on a GPU with bf16 the 4-bit matmuls' and the forward pass's (autocast) bf16. fp32
    everywhere else: small fp16 gradients underflow without loss scaling, which DeepSpeed gives only
    to weights it keeps in fp16 (these stay fp32), and on a CPU bf16 is slower than fp32."""
    return "bfloat16" if device == "cuda" and bf16_supported else "float32"


def placement_here(job_gpus: int | None, model_dir: str | os.PathLike | None = None) -> Placement:
    """:func:`inference_placement` for this process and the model saved in ``model_dir``."""
    import json

    import torch

    saved = None
    config = Path(model_dir, "config.json") if model_dir else None
    if config is not None and config.is_file():
        data = json.loads(config.read_text())
        saved = data.get("dtype") or data.get("torch_dtype")
    cuda = cuda_device_count()
    return inference_placement(job_gpus, cuda, bool(cuda) and torch.cuda.is_bf16_supported(), saved)


def inference_device(job_gpus: int | None, model_dir: str | os.PathLike | None = None) -> Placement:
    """A generating job's device and dtype: its own GPU on a local run (:func:`assign_gpus`), then
    :func:`placement_here` for the model saved in ``model_dir``."""
    assign_gpus(job_gpus)
    place = placement_here(job_gpus, model_dir)
    log.info("answering on %s in %s", place.device, place.dtype)
    return place


def agreed_minimum(value: int, device: str) -> int:
    """The smallest ``value`` over all ranks (the value itself alone).

    Whatever decides how many forward/backward passes a rank makes must be the same on every rank:
    ZeRO-2 reduces gradients on every backward, so a rank that makes one pass more than the others
    waits in a collective they never enter, until the timeout. The tensor lives on the rank's
    device: NCCL accepts only CUDA tensors.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=torch.cuda.current_device() if device == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def reduce_bucket_elements(trainable: int) -> int:
    """ZeRO-2's gradient bucket, in elements: DeepSpeed's default (5e8, 2 GB of fp32 per rank)
    allocated in full whatever the model trains; LoRA trains far fewer, so one bucket of them all."""
    return int(min(5e8, max(trainable, 1 << 20)))


def inference_bytes(config: dict, dtype_bytes: int, batch: int, tokens: int) -> int:
    """Weights plus the KV cache of ``batch`` sequences of ``tokens`` tokens, for a Llama-shaped
    decoder ``config`` (config.json's fields); activations of one step are small beside them."""
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = h // heads
    per_layer = h * (h + 2 * kv_heads * head_dim) + h * h + 3 * h * config["intermediate_size"]
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    weights = (layers * per_layer + embeddings) * dtype_bytes
    kv_cache = 2 * layers * kv_heads * head_dim * tokens * batch * dtype_bytes
    return weights + kv_cache
