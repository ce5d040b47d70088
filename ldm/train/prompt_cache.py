"""Prompt embeddings of a frozen pretrained text encoder, computed once and stored beside the latent cache.

A frozen encoder gives every caption the same embedding at every step, so running it (CLIP ViT-L/14's text tower:
123M parameters) each step would repeat the same work, as encoding the images would. Each distinct caption is
encoded once (eval mode, batched, no grad), including the empty caption that condition dropout trains on, and stored
as one row of a `datasets` data set (written with `save_to_disk`, read back memory-mapped, so it may exceed RAM).
Templated captions ("a photo of a {name}") thus cost one row per class, not one per image.

Layout: `<latent cache root>/prompt_embeds/<key>/`, where the key hashes the encoder's weights, its tokenizer's
maximum length and the sorted captions; a build writes to a temporary directory and renames it when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from datasets.arrow_writer import ArrowWriter

from ldm.text_encoder import PromptTokenizer, encode_prompts
from ldm.train.latent_cache import vae_fingerprint as weights_fingerprint

CAPTION, EMBEDS = "caption", "prompt_embeds"


class PromptEmbeddings:
    """Caption -> its cached (L, D) embedding, looked up by the row index of each caption."""

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset.with_format("torch", columns=[EMBEDS])
        self.row = {caption: i for i, caption in enumerate(dataset.with_format(None)[CAPTION])}

    def __len__(self) -> int:
        return len(self.row)

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in captions if c not in self.row]
        if missing:
            raise KeyError(f"no cached prompt embedding for {missing[0]!r}; the cache holds the training captions")
        return self.dataset[[self.row[c] for c in captions]][EMBEDS]


def cache_key(encoder, tokenizer: PromptTokenizer, captions: list[str]) -> str:
    digest = hashlib.sha256(weights_fingerprint(encoder).encode())
    digest.update(json.dumps({"max_length": tokenizer.max_length, "captions": captions}).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def build(encoder, tokenizer: PromptTokenizer, captions: list[str], path: Path, batch_size: int = 64) -> None:
    """Encode `captions` in batches, append them to one Arrow file (flat memory), save it atomically to `path`."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = None
    try:
        for start in range(0, len(captions), batch_size):
            chunk = captions[start:start + batch_size]
            embeds = encode_prompts(encoder, tokenizer.tokens(chunk)).float().cpu().numpy()
            if writer is None:
                features = datasets.Features({CAPTION: datasets.Value("string"),
                                              EMBEDS: datasets.Array2D(tuple(embeds.shape[1:]), "float32")})
                writer = ArrowWriter(features=features, path=str(tmp / "embeds.arrow"))
            writer.write_batch({CAPTION: chunk, EMBEDS: embeds})
        writer.finalize()
        datasets.Dataset.from_file(str(tmp / "embeds.arrow")).save_to_disk(str(tmp / "data"))
        os.replace(tmp / "data", path)
    except OSError:
        if not path.is_dir():  # only a concurrent builder that won the rename is not an error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_or_load(encoder, tokenizer: PromptTokenizer, captions: list[str], root: Path,
                  cpu: bool = False) -> PromptEmbeddings:
    """The cached embeddings of the distinct `captions` plus the empty one (built once across processes)."""
    captions = sorted(set(captions) | {""})
    path = Path(root) / "prompt_embeds" / cache_key(encoder, tokenizer, captions)
    state = PartialState(cpu=cpu)
    with state.main_process_first():
        action = "reused"
        if not path.is_dir():
            if not state.is_main_process:
                raise RuntimeError(f"the main process did not write the prompt embedding cache {path}")
            path.parent.mkdir(parents=True, exist_ok=True)
            build(encoder, tokenizer, captions, path)
            action = "built"
        embeddings = PromptEmbeddings(datasets.load_from_disk(str(path)))
    state.print(f"prompt embedding cache {action}: {path} ({len(embeddings)} captions)")
    return embeddings
