"""Build a tiny random-weight Qwen3 model folder for end-to-end tests against real vLLM.

No model can be downloaded on the test machines, so this makes one from scratch:
a 2-layer Qwen3ForCausalLM with random weights, a small byte-level BPE tokenizer
trained on text generated here, and a Qwen3-style ChatML chat template
(with `enable_thinking`). vLLM serves it like the real thing, including
`--reasoning-parser qwen3`, so tests exercise the real wire format. The output
is gibberish: tests must assert on shapes, counts and finish reasons, never text.

Run it with the vLLM venv's python (it needs torch, transformers, tokenizers):

    .vllm-venv/bin/python scripts/build_tiny_model.py [--output DIR] [--force]

Deterministic: a fixed seed and fixed training text give identical bytes on
every run. An existing complete folder built by the same BUILD_VERSION is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import model_folder  # scripts/model_folder.py, beside this file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

# Keep the tokenizers trainer single-threaded: fewer moving parts for determinism.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / ".models" / "tiny-qwen3"

# Bump whenever the output would change, so old folders are rebuilt.
BUILD_VERSION = 1
SEED = 1234
# Written last: its presence (with a matching build_version) marks a complete build.
META_FILE = model_folder.META_FILE
EXPECTED_FILES = (
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    META_FILE,
)

VOCAB_SIZE = 1024  # BPE vocabulary before the added tokens; small keeps the model tiny
# ChatML specials, as in Qwen3. `<think>`/`</think>` are added as NON-special
# tokens (as in Qwen3): the reasoning parser matches them by token id and they
# must survive skip_special_tokens. Qwen3's `<tool_call>` tokens are left out
# on purpose: a random model would sample them now and then and vLLM's qwen3
# parser would turn such outputs into tool calls, making tests flaky.
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_START, THINK_END = "<think>", "</think>"

# Qwen3's template reduced to what tests need: system/user/assistant turns,
# reasoning stripped from earlier assistant turns, and `enable_thinking=false`
# pre-filling an empty think block in the generation prompt.
CHAT_TEMPLATE = """\
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'assistant' %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# Fixed word list for the tokenizer's training text: no network, and unlike
# docstrings of the running Python it cannot change between interpreter versions.
WORDS = """
the a an of to in and or is are was be it this that with for on as by at from
not no yes true false none null if then else when while return value list dict
data set row column model server request response token text prompt answer
question think reason step first second third final result error retry batch
shard chunk split train test dataset generate sample seed temperature count
number one two three four five six seven eight nine ten hundred thousand
red green blue cat dog bird tree river mountain city house water fire light
quick brown fox jumps over lazy small large fast slow good bad new old
""".split()  # noqa: SIM905 (a word block reads better than a 130-line list)
PUNCT = [".", ",", "?", "!", ":", ";", "\n", "\n\n", " -", " (", ")", '"']


def training_text(rng: random.Random, lines: int = 4000) -> list[str]:
    """Sentences of fixed words, numbers, punctuation and a bit of JSON."""
    out = []
    for i in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        if i % 5 == 0:
            words.append(str(rng.randint(0, 99999)))
        sentence = " ".join(words).capitalize() + rng.choice(PUNCT)
        if i % 17 == 0:
            sentence += json.dumps({rng.choice(WORDS): rng.choice(WORDS), "n": rng.randint(0, 999)})
        out.append(sentence)
    return out


def build_tokenizer(rng: random.Random) -> PreTrainedTokenizerFast:
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, IM_START, IM_END],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(training_text(rng), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen3ForCausalLM:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention rejects head_dim 16
        max_position_embeddings=2048,  # >= any --max-model-len tests use
        # Tied embeddings make greedy decoding repeat the last prompt token (the
        # residual stream is dominated by the input embedding): temperature 0
        # after ChatML's "assistant\n" yields "\n" forever, so stop ["\n\n"]
        # ends it at once with finish_reason "stop". Tests rely on that.
        tie_word_embeddings=True,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    return model


def is_complete(folder: Path) -> bool:
    meta = model_folder.read_meta(folder, EXPECTED_FILES)
    return meta is not None and meta.get("build_version") == BUILD_VERSION and meta.get("seed") == SEED


def build(output: Path) -> dict:
    from transformers.utils import logging as hf_logging

    # The one-shard "Writing model shards" progress bar is noise.
    hf_logging.disable_progress_bar()
    rng = random.Random(SEED)
    tokenizer = build_tokenizer(rng)
    model = build_model(tokenizer, SEED)
    meta = {
        "think_start_token_id": tokenizer.convert_tokens_to_ids(THINK_START),
        "think_end_token_id": tokenizer.convert_tokens_to_ids(THINK_END),
        "eos_token_id": tokenizer.convert_tokens_to_ids(IM_END),
        "vocab_size": len(tokenizer),
        "build_version": BUILD_VERSION,
        "seed": SEED,
    }
    model_folder.save(output, model, tokenizer, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="model folder")
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args(argv)
    output = args.output.resolve()

    if not args.force and is_complete(output):
        meta = json.loads((output / META_FILE).read_text())
        print(f"tiny model up to date: {output}")
    else:
        print(f"building tiny model: {output}")
        meta = build(output)
    print(f"think_start_token_id={meta['think_start_token_id']} think_end_token_id={meta['think_end_token_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
