"""The engine a generator pod runs, chosen by its settings.

In its own module so that no engine or decoder module imports another to choose:
the engine drives a decoder through a protocol, and only this chooser knows them all.
"""

from __future__ import annotations

import logging

from services.generator.batching import BatchScheduler
from services.generator.decoding import Decoder, SequentialDecoder
from services.generator.engine import Engine, SyntheticEngine, TransformersEngine
from services.generator.prefix_cache import PrefixCache
from services.generator.settings import Backend, GeneratorSettings

logger = logging.getLogger(__name__)


def create_engine(settings: GeneratorSettings) -> Engine:
    """The engine selected by ``GENERATOR_BACKEND`` and, for transformers, its decoder by
    ``GENERATOR_SLOTS``: 1 runs ``model.generate`` per request, more batch them."""
    if settings.generator_backend is Backend.SYNTHETIC:
        logger.warning("GENERATOR_BACKEND=synthetic: no model runs; replies are a fixed echo (benchmarks only)")
        return SyntheticEngine(settings)
    from services.generator.model_loader import load_model

    model, tokenizer, device = load_model(settings)
    prefix_cache = PrefixCache(settings.prefix_cache_mb * 1024 * 1024)
    decoder: Decoder
    if settings.generator_slots > 1:
        decoder = BatchScheduler(model, device, settings.generator_slots, settings.prefill_chunk_tokens, prefix_cache)
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        decoder = SequentialDecoder(model, device, pad, prefix_cache)
    return TransformersEngine(settings.model_id, model, tokenizer, decoder)
