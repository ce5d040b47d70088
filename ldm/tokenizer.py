"""A CLIP tokenizer learned from the training captions, for text encoders trained from scratch.

The saved model must be a stock Stable Diffusion folder, whose `tokenizer/` `transformers.CLIPTokenizer` reads:
`vocab.json` + `merges.txt` of CLIP's byte-level BPE (Radford et al. 2021), with `</w>` marking word ends and
`<|startoftext|>` / `<|endoftext|>` as the last two ids. The merges are learned with the `tokenizers` library under
CLIP's own normalizer (NFC, collapsed whitespace, lower case) and pre-tokenizer (CLIP's word regex, then byte-level),
so that CLIPTokenizer splits every caption exactly as the trainer saw it. The vocabulary is then laid out as
OpenAI's CLIP builds it:

    256 byte symbols | the same 256 with "</w>" | one token per merge, in merge order | <|startoftext|> <|endoftext|>

so every byte sequence has a tokenization (no unknown tokens) however small the caption set was.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"
# CLIP's pre-tokenizer regex (transformers' CLIPTokenizer): special tokens, English contractions, letter runs,
# single digits, runs of other non-space characters.
CLIP_WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
NUM_BASE_SYMBOLS = 2 * 256  # byte symbols, with and without the word-end mark


def _clip_pipeline(model: BPE) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    return tokenizer


def learn_merges(captions: Iterable[str], max_merges: int) -> list[tuple[str, str]]:
    """BPE merges of the captions, most frequent first, at most `max_merges` (fewer when every word is one token)."""
    tokenizer = _clip_pipeline(BPE(end_of_word_suffix=WORD_END, continuing_subword_prefix=""))
    # The trainer breaks ties between equally frequent pairs by symbol id. Symbols it meets while reading the words
    # ("a</w>", ...) get ids in hash-map order, which changes from process to process, so the merges would too (and
    # a resumed run would learn other token ids). Registered up front, as special tokens, all 512 base symbols get
    # fixed ids: the same captions then give the same tokenizer in every process.
    symbols = bytes_to_unicode()
    trainer = BpeTrainer(
        vocab_size=NUM_BASE_SYMBOLS + max_merges, min_frequency=1, show_progress=False,
        special_tokens=symbols + [s + WORD_END for s in symbols], initial_alphabet=symbols,
        end_of_word_suffix=WORD_END,
    )
    tokenizer.train_from_iterator(captions, trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    # tokenizers writes [left, right] pairs (older versions: "left right" strings).
    pairs = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]
    return pairs[:max_merges]


def bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins of the bytes, in the order of CLIP's (and GPT-2's) `bytes_to_unicode` dict:
    printable bytes first (as themselves), then the others mapped to 256, 257, ..."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    codes, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def clip_vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id in OpenAI CLIP's layout (see the module docstring)."""
    symbols = bytes_to_unicode()
    tokens = symbols + [s + WORD_END for s in symbols] + ["".join(pair) for pair in merges]
    tokens += [START_TOKEN, END_TOKEN]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def save_clip_tokenizer_files(merges: list[tuple[str, str]], max_length: int, directory: str | Path) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json in CLIP's format."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocabulary(merges)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    specials = {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN, "pad_token": END_TOKEN}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True, **specials}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return directory


def build_clip_tokenizer(captions: Iterable[str], vocab_size: int, max_length: int, directory: str | Path):
    """Learn a CLIP tokenizer from `captions` (at most `vocab_size` tokens), save it to `directory`, load it back
    with transformers' CLIPTokenizer (so what training uses is what the saved folder gives)."""
    from transformers import CLIPTokenizer

    max_merges = vocab_size - NUM_BASE_SYMBOLS - 2
    if max_merges < 0:
        raise ValueError(f"denoiser.text_model.vocab_size={vocab_size} is below the {NUM_BASE_SYMBOLS + 2} byte and "
                         "special tokens every CLIP vocabulary holds")
    save_clip_tokenizer_files(learn_merges(captions, max_merges), max_length, directory)
    return CLIPTokenizer.from_pretrained(str(directory))
