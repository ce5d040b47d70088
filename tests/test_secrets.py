"""The Hub token is used, but never printed, logged or written: a run trained with HF_TOKEN in its environment, then
pushed to the local Hub stand-in (which insists on that token), leaves the token in no file and no output."""

import subprocess
import sys
from pathlib import Path

from helpers import run, tiny_config
from hub_stand_in import HubStandIn
from test_hub import hub_env

from ldm.train.unet import train_unet
from ldm.train.vae import train_vae

TOKEN = "hf_SecretTokenThatMustNeverBeWritten0123456789"


def files_holding(root: Path, secret: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_token_is_sent_to_the_hub_and_never_written_or_printed(tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    steps = {f"{stage}.train.{key}": value for stage in ("vae", "unet")
             for key, value in (("max_steps", 2), ("checkpointing_steps", 1), ("sample_every", 1))}
    run(train_vae, tiny_config(out, **steps))
    run(train_unet, tiny_config(out, **steps))
    assert list((out / "unet" / "logs").rglob("events.out.tfevents.*")) and (out / "pipeline").is_dir()

    with HubStandIn(token=TOKEN) as hub:
        env = hub_env(hub.url, tmp_path / "hf_home") | {"HF_TOKEN": TOKEN}
        pushed = subprocess.run([sys.executable, "-m", "ldm.cli", "push", "--model", str(out / "pipeline"),
                                 "--repo_id", "me/secret-test"], capture_output=True, text=True, env=env,
                                timeout=120, check=False)
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        # The push did authenticate with the token...
        assert hub.state.tokens_seen and set(hub.state.tokens_seen) == {TOKEN}
        uploaded = hub.state.repos["me/secret-test"]
        assert "README.md" in uploaded and "unet/diffusion_pytorch_model.safetensors" in uploaded

        # ...and a wrong token is a one-line error that does not echo it.
        wrong = "hf_WrongTokenAlsoNeverPrinted987654321"
        refused = subprocess.run([sys.executable, "-m", "ldm.cli", "push", "--model", str(out / "pipeline"),
                                  "--repo_id", "me/other"], capture_output=True, text=True,
                                 env=env | {"HF_TOKEN": wrong}, timeout=120, check=False)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert "401" in refused.stderr and "Check the token" in refused.stderr
        assert wrong not in refused.stdout + refused.stderr

    # Nowhere: not in the run's configs, checkpoints, logs (TensorBoard), samples, model card, cache, Hub home...
    assert files_holding(tmp_path, TOKEN.encode()) == []
    assert not any(TOKEN.encode() in content for content in uploaded.values())
    # ...nor in anything the training or the push printed.
    captured = capfd.readouterr()
    for text in (captured.out, captured.err, pushed.stdout, pushed.stderr):
        assert TOKEN not in text
