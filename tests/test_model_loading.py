"""How the generator places a model by configuration: ATTN_IMPLEMENTATION, DEVICE_MAP, DTYPE.

CPU only and offline: the tiny test model is loaded with the generator's real loader. What
needs a GPU (bfloat16 kernels, flash-attn, a model spread over several GPUs) is checked by
``bench/gpu_check.py`` on a GPU machine, never here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from services.generator.model_loader import MissingPackageError, load_model, resolve_dtype, weights_device
from services.generator.settings import AttnImplementation, GeneratorSettings

HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def test_attention_implementation_is_read_from_the_environment_and_bad_values_are_refused(monkeypatch) -> None:
    monkeypatch.delenv("ATTN_IMPLEMENTATION", raising=False)
    assert GeneratorSettings().attn_implementation is AttnImplementation.AUTO
    for value in ("sdpa", "eager", "flash_attention_2"):
        monkeypatch.setenv("ATTN_IMPLEMENTATION", value)
        assert GeneratorSettings().attn_implementation.value == value
    monkeypatch.setenv("ATTN_IMPLEMENTATION", "flash")
    with pytest.raises(ValidationError) as refused:
        GeneratorSettings()
    message = str(refused.value)
    assert "attn_implementation" in message and all(v in message for v in ("sdpa", "eager", "flash_attention_2"))


def test_device_map_takes_a_strategy_or_one_device_and_refuses_anything_else(monkeypatch) -> None:
    monkeypatch.delenv("DEVICE_MAP", raising=False)
    assert GeneratorSettings().device_map == ""
    for value in ("auto", "balanced", "balanced_low_0", "sequential", "cpu", "cuda", "cuda:1"):
        monkeypatch.setenv("DEVICE_MAP", value)
        assert GeneratorSettings().device_map == value
    for value in ("everywhere", "cuda:one", "{'': 0}"):
        monkeypatch.setenv("DEVICE_MAP", value)
        with pytest.raises(ValidationError, match="DEVICE_MAP"):
            GeneratorSettings()


def test_dtype_auto_is_bfloat16_on_cuda_and_as_saved_on_cpu() -> None:
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("auto", "cuda:1") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") == "auto"  # from_pretrained keeps the checkpoint's dtype
    assert resolve_dtype("float16", "cuda") is torch.float16
    assert resolve_dtype("float32", "cpu") is torch.float32
    # Where DTYPE=auto looks: DEVICE, or the device DEVICE_MAP names, or a GPU for a strategy when one is visible.
    assert weights_device(GeneratorSettings(device="cpu")) == "cpu"
    assert weights_device(GeneratorSettings(device="cpu", device_map="cuda:1")) == "cuda:1"
    gpu_or_cpu = "cuda" if torch.cuda.is_available() else "cpu"
    assert weights_device(GeneratorSettings(device="cpu", device_map="auto")) == gpu_or_cpu


def test_the_loader_runs_the_attention_implementation_asked_for(tiny_model: Path) -> None:
    for asked, runs in (("eager", "eager"), ("sdpa", "sdpa"), ("auto", "sdpa")):
        settings = GeneratorSettings(model_id=str(tiny_model), device="cpu", attn_implementation=asked)
        model, _, device = load_model(settings)
        assert (model.config._attn_implementation, device) == (runs, "cpu"), asked
        assert model.dtype is torch.float32  # DTYPE=auto on CPU: as the tiny model was saved


@pytest.mark.skipif(HAS_FLASH_ATTN, reason="flash-attn is installed here: nothing to refuse")
def test_flash_attention_without_flash_attn_fails_the_start_with_what_to_do(tiny_model: Path) -> None:
    settings = GeneratorSettings(model_id=str(tiny_model), device="cpu", attn_implementation="flash_attention_2")
    with pytest.raises(MissingPackageError) as refused:
        load_model(settings)
    message = str(refused.value)
    assert "ATTN_IMPLEMENTATION=flash_attention_2" in message and "flash-attn" in message and "sdpa" in message


@pytest.mark.skipif(HAS_ACCELERATE, reason="accelerate is installed here: nothing to refuse")
def test_device_map_without_accelerate_fails_the_start_with_what_to_do(tiny_model: Path) -> None:
    with pytest.raises(MissingPackageError) as refused:
        load_model(GeneratorSettings(model_id=str(tiny_model), device_map="auto"))
    message = str(refused.value)
    assert "DEVICE_MAP=auto" in message and "pip install accelerate" in message and "DEVICE" in message


@pytest.mark.skipif(not HAS_ACCELERATE, reason="DEVICE_MAP needs accelerate, which requirements-dev.lock leaves out")
def test_device_map_places_the_model_and_inputs_go_to_its_embedding(tiny_model: Path) -> None:
    # DEVICE names a device that does not exist here: with DEVICE_MAP set it must not be used.
    model, _, device = load_model(GeneratorSettings(model_id=str(tiny_model), device="cuda:7", device_map="cpu"))
    assert device == "cpu" and model.get_input_embeddings().weight.device.type == "cpu"
    logits = model(input_ids=torch.tensor([[1, 5, 9]], device=device)).logits
    assert logits.shape[:2] == (1, 3)
