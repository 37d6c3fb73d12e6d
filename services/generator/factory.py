"""The engine a generator pod runs, chosen by its settings.

In its own module so that neither engine module imports the other: the batching
engine builds on the transformers one, and only this chooser knows both.
"""

from __future__ import annotations

import logging

from services.generator.batching import BatchingEngine
from services.generator.engine import Engine, SyntheticEngine, TransformersEngine
from services.generator.settings import Backend, GeneratorSettings

logger = logging.getLogger(__name__)


def create_engine(settings: GeneratorSettings) -> Engine:
    """The engine selected by ``GENERATOR_BACKEND`` and, for transformers, ``GENERATOR_SLOTS``."""
    if settings.generator_backend is Backend.SYNTHETIC:
        logger.warning("GENERATOR_BACKEND=synthetic: no model runs; replies are a fixed echo (benchmarks only)")
        return SyntheticEngine(settings)
    if settings.generator_slots > 1:
        return BatchingEngine(settings)
    return TransformersEngine(settings)
