"""A request's sampling parameters with the pod's defaults applied, and the logits
processors that turn them into a choice of the next token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.common.contract import SamplingParams
from services.generator.settings import GeneratorSettings


@dataclass(frozen=True)
class ResolvedSampling:
    """Sampling parameters with the generator's defaults filled in."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    stop: list[str]
    seed: int | None = None

    @classmethod
    def resolve(cls, params: SamplingParams, settings: GeneratorSettings) -> ResolvedSampling:
        """Apply defaults and the hard cap from settings."""
        max_new = params.max_new_tokens if params.max_new_tokens is not None else settings.max_new_tokens
        return cls(
            max_new_tokens=min(max_new, settings.max_new_tokens_limit),
            temperature=settings.temperature if params.temperature is None else params.temperature,
            top_p=settings.top_p if params.top_p is None else params.top_p,
            top_k=settings.top_k if params.top_k is None else params.top_k,
            repetition_penalty=settings.repetition_penalty
            if params.repetition_penalty is None
            else params.repetition_penalty,
            stop=list(params.stop) or list(settings.stop),
            seed=params.seed,
        )

    @property
    def greedy(self) -> bool:
        """Temperature 0: the most likely token every time."""
        return self.temperature <= 0


def logits_processors(sampling: ResolvedSampling) -> Any:
    """The logits processors ``model.generate`` would build for these parameters, in its order."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=sampling.repetition_penalty))
    if not sampling.greedy:
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k > 0:
            processors.append(TopKLogitsWarper(top_k=sampling.top_k))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=sampling.top_p))
    return processors
