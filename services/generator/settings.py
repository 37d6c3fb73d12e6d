"""Typed settings of the generator pod, read from environment variables."""

from __future__ import annotations

import os
import re
import socket
from enum import Enum
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from services.common.contract import StopStrings
from services.common.settings import CommonSettings

#: Where `make run` / `scripts/prepare_model.py` put the default model.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / ".models" / "SmolLM2-135M-Instruct"


class Backend(str, Enum):
    """Which engine produces tokens."""

    TRANSFORMERS = "transformers"
    #: Benchmark/fault-drill backend: emits a deterministic reply at a fixed token
    #: rate without running any model. Never the default.
    SYNTHETIC = "synthetic"


class AttnImplementation(str, Enum):
    """Which attention kernels the model runs (``attn_implementation`` of ``from_pretrained``)."""

    #: Transformers' choice: ``sdpa`` for the models that support it, else ``eager``.
    AUTO = "auto"
    SDPA = "sdpa"
    EAGER = "eager"
    #: Needs the ``flash-attn`` package (CUDA only, bfloat16 or float16); the start fails without it.
    FLASH_ATTENTION_2 = "flash_attention_2"


#: DEVICE_MAP values that spread one model over several devices (accelerate's strategies);
#: any other non-empty value names the one device for all of it.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE_NAME = re.compile(r"(cpu|cuda|xpu|mps|npu|hpu)(:[0-9]+)?")


class GeneratorSettings(CommonSettings):
    """Everything a generator pod can be configured with."""

    model_id: str = Field(
        str(DEFAULT_MODEL_DIR),
        description="Hugging Face model id or local directory, loaded with from_pretrained.",
    )
    model_revision: str = Field(
        "",
        description="Hub revision of MODEL_ID that the tokenizer and the weights are both loaded from: best a full "
        "commit hash, since a branch or tag can be moved to other weights; a branch or tag name also works. Empty = "
        "the hub's default branch. Ignored for a local directory. The chart sets it from model.revision, and its "
        "download init container fetches the same revision.",
    )
    device: str = Field("auto", description="torch device: auto (cuda when available), cpu, cuda, cuda:1, ...")
    dtype: str = Field(
        "auto",
        description="Model dtype: auto (bfloat16 on a CUDA device; on CPU as saved in the checkpoint), float32, "
        "bfloat16, float16 (for GPUs without bfloat16, older than Ampere).",
    )
    attn_implementation: AttnImplementation = Field(
        AttnImplementation.AUTO,
        description="Attention kernels: auto (transformers' choice: sdpa for most models), sdpa, eager, or "
        "flash_attention_2 (needs the flash-attn package, a CUDA GPU and DTYPE bfloat16 or float16; the start fails "
        "without the package).",
    )
    device_map: str = Field(
        "",
        description="Empty: the whole model on DEVICE. For a model larger than one GPU: auto, balanced, "
        "balanced_low_0 or sequential spread its layers over the visible GPUs (then CPU memory); a device name "
        "(cuda:1) puts it all there; DEVICE is then not used, and inputs go to the device of the model's embedding. "
        "Needs the accelerate package, which the generator image does not ship: the start fails without it.",
    )
    torch_threads: int = Field(0, description="CPU threads for torch (0 = torch's default).")
    trust_remote_code: bool = Field(False, description="Pass trust_remote_code to from_pretrained.")
    max_new_tokens: int = Field(256, ge=1, description="Default cap on generated tokens per request.")
    max_new_tokens_limit: int = Field(4096, ge=1, description="Hard cap a request may ask for.")
    temperature: float = Field(0.2, ge=0.0, description="Default sampling temperature (0 = greedy).")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Default nucleus sampling mass.")
    top_k: int = Field(50, ge=0, description="Default top-k (0 = off).")
    repetition_penalty: float = Field(1.1, gt=0.0, description="Default repetition penalty (1 = off).")
    stop: StopStrings = Field(
        default_factory=list, description="Default stop strings (JSON list; at most 4, each at most 256 characters)."
    )
    generator_backend: Backend = Field(
        Backend.TRANSFORMERS, description="transformers, or synthetic: a benchmark and fault-drill backend that echoes the user's words at a "
        "fixed rate without a model. Never use it to serve users."
    )
    generator_slots: int = Field(
        1,
        ge=1,
        description="Concurrent requests per pod (the arq worker's max_jobs). Above 1 the transformers backend "
        "decodes them together in one batch (continuous batching); 1 runs them one after another.",
    )
    prefill_chunk_tokens: int = Field(
        512,
        ge=0,
        description="With GENERATOR_SLOTS above 1: most prompt tokens prefilled between two decode steps (chunked "
        "prefill), so a long prompt joins the batch in chunks while the running streams keep getting tokens; 0 "
        "prefills each prompt in one pass.",
    )
    prefix_cache_mb: int = Field(
        0,
        ge=0,
        description="Memory (MiB, on the model's device) for the key/value caches of finished conversations, least "
        "recently used evicted: a follow-up turn that starts with a cached prompt and reply prefills only its new "
        "tokens. Partitioned by tenant. 0 = off (the default until a stream seen hanging with it under a rolling update is understood).",
    )
    prefix_affinity_wait_ms: int = Field(
        20,
        ge=0,
        description="How long a queued job that continues a conversation cached on another live generator is left "
        "for that generator to claim before any generator takes it (0 = no affinity).",
    )
    synthetic_tokens_per_second: float = Field(50.0, gt=0.0, description="Token rate of the synthetic backend.")
    synthetic_fail_after_tokens: int = Field(-1, description="Fault drill: the synthetic backend raises after this many tokens (-1 = never).")
    synthetic_stall_after_tokens: int = Field(
        -1,
        description="Fault drill: the synthetic backend hangs after this many tokens, deaf to cancellation, as a wedged "
        "GPU would (-1 = never).",
    )
    worker_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="Name of this generator in registrations, stream entries and traces (default: host-pid; the chart sets the pod name).",
    )
    idle_poll_seconds: float = Field(
        0.5, gt=0.0, description="Fallback queue poll interval; new jobs normally wake the worker at once."
    )
    job_timeout_seconds: int = Field(600, ge=1, description="arq's hard limit on one job.")
    registration_ttl_seconds: float = Field(10.0, gt=0.0, description="A generator that stops renewing its registration is considered gone after this.")
    metrics_port: int = Field(9100, ge=0, le=65535, description="Port of the Prometheus metrics endpoint (0 = off).")
    drain_seconds: float = Field(
        60.0, ge=0.0, description="On SIGTERM: stop taking jobs and let running streams finish for up to this long, then exit 0. Keep it "
        "below the pod's terminationGracePeriodSeconds."
    )
    generator_stall_seconds: float = Field(
        120.0,
        ge=0.0,
        description="Watchdog: a generator whose engine has work but produced no token for this long (a hung GPU, a "
        "deadlock), or whose job loop has not turned, ends its running generations with generator_stalled, stops taking "
        "jobs and withdraws its registration, so its probes fail and Kubernetes restarts it (0 = off). Must exceed the "
        "longest prompt's prefill; at least 4 × (2 s + REDIS_SOCKET_TIMEOUT_SECONDS) + IDLE_POLL_SECONDS.",
    )
    cancel_check_seconds: float = Field(
        0.1,
        gt=0.0,
        description="How often a running job checks whether the API asked it to stop (and whether its permit is still live).",
    )

    @field_validator("device_map")
    @classmethod
    def _device_map_is_a_strategy_or_a_device(cls, value: str) -> str:
        value = value.strip()
        if value and value not in DEVICE_MAP_STRATEGIES and not _DEVICE_NAME.fullmatch(value):
            raise ValueError(
                f"DEVICE_MAP={value!r} is neither empty, one of {', '.join(DEVICE_MAP_STRATEGIES)}, nor a device "
                "name such as cuda:1"
            )
        return value

    @model_validator(mode="after")
    def _stall_limit_fits_a_redis_outage(self) -> GeneratorSettings:
        # One turn of the job loop: arq's poll and our claim (a few commands), then
        # the wait for a wake-up of up to IDLE_POLL_SECONDS.
        self.check_stall_limit("GENERATOR_STALL_SECONDS", self.generator_stall_seconds, 4, self.idle_poll_seconds)
        return self
