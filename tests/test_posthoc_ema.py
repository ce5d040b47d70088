"""Post-hoc EMA (EDM2's power-function EMA, ldm.train.posthoc_ema; `ldm ema-reconstruct | ema-sweep`): the average
against its closed form, the least-squares reconstruction against averages tracked directly, the bound on the
snapshots, exact resume of a tiny run, and the pipelines the commands write."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, assert_same_checkpoint, run, saved_tiny_vae, tiny_config
from safetensors.torch import load_file

from ldm.cli import main
from ldm.cli.posthoc_ema import by_component
from ldm.config import ConfigError, load_config
from ldm.pipelines.loading import load_pipeline
from ldm.train import posthoc_ema as P
from ldm.train.unet import UNetTask, train_unet


def set_weights(model: torch.nn.Module, value: torch.Tensor) -> None:
    with torch.no_grad():
        model.weight.copy_(value.view_as(model.weight))


def test_power_function_ema_matches_its_closed_form():
    """After steps 1..T the average is Σ_τ [τ^(γ+1) − (τ−1)^(γ+1)] / T^(γ+1) · θ_τ, whatever the initial weights,
    and that profile has the relative std asked for."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1, bias=False).double()
    weights = torch.randn(40, 8, dtype=torch.float64)
    ema = P.PowerFunctionEMA(model, [0.05, 0.10])
    for t, theta in enumerate(weights, start=1):
        set_weights(model, theta)
        ema.update(model, t)
    steps = np.arange(1, len(weights) + 1, dtype=np.float64)
    for sigma_rel, average in zip(ema.sigma_rels, ema.averages):
        g = P.std_to_exp(sigma_rel) + 1
        w = torch.from_numpy((steps ** g - (steps - 1) ** g) / steps[-1] ** g)
        assert torch.allclose(average[0].flatten(), w @ weights, rtol=1e-12, atol=1e-12)
        # The width of that profile over a long run: std(τ/T) under the weights is σ_rel.
        tau = np.arange(1, 20001, dtype=np.float64)
        p = (tau ** g - (tau - 1) ** g) / tau[-1] ** g
        x = tau / tau[-1]
        assert np.sqrt(p @ x ** 2 - (p @ x) ** 2) == pytest.approx(sigma_rel, rel=1e-3)
        assert P.exp_to_std(P.std_to_exp(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)


def noisy_descent(steps: int, dim: int) -> torch.Tensor:
    """Weights of a toy run: a noisy pull towards a target, so averages of different widths differ."""
    g = torch.Generator().manual_seed(0)
    target, x = torch.randn(dim, generator=g), 3 * torch.randn(dim, generator=g)
    out = []
    for _ in range(steps):
        x = x + 0.01 * (target - x) + 0.05 * torch.randn(dim, generator=g)
        out.append(x)
    return torch.stack(out)


def track(weights: torch.Tensor, sigma_rels, directory: Path, every: int, limit: int) -> P.PosthocEMA:
    model = torch.nn.Linear(weights.shape[1], 1, bias=False)
    posthoc = P.PosthocEMA(P.PowerFunctionEMA(model, sigma_rels), directory, every, limit)
    for t, theta in enumerate(weights, start=1):
        set_weights(model, theta)
        posthoc.update(model, t)
        posthoc.after_step(t, last=t == len(weights))
    return posthoc


def test_reconstruction_gives_a_tracked_width_back_and_one_between_close_to_tracking_it(tmp_path):
    weights = noisy_descent(600, 64)
    snapshots = track(weights, [0.05, 0.10], tmp_path / "snapshots", every=20, limit=32)
    direct = track(weights, [0.05, 0.075, 0.10, 0.15], tmp_path / "direct", every=600, limit=2).ema
    tracked = {s: a[0].flatten() for s, a in zip(direct.sigma_rels, direct.averages)}
    spread = (tracked[0.05] - tracked[0.10]).norm()
    out, step, used = P.reconstruct(tmp_path / "snapshots", [0.05, 0.075, 0.10, 0.15])
    assert step == 600 and len(used) == 60
    error = {s: ((out[s]["weight"].flatten() - tracked[s]).norm() / spread).item() for s in out}
    assert error[0.05] < 1e-4 and error[0.10] < 1e-4  # a tracked width: that EMA back
    assert error[0.075] < 0.005 and error[0.15] < 0.01  # between and beyond: close to tracking it directly
    assert (tracked[0.075] - tracked[0.05]).norm() > 0.3 * spread  # ...which no tracked width is
    # The coefficients of a tracked width: that width's last snapshot alone.
    x = P.solve_posthoc_coefficients([s.step for s in used], [s.sigma_rel for s in used], 600, [0.05])[:, 0]
    assert abs(x[-2] - 1) < 1e-4 and np.abs(np.delete(x, -2)).max() < 1e-4
    assert snapshots.ema.sigma_rels == [0.05, 0.10]


def test_snapshots_are_bounded_and_spread_over_the_run(tmp_path):
    assert P.kept_steps(4, 1, 4) == [1, 2, 3, 4]
    assert P.kept_steps(5, 1, 4) == [2, 4, 5]  # a last step between the interval's multiples takes a slot
    assert P.kept_steps(6, 1, 4) == [2, 4, 6]
    model = torch.nn.Linear(8, 2)
    posthoc = P.PosthocEMA(P.PowerFunctionEMA(model, [0.05, 0.10]), tmp_path, every=3, limit=6)
    most = 0
    for t in range(1, 201):
        posthoc.after_step(t, last=t == 200)
        most = max(most, len(list(tmp_path.iterdir())))
    assert most == 6 * 2
    steps = sorted({s.step for s in P.list_snapshots(tmp_path)})
    assert steps == [48, 96, 144, 192, 200]  # every 3 steps, doubled to 48; and the last step
    size, count = P.disk_cost(model, [0.05, 0.10], 6)
    assert (size, count) == (4 * (8 * 2 + 2), 12)
    assert all(size < s.path.stat().st_size < size + 200 * 2 for s in P.list_snapshots(tmp_path))


def test_checkpointed_averages_load_back_and_a_mismatch_is_refused(tmp_path):
    model = torch.nn.Linear(4, 2)
    ema = P.PowerFunctionEMA(model, [0.05, 0.10])
    with pytest.raises(ConfigError, match="started without denoiser.train.ema_posthoc"):
        ema.load(tmp_path, "denoiser.train.ema_posthoc")
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 2)
    ema.save(tmp_path)
    again = P.PowerFunctionEMA(torch.nn.Linear(4, 2), [0.05, 0.10])
    again.load(tmp_path, "denoiser.train.ema_posthoc")
    assert all(torch.equal(a, b) for x, y in zip(ema.averages, again.averages) for a, b in zip(x, y))
    with pytest.raises(ConfigError, match=r"denoiser.train.ema_posthoc_sigma_rels"):
        P.PowerFunctionEMA(model, [0.05, 0.20]).load(tmp_path, "denoiser.train.ema_posthoc")
    # train.compile: the names are the network's own, as in its saved pipeline (torch.compile's OptimizedModule holds
    # the network as _orig_mod, as this stand-in does, without importing dynamo).
    compiled = torch.nn.Module()
    compiled._orig_mod = model
    assert [n for n, _ in compiled.named_parameters()] == ["_orig_mod.weight", "_orig_mod.bias"]
    assert P.PowerFunctionEMA(compiled, [0.05]).names == ["weight", "bias"]


@pytest.mark.parametrize("override, message", [
    ({"vae.train.ema_posthoc": True}, "vae.train.ema_posthoc"),
    ({"denoiser.train.ema_posthoc_sigma_rels": [0.05, 0.3]}, r"ema_posthoc_sigma_rels.*\(0, 0.289\)"),
    ({"denoiser.train.ema_posthoc_sigma_rels": [0.05, 0.0501]}, "differ at 3 decimals"),
    ({"denoiser.train.ema_posthoc_max_snapshots": 1}, "ema_posthoc_max_snapshots"),
])
def test_bad_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs/tiny.yaml", override)


POSTHOC = {"denoiser.train.ema_posthoc": True, "denoiser.train.ema_posthoc_every": 1,
           "denoiser.train.ema_posthoc_max_snapshots": 4, "denoiser.train.checkpointing_steps": 2,
           "denoiser.train.sample_every": 0, "denoiser.train.report_to": "none"}


def posthoc_run(base: Path, name: str, **overrides):
    return tiny_config(base / name, **{"denoiser.vae_path": str(base / "vae"),
                                       "denoiser.latent_cache_dir": str(base / "latent_cache"), **POSTHOC,
                                       **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny UNet trained 6 steps with post-hoc EMA (snapshots every step, at most 4 kept) on an untrained VAE."""
    base = tmp_path_factory.mktemp("posthoc")
    saved_tiny_vae(base / "vae")
    run(train_unet, posthoc_run(base, "straight"))
    return base


def snapshot_files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "unet" / P.SNAPSHOT_DIR).iterdir())}


def test_a_resumed_run_ends_with_the_same_averages_and_snapshots(trained, monkeypatch, capsys):
    straight = trained / "straight"
    assert sorted(snapshot_files(straight)) == [P.snapshot_name(s, w) for s in (2, 4, 6) for w in (0.05, 0.10)]
    # A crash in step 6: checkpoint-4 is the latest, the snapshots of steps 1-4 are on disk.
    compute_loss = UNetTask.compute_loss

    def crash_at_step_6(self, batch, step):
        if step == 5:
            raise RuntimeError("simulated crash")
        return compute_loss(self, batch, step)

    monkeypatch.setattr(UNetTask, "compute_loss", crash_at_step_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(train_unet, posthoc_run(trained, "resumed"))
    assert sorted({int(n.split("-")[1]) for n in snapshot_files(trained / "resumed")}) == [1, 2, 3, 4]
    out = capsys.readouterr().out
    assert "1,144,976 bytes per snapshot x 8 files = 9.2 MB at most" in out
    monkeypatch.setattr(UNetTask, "compute_loss", compute_loss)
    metrics = run(train_unet, posthoc_run(trained, "resumed", **{"denoiser.train.resume_from_checkpoint": "latest"}))
    assert metrics["start_step"] == 4
    # The averages in the checkpoint and every snapshot file: bitwise those of the run that never stopped.
    assert_same_checkpoint(straight / "unet/checkpoints/checkpoint-6", trained / "resumed/unet/checkpoints/checkpoint-6")
    assert snapshot_files(trained / "resumed") == snapshot_files(straight)
    final = load_file(straight / "unet" / P.SNAPSHOT_DIR / P.snapshot_name(6, 0.05))
    earlier = load_file(straight / "unet" / P.SNAPSHOT_DIR / P.snapshot_name(4, 0.05))
    assert any(not torch.equal(final[k], earlier[k]) for k in final)  # the averages moved in the resumed steps


def unet_weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipe.unet.named_parameters()}


def test_ema_reconstruct_writes_a_loadable_pipeline_with_the_width_asked_for(trained, tmp_path):
    model, out = trained / "straight" / "pipeline", tmp_path / "pipeline_0.1"
    assert main(["ema-reconstruct", "--model", str(model), "--sigma_rel", "0.1", "--out", str(out)]) == 0
    pipe = load_pipeline(out)
    rebuilt, saved = unet_weights(pipe), unet_weights(load_pipeline(model))
    tracked = load_file(trained / "straight" / "unet" / P.SNAPSHOT_DIR / P.snapshot_name(6, 0.10))
    assert all(torch.allclose(rebuilt[k], tracked[k], atol=1e-5) for k in tracked)
    assert any(not torch.allclose(rebuilt[k], saved[k], atol=1e-5) for k in saved)  # not the ema_decay EMA
    record = json.loads((out / "posthoc_ema.json").read_text())
    assert record["sigma_rel"] == 0.1 and record["step"] == 6 and len(record["snapshots"]) == 6
    assert "## Post-hoc EMA" in (out / "README.md").read_text()
    image = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (16, 16)
    # A text model trained with its encoder averages both: each goes to its own component folder.
    parts = by_component({"unet.conv_in.weight": 1, "text_encoder.text_model.x": 2}, ["unet", "text_encoder"], "unet")
    assert parts == {"unet": {"conv_in.weight": 1}, "text_encoder": {"text_model.x": 2}}
    assert by_component({"conv_in.weight": 1}, ["unet", "vae"], "unet") == {"unet": {"conv_in.weight": 1}}


def test_ema_sweep_scores_each_width_and_writes_the_best(trained, tmp_path, capsys):
    data = REPO / "configs/tiny.yaml"
    assert main(["train-classifier", "--data", str(data), "--out", str(tmp_path / "clf"), "--epochs", "1"]) == 0
    model, out = trained / "straight" / "pipeline", tmp_path / "best"
    assert main(["ema-sweep", "--model", str(model), "--data", str(data), "--features", str(tmp_path / "clf"),
                 "--num_samples", "8", "--steps", "2", "--sigma_rels", "0.05,0.2", "--out", str(out),
                 "--out_dir", str(tmp_path / "sweep"), "--cache_dir", str(tmp_path / "cache")]) == 0
    with (tmp_path / "sweep" / "ema_sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["sigma_rel"] for r in rows] == ["saved", "0.05", "0.2"]
    values = {float(r["sigma_rel"]): float(r["value"]) for r in rows[1:]}
    best = min(values, key=values.get)
    assert json.loads((out / "posthoc_ema.json").read_text())["sigma_rel"] == best
    expected = P.reconstruct(trained / "straight" / "unet" / P.SNAPSHOT_DIR, [best])[0][best]
    assert all(torch.equal(v, expected[k]) for k, v in unet_weights(load_pipeline(out)).items())
    assert (tmp_path / "sweep" / "ema_sweep.png").is_file()
    assert f"best: σ_rel {best:g}" in capsys.readouterr().out
