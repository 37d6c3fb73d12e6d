"""Loading the model and tokenizer once, at worker start-up."""

from __future__ import annotations

import logging
import time
from typing import Any

from services.generator.settings import GeneratorSettings

logger = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    """``auto`` means CUDA when a GPU is visible, else CPU."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def resolve_dtype(requested: str) -> Any:
    """``auto`` keeps the dtype the checkpoint was saved in (bfloat16 for most chat
    models and for the prepared default model, which on this 2-core CPU also ran
    faster than float32: 40 vs 24 tokens/s)."""
    import torch

    if requested == "auto":
        return "auto"
    return getattr(torch, requested)


def load_model(settings: GeneratorSettings) -> tuple[Any, Any, str]:
    """Load ``MODEL_ID`` (hub id or local directory) at ``MODEL_REVISION`` with ``from_pretrained``.

    Returns ``(model, tokenizer, device)``. The same code serves the bundled
    SmolLM2 on a laptop CPU and a large chat model on a GPU; only settings differ.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype)
    started = time.perf_counter()
    # Both from the same revision: a tokenizer from another commit could disagree with the weights.
    revision = settings.model_revision or None
    tokenizer = AutoTokenizer.from_pretrained(
        settings.model_id, revision=revision, trust_remote_code=settings.trust_remote_code
    )
    model = AutoModelForCausalLM.from_pretrained(
        settings.model_id, revision=revision, dtype=dtype, trust_remote_code=settings.trust_remote_code
    )
    model.to(device)
    model.eval()
    logger.info(
        "loaded model %s (revision %s) on %s (%s) in %.1fs",
        settings.model_id,
        revision or "default",
        device,
        dtype,
        time.perf_counter() - started,
    )
    return model, tokenizer, device
