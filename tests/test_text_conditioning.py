"""Text conditioning pieces: the CLIP tokenizer learned from captions, prompt tokenization and truncation, condition
dropout, pretrained frozen encoders (CLIP and T5) from local folders, and their cached prompt embeddings."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import datasets
import pytest
import torch
from helpers import run, tiny_config
from tokenizers import pre_tokenizers
from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

from ldm.config import TextModelConfig
from ldm.pipelines.loading import load_pipeline
from ldm.text_encoder import (
    CaptionTruncationWarning,
    PromptTokenizer,
    build_text_encoder,
    encode_prompts,
    hidden_size,
    load_pretrained_text_encoder,
)
from ldm.tokenizer import END_TOKEN, START_TOKEN, build_clip_tokenizer
from ldm.train.prompt_cache import PromptEmbeddings
from ldm.train.text_conditioning import TextConditioning
from ldm.train.unet import train_unet
from ldm.train.vae import train_vae

# Words of equal frequency make many equally frequent pairs, whose tie-breaking the determinism test checks.
CAPTIONS = ([f"a handwritten digit {name}" for name in "0123456789"] * 3 + ["A RED Car, on the road!"]
            + [f"{a}{b}{c} {c}{b}{a}" for a in "xyzw" for b in "qrst" for c in "klmn"])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_clip_tokenizer(CAPTIONS, vocab_size=4096, max_length=8, directory=path)
    return path


def test_tokenizer_is_in_clip_format(tokenizer_dir, tmp_path):
    # Only the two files of OpenAI's format: what any CLIP tokenizer reader needs.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, tmp_path / name)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    tokens = list(vocab)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    assert set(tokens[:256]) == set(pre_tokenizers.ByteLevel.alphabet())
    assert tokens[256:512] == [t + "</w>" for t in tokens[:256]]
    assert tokens[-2:] == [START_TOKEN, END_TOKEN]
    assert (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\n")

    ids = tokenizer("A Handwritten  DIGIT 7").input_ids  # lower-cased, whitespace collapsed
    assert tokenizer.convert_ids_to_tokens(ids) == [START_TOKEN, "a</w>", "handwritten</w>", "digit</w>", "7</w>",
                                                    END_TOKEN]
    # A word never seen is spelled from byte symbols: no unknown token, and it decodes back.
    unseen = tokenizer("zebra crossing").input_ids
    assert tokenizer.eos_token_id not in unseen[1:-1] and len(unseen) > 4
    assert tokenizer.decode(unseen, skip_special_tokens=True) == "zebra crossing"
    assert CLIPTokenizer.from_pretrained(str(tokenizer_dir)).model_max_length == 8


def test_tokenizer_is_the_same_in_every_process_and_caption_order(tokenizer_dir, tmp_path):
    # tokenizers' trainer breaks ties by symbol ids that, unless fixed, follow a per-process hash order: a resumed
    # run, or another process of a multi-process run, would then learn other token ids.
    code = ("import sys; from ldm.tokenizer import build_clip_tokenizer; from test_text_conditioning import CAPTIONS; "
            "build_clip_tokenizer(CAPTIONS[::-1], vocab_size=4096, max_length=8, directory=sys.argv[1])")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "other")], check=True, env=env, timeout=120)
    rng = random.Random(0)
    for i in range(3):
        shuffled = rng.sample(CAPTIONS, len(CAPTIONS))
        build_clip_tokenizer(shuffled, vocab_size=4096, max_length=8, directory=tmp_path / str(i))
    for directory in (tmp_path / "other", tmp_path / "0", tmp_path / "1", tmp_path / "2"):
        for name in ("vocab.json", "merges.txt"):
            assert (directory / name).read_bytes() == (tokenizer_dir / name).read_bytes(), (directory, name)


def test_long_captions_are_truncated_with_one_warning(tokenizer_dir):
    tokenizer = PromptTokenizer(CLIPTokenizer.from_pretrained(str(tokenizer_dir)))
    captions = ["a handwritten digit 7", "a handwritten digit 7 on a red car on the road"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first, second = tokenizer(captions), tokenizer(captions)
    truncation = [w for w in record if issubclass(w.category, CaptionTruncationWarning)]
    assert len(truncation) == 1
    assert re.search("1 of 2 captions are longer than .* 8 tokens", str(truncation[0].message))
    assert torch.equal(first, second) and first.shape == (2, 8)
    end = tokenizer.tokenizer.eos_token_id
    assert first[0, 5:].tolist() == [end] * 3  # padded with the end token, as Stable Diffusion's tokenizer pads
    assert first[1, -1] == end and (first[1] != end).sum() == 7  # cut, and still ended


def test_caption_dropout_trains_on_the_empty_prompt(tokenizer_dir):
    tokenizer = PromptTokenizer(CLIPTokenizer.from_pretrained(str(tokenizer_dir)))
    conditioning = TextConditioning(tokenizer, cond_dropout=0.25, guidance_scale=2.0, prompts=["x"], prompt_labels=None)
    seen = []
    captions = ["a handwritten digit 3"] * 4000
    torch.manual_seed(0)
    conditioning.model_output(lambda x, t, ids: seen.append(ids), torch.zeros(1), None, {"caption": captions}, True)
    conditioning.model_output(lambda x, t, ids: seen.append(ids), torch.zeros(1), None, {"caption": captions}, False)
    empty = tokenizer([""])[0]
    dropped = (seen[0] == empty).all(dim=1)
    assert 0.22 < dropped.float().mean() < 0.28
    assert torch.equal(seen[0][~dropped][0], tokenizer(captions[:1])[0]) and not (seen[1] == empty).all(dim=1).any()


def _save_encoder_folder(tokenizer_dir: Path, path: Path, kind: str) -> Path:
    """A local 'pretrained' encoder folder (what a Hub snapshot holds): config, weights, tokenizer files."""
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    if kind == "clip":
        encoder = build_text_encoder(TextModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                                     tokenizer)
    else:
        encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=24, d_kv=12, d_ff=48, num_layers=1,
                                          num_heads=2, pad_token_id=tokenizer.pad_token_id))
    encoder.save_pretrained(path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    return path


@pytest.mark.parametrize("kind, cls, width", [("clip", CLIPTextModel, 32), ("t5", T5EncoderModel, 24)])
def test_pretrained_encoders_load_frozen_from_a_folder(tokenizer_dir, tmp_path, kind, cls, width):
    encoder, tokenizer = load_pretrained_text_encoder(str(_save_encoder_folder(tokenizer_dir, tmp_path / kind, kind)))
    assert type(encoder) is cls and not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert hidden_size(encoder) == width
    context = encode_prompts(encoder, PromptTokenizer(tokenizer).tokens(["a handwritten digit 1", ""]))
    assert context.shape == (2, 8, width)


def test_unsupported_or_missing_encoders_are_clear_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="is a 'bert' model; expected a CLIP text model or a T5 encoder"):
        load_pretrained_text_encoder(str(tmp_path))
    with pytest.raises(ValueError, match="cannot load denoiser.text_encoder"):
        load_pretrained_text_encoder(str(tmp_path / "missing"))


def test_frozen_encoder_trains_from_cached_prompt_embeddings(tokenizer_dir, tmp_path, capsys):
    encoder_dir = _save_encoder_folder(tokenizer_dir, tmp_path / "clip", "clip")
    out = tmp_path / "run"
    overrides = {"denoiser.conditioning": "text", "denoiser.text_encoder": str(encoder_dir),
                 "denoiser.train.max_steps": 2,
                 "data.caption_template": "a handwritten digit {name}", "vae.train.max_steps": 2,
                 "denoiser.train.checkpointing_steps": 0, "denoiser.train.sample_every": 0}
    run(train_vae, tiny_config(out, **overrides))
    run(train_unet, tiny_config(out, **overrides))
    assert "prompt embedding cache built" in capsys.readouterr().out
    caches = list((out / "latent_cache" / "prompt_embeds").iterdir())
    assert len(caches) == 1
    pipe = load_pipeline(out / "pipeline")
    assert pipe.unet.config.cross_attention_dim == 32
    frozen = CLIPTextModel.from_pretrained(encoder_dir)
    for (name, saved), original in zip(pipe.text_encoder.state_dict().items(), frozen.state_dict().values()):
        assert torch.equal(saved, original), name  # the encoder stayed frozen
    with torch.no_grad():  # the cache holds the encoder's own output for every caption, and for ""
        tokens = PromptTokenizer(pipe.tokenizer).tokens(["a handwritten digit 4", ""])
        cached = PromptEmbeddings(datasets.load_from_disk(str(caches[0])))
        assert len(cached) == 11
        torch.testing.assert_close(cached(["a handwritten digit 4", ""]), encode_prompts(frozen, tokens))
    run(train_unet, tiny_config(out, **overrides))
    assert "prompt embedding cache reused" in capsys.readouterr().out
