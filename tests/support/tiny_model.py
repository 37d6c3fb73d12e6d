"""Build a tiny random-weight chat model directory for fast, offline tests.

The directory mimics the layout and token conventions of the real default model
(SmolLM2-135M-Instruct): a byte-level BPE tokenizer with the ChatML special tokens
at the same ids (``<|endoftext|>``=0, ``<|im_start|>``=1, ``<|im_end|>``=2), a ChatML
chat template, eos = pad = ``<|im_end|>``, and a ``LlamaForCausalLM`` with grouped-query
attention. Everything is tiny (2 layers, hidden size 64, vocab under 1k) so that it
builds in a few seconds and generates hundreds of tokens per second on a CPU.

Both the tokenizer training and the weight init are deterministic, so two builds
produce the same model and the same greedy outputs.

Random weights would emit ``<|im_end|>`` at an arbitrary step and make "generate N
tokens" tests flaky. The model is therefore wired (see ``_suppress_tokens``) so that
it never generates:

* special tokens, so greedy and sampled generation both run to ``max_new_tokens``;
* byte tokens that are not valid UTF-8 on their own (e.g. a lone ``0xC3``), so the
  generated text is clean and decoding token by token equals decoding all at once.

Nothing is suppressed through the generation config, so a test that needs an early
stop must ask for it itself (a stop string, another ``eos_token_id``, a logits
processor). Split multi-byte characters still occur when *encoding* text (``"😀"`` is
four byte tokens), which is how to test incremental UTF-8 decoding with this model.

Usage::

    python -m tests.support.tiny_model OUTPUT [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

MARKER_NAME = ".built"
# Bump whenever the recipe below changes, so cached directories are rebuilt.
RECIPE_VERSION = 1

SEED = 0
VOCAB_SIZE = 768
MAX_POSITION_EMBEDDINGS = 512

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Order fixes the ids (0, 1, 2), matching SmolLM2.
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Residual-stream dimension that is held constant (see `_suppress_tokens`).
_CONST_DIM = 0
# The constant's size matches the other embedding entries (init std 0.02), so it does
# not dominate the RMS norms and the rest of the network behaves like a random model.
_CONST_VALUE = 0.02
# Weight from the constant onto suppressed tokens' logits; the normalised constant is
# at least ~0.05, which puts those logits hundreds below every other one (|logit| < 1).
_SUPPRESS_PENALTY = 1e4

# Small, fixed training text: enough merges for a vocab of a few hundred tokens that
# covers chat-style English, digits, punctuation and some multi-byte UTF-8.
_CORPUS_LINES = [
    "Hello! How can I help you today?",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a short story about a robot who learns to paint.",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sorry, but I can't help with that request.",
    "Sure, here is a summary of the main points.",
    "Streaming responses send tokens to the client as soon as they are generated.",
    "The server returned an error: timeout after 30 seconds.",
    "Let's count: one, two, three, four, five, six, seven, eight, nine, ten.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 are common.",
    "def add(a, b):\n    return a + b\n",
    "The assistant answers questions politely and concisely.",
    "User: tell me a joke.\nAssistant: Why did the chicken cross the road?",
    "Water boils at 100 degrees Celsius at sea level.",
    "Thank you for your patience; the request is being processed.",
    "A café in Zürich serves crème brûlée — naïve but délicieux.",
    "こんにちは世界。日本語のテキストです。",
    "Emoji are multi-byte too: 😀 🚀 ✨",
    "JSON looks like {\"role\": \"user\", \"content\": \"hi\"}.",
    "Markdown uses **bold**, _italics_ and `code` spans.",
]


def is_built(output: Path) -> bool:
    """Return True if ``output`` holds a tiny model built by the current recipe."""
    try:
        payload = json.loads((output / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and payload.get("recipe_version") == RECIPE_VERSION


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train the deterministic byte-level BPE tokenizer and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    # Byte-level end to end: every string encodes, and decoding is lossless.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so text unlike the corpus still encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS_LINES * 4, trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=IM_START,
        eos_token=IM_END,
        unk_token=ENDOFTEXT,
        pad_token=IM_END,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        chat_template=CHAT_TEMPLATE,
        # The cleanup would turn " ," into "," and break decode(encode(text)) == text.
        clean_up_tokenization_spaces=False,
    )


def _ids_to_suppress(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Special tokens, plus tokens that decode to U+FFFD alone (partial UTF-8 sequences)."""
    partial = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]
    return sorted(set(tokenizer.all_special_ids) | set(partial))


def _suppress_tokens(model: LlamaForCausalLM, token_ids: list[int]) -> None:
    """Make ``token_ids`` practically impossible to generate.

    Llama's output head has no bias, so one is emulated: residual dimension
    ``_CONST_DIM`` is set to the same positive value in every token embedding and no
    attention or MLP block writes to it, so it reaches the final RMSNorm unchanged and
    comes out positive for every position. Its column in the output head is zero except
    for a large negative weight on ``token_ids``. Greedy and sampled decoding then never
    pick them, while all other logits stay those of a random model.
    """
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[:, _CONST_DIM] = _CONST_VALUE
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[_CONST_DIM, :] = 0.0
            layer.mlp.down_proj.weight[_CONST_DIM, :] = 0.0
        model.lm_head.weight[:, _CONST_DIM] = 0.0
        model.lm_head.weight[token_ids, _CONST_DIM] = -_SUPPRESS_PENALTY


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Create the seeded random-weight ``LlamaForCausalLM`` matching ``tokenizer``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        # Grouped-query attention like the real model, so cache shapes are exercised alike.
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        # Untied so the output head can be edited without touching the embeddings.
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # fork_rng keeps callers' RNG streams untouched by the fixed seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.eval()
    _suppress_tokens(model, _ids_to_suppress(tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def _marker_payload() -> dict[str, Any]:
    return {"recipe_version": RECIPE_VERSION, "seed": SEED}


def _apply_default_permissions(root: Path) -> None:
    """Give ``root`` and its files the modes a plain mkdir/open would have.

    mkdtemp creates 0700 directories and save_pretrained writes 0600 weight files,
    which would lock out a test that runs the service as another user.
    """
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def build_tiny_model(output: Path, *, force: bool = False) -> Path:
    """Make sure ``output`` holds the tiny test model; return ``output``.

    Idempotent: a directory carrying the current marker is reused as is (unless
    ``force``). The model is written to a sibling temp directory, the marker last, and
    moved into place with one rename, so concurrent test workers never see a partial
    directory.
    """
    output = Path(output).resolve()
    if not force and is_built(output):
        return output

    output.parent.mkdir(parents=True, exist_ok=True)
    # Same parent directory, so the final rename cannot cross filesystems.
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER_NAME).write_text(json.dumps(_marker_payload()) + "\n")
        _apply_default_permissions(tmp)

        if output.exists():
            if not force and is_built(output):
                return output  # a concurrent build won the race
            shutil.rmtree(output)
        try:
            os.replace(tmp, output)
        except OSError:
            # A concurrent build moved its copy in between our rmtree and rename.
            if is_built(output):
                return output
            raise
        return output
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description="Build the tiny random-weight test model.")
    parser.add_argument("output", type=Path, help="directory to create")
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    reused = not args.force and is_built(args.output.resolve())
    path = build_tiny_model(args.output, force=args.force)
    action = "reused" if reused else "built"
    print(f"{action} tiny model at {path} in {time.perf_counter() - started:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
