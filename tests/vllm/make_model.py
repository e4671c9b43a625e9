#!/usr/bin/env python3
"""Build a tiny random-weight Llama model plus a byte-level BPE tokenizer, offline.

    python tests/vllm/make_model.py OUTDIR

Deterministic: fixed seeds, a sorted list of local text files for the tokenizer corpus.
Idempotent: does nothing when OUTDIR already holds a stamp for this recipe.
The weights are random, so generated text is meaningless, but prefill cost and
prefix-cache behaviour in vLLM are real.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Bump when anything below changes the produced files.
RECIPE = "tiny-llama-v1"
STAMP = ".kvmesh-model-stamp"

HIDDEN = 256
INTERMEDIATE = 768
LAYERS = 4
HEADS = 4
KV_HEADS = 2
VOCAB = 4096
MAX_POS = 16384
SEED = 0

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL = [BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Text present on any stock Debian (base-files). License texts are stable
# across releases, so the tokenizer is the same on every Debian machine.
CORPUS_DIRS = ["/usr/share/common-licenses"]
MIN_CORPUS_BYTES = 64 * 1024


def log(msg: str) -> None:
    print(f"[make_model] {msg}", flush=True)


def corpus_files() -> list[str]:
    seen, files = set(), []
    for d in CORPUS_DIRS:
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            real = os.path.realpath(path)
            if os.path.isfile(real) and real not in seen:
                seen.add(real)
                files.append(real)
    return files


def synthetic_corpus(n_bytes: int) -> str:
    """Fallback when the machine has too little local text: seeded pseudo-prose."""
    import random

    rng = random.Random(SEED)
    words = ("the of and to in is that for it as with was on be by this are or from at "
             "an not which have but all can were their will one has more other cache block "
             "prefix token model engine request server index event hash store memory time "
             "data value system program license software work source code copy").split()
    out, size = [], 0
    while size < n_bytes:
        sent = " ".join(rng.choice(words) for _ in range(rng.randint(5, 20))).capitalize() + ". "
        out.append(sent)
        size += len(sent)
    return "".join(out)


def corpus() -> tuple[list[str], str]:
    texts = []
    for f in corpus_files():
        with open(f, "rb") as fh:
            texts.append(fh.read().decode("utf-8", errors="replace"))
    joined = "".join(texts)
    if len(joined.encode()) < MIN_CORPUS_BYTES:
        log(f"only {len(joined)} bytes of local text; adding seeded synthetic text")
        texts.append(synthetic_corpus(MIN_CORPUS_BYTES))
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    return texts, digest


def build(out: Path) -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)

    texts, digest = corpus()
    log(f"training byte-level BPE (vocab {VOCAB}) on {len(texts)} texts, "
        f"{sum(len(t) for t in texts)} chars, sha256 {digest[:16]}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_POS,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)

    log(f"building Llama: hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, "
        f"{KV_HEADS} kv heads, vocab {VOCAB}, bf16")
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        initializer_range=0.02,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)
    (out / "kvmesh-model.json").write_text(json.dumps(
        {"recipe": RECIPE, "seed": SEED, "corpus_sha256": digest,
         "corpus_files": corpus_files()}, indent=1) + "\n")


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print(f"usage: {sys.argv[0]} OUTDIR", file=sys.stderr)
        return 2
    out = Path(sys.argv[1]).resolve()
    stamp = out / STAMP
    if stamp.is_file() and stamp.read_text().strip() == RECIPE:
        log(f"model up to date at {out}")
        return 0
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        build(tmp)
        (tmp / STAMP).write_text(RECIPE + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"model written to {out} ({size / 1e6:.1f} MB) in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
