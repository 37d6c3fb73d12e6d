"""Loading the model and tokenizer once, at worker start-up."""

from __future__ import annotations

import importlib.util
import logging
import time
from typing import Any

from services.generator.settings import DEVICE_MAP_STRATEGIES, AttnImplementation, GeneratorSettings

logger = logging.getLogger(__name__)


class MissingPackageError(RuntimeError):
    """A setting asks for an optional package that is not installed: the start fails
    with what to install or which setting to change, before anything is loaded."""


def check_optional_packages(settings: GeneratorSettings) -> None:
    """Fail at once when ``ATTN_IMPLEMENTATION`` or ``DEVICE_MAP`` needs a package this
    environment lacks (neither is in the generator's requirements: flash-attn is built
    per torch and CUDA version, accelerate only matters for multi-GPU models)."""
    if settings.attn_implementation is AttnImplementation.FLASH_ATTENTION_2 and not _installed("flash_attn"):
        raise MissingPackageError(
            "ATTN_IMPLEMENTATION=flash_attention_2 needs the flash-attn package, which is not installed: install a "
            "flash-attn build for this torch and CUDA into the generator's environment, or set ATTN_IMPLEMENTATION "
            "to sdpa (or auto)"
        )
    if settings.device_map and not _installed("accelerate"):
        raise MissingPackageError(
            f"DEVICE_MAP={settings.device_map} needs the accelerate package, which is not installed (the generator "
            "image does not ship it): pip install accelerate into the generator's environment, or leave DEVICE_MAP "
            "empty to put the whole model on DEVICE"
        )


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve_device(requested: str) -> str:
    """``auto`` means CUDA when a GPU is visible, else CPU."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def resolve_dtype(requested: str, device: str) -> Any:
    """``auto`` is bfloat16 on a CUDA device (half of float32's memory and bandwidth, and
    what chat models are trained and saved in), and on CPU the dtype the checkpoint was
    saved in (bfloat16 for the prepared default model, which on this 2-core CPU also ran
    faster than float32: 40 vs 24 tokens/s)."""
    import torch

    if requested == "auto":
        return torch.bfloat16 if device.startswith("cuda") else "auto"
    return getattr(torch, requested)


def weights_device(settings: GeneratorSettings) -> str:
    """Where the weights go, as far as ``DTYPE=auto`` is concerned: the device
    ``DEVICE_MAP`` names, CUDA (when visible) for a strategy spreading the model over
    GPUs, else ``DEVICE``."""
    if settings.device_map in DEVICE_MAP_STRATEGIES:
        return resolve_device("auto")
    return settings.device_map or resolve_device(settings.device)


def load_model(settings: GeneratorSettings) -> tuple[Any, Any, str]:
    """Load ``MODEL_ID`` (hub id or local directory) at ``MODEL_REVISION`` with ``from_pretrained``.

    Returns ``(model, tokenizer, device)``, where ``device`` is where inputs go: ``DEVICE``,
    or with ``DEVICE_MAP`` the device of the model's input embedding. The same code serves
    the bundled SmolLM2 on a laptop CPU and a large chat model on one or several GPUs;
    only settings differ.
    """
    check_optional_packages(settings)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    device = weights_device(settings)
    dtype = resolve_dtype(settings.dtype, device)
    started = time.perf_counter()
    # Both from the same revision: a tokenizer from another commit could disagree with the weights.
    revision = settings.model_revision or None
    tokenizer = AutoTokenizer.from_pretrained(
        settings.model_id, revision=revision, trust_remote_code=settings.trust_remote_code
    )
    options: dict[str, Any] = {}
    if settings.attn_implementation is not AttnImplementation.AUTO:
        options["attn_implementation"] = settings.attn_implementation.value
    if settings.device_map:
        # accelerate places (and for a strategy, splits) the weights while loading them.
        options["device_map"] = settings.device_map
    model = AutoModelForCausalLM.from_pretrained(
        settings.model_id, revision=revision, dtype=dtype, trust_remote_code=settings.trust_remote_code, **options
    )
    if settings.device_map:
        device = str(model.get_input_embeddings().weight.device)
    else:
        model.to(device)
    model.eval()
    logger.info(
        "loaded model %s (revision %s) on %s (%s, attention %s%s) in %.1fs",
        settings.model_id,
        revision or "default",
        device,
        model.dtype,
        model.config._attn_implementation,
        f", device_map {settings.device_map}" if settings.device_map else "",
        time.perf_counter() - started,
    )
    return model, tokenizer, device
