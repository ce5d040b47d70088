"""Post-hoc EMA: choose the EMA length after training (EDM2: Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", section 3 and appendix C; the reference code is NVlabs/edm2 training/phema.py).

Which EMA length samples best depends on the run (its length, data, learning rate) and cannot be known in advance.
A power-function EMA averages the weights θ_τ of the steps τ ≤ t with weights ∝ τ^γ, so its width relative to the
run, σ_rel (the std of that profile over [0, t], divided by t), stays the same as the run goes on. Training tracks two
of them (σ_rel 0.05 and 0.10, as EDM2) and saves snapshots of both; afterwards the EMA of any other width at a
snapshot's step is a linear combination of the snapshots, with no retraining.

1. Update after optimizer step t (counted from 1): θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t, β_t = (1 − 1/t)^(γ+1)
   (eq. 127 with steps for images). Unrolled, θ̂_t = Σ_{τ≤t} [τ^(γ+1) − (τ−1)^(γ+1)] / t^(γ+1) · θ_τ: the discrete
   power-function profile, whatever the weights were before step 1.
2. Snapshots: every `train.ema_posthoc_every` steps and at the last step, one safetensors file per width in
   <stage>/posthoc_ema/. At most `train.ema_posthoc_max_snapshots` steps are kept: when one more would exceed
   that, every other one is deleted and the interval doubles, so the kept ones stay spread over the whole run.
3. Reconstruction at step t and width σ_rel: the combination of snapshots whose averaging profile is closest, in L2
   over time, to the power-function profile of (t, σ_rel): the normal equations A x = b between the profiles'
   inner products (eq. 151, EDM2 algorithm 3, `solve_posthoc_coefficients`).

The averages themselves (one copy of the weights per width, float32 on the model's device) go into every checkpoint
(`posthoc_ema.safetensors`), so that a resumed run continues them exactly.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.config import ConfigError

STATE_FILE = "posthoc_ema.safetensors"  # in a checkpoint: the averages of every width
SNAPSHOT_DIR = "posthoc_ema"  # in a stage's folder: the snapshots
SNAPSHOT_PATTERN = re.compile(r"^phema-(\d+)-(\d+\.\d+)\.safetensors$")
MAX_SIGMA_REL = 0.289  # the widest profile, γ = 0 (a plain average of the run): 1/√12


# ----- the power-function profile (EDM2 appendix C.2) -----

def exp_to_std(gamma):
    """σ_rel of the profile ∝ τ^γ over [0, 1] (eq. 123): sqrt((γ+1) / ((γ+2)² (γ+3)))."""
    gamma = np.float64(gamma)
    return np.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3))


def std_to_exp(sigma_rel):
    """γ of width σ_rel (eq. 126): the largest real root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²)."""
    sigma_rel = np.float64(sigma_rel)
    tmp = sigma_rel.flatten() ** -2
    gamma = [np.roots([1, 7, 16 - t, 12 - t]).real.max() for t in tmp]
    return np.float64(gamma).reshape(sigma_rel.shape)


def power_function_beta(sigma_rel: float, step: int) -> float:
    """β_t of the update after step t (eq. 127 with t_delta = one step): (1 − 1/t)^(γ+1); 0 at t = 1."""
    return float((1 - 1 / step) ** (std_to_exp(sigma_rel) + 1))


def power_function_correlation(a_ofs, a_std, b_ofs, b_std):
    """Inner product over time of the profiles (end a_ofs, width a_std) and (b_ofs, b_std), each normalised to unit
    mass (eq. 151, EDM2 algorithm 3)."""
    a_exp, b_exp = std_to_exp(a_std), std_to_exp(b_std)
    t_ratio = a_ofs / b_ofs
    t_exp = np.where(a_ofs < b_ofs, b_exp, -a_exp)
    t_max = np.maximum(a_ofs, b_ofs)
    return (a_exp + 1) * (b_exp + 1) * t_ratio ** t_exp / ((a_exp + b_exp + 1) * t_max)


def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std) -> np.ndarray:
    """Coefficients [input, output] that combine the snapshots (steps in_ofs, widths in_std) into the EMAs (out_ofs,
    out_std), by least squares between the profiles (EDM2 algorithm 3); each column sums to 1."""
    in_ofs, in_std = np.broadcast_arrays(in_ofs, in_std)
    out_ofs, out_std = np.broadcast_arrays(out_ofs, out_std)

    def rv(x):
        return np.float64(x).reshape(-1, 1)

    def cv(x):
        return np.float64(x).reshape(1, -1)

    a = power_function_correlation(rv(in_ofs), rv(in_std), cv(in_ofs), cv(in_std))
    b = power_function_correlation(rv(in_ofs), rv(in_std), cv(out_ofs), cv(out_std))
    x = np.linalg.solve(a, b)
    return x / np.sum(x, axis=0)


# ----- tracking during training -----

class PowerFunctionEMA:
    """EDM2's power-function EMAs of one model's parameters, one per width σ_rel, beside the model."""

    def __init__(self, model: nn.Module, sigma_rels: list[float]):
        self.sigma_rels = [float(s) for s in sigma_rels]
        # Keyed as the network saves them: a torch.compile'd model (train.compile) prefixes every name with _orig_mod.
        self.names = [name.removeprefix("_orig_mod.") for name, _ in model.named_parameters()]
        # At least float32 whatever the weights' dtype (bf16 weights would round the small steps of a long average).
        self.averages = [[p.detach().to(torch.promote_types(p.dtype, torch.float32)).clone()
                          for p in model.parameters()] for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1 for the first, which the averages become)."""
        params = [p.detach() for p in model.parameters()]
        for sigma_rel, average in zip(self.sigma_rels, self.averages):
            weight = 1.0 - power_function_beta(sigma_rel, step)
            for a, p in zip(average, params):
                a.lerp_(p.to(a.dtype), weight)

    def tensors(self, index: int) -> dict[str, torch.Tensor]:
        """The average of width sigma_rels[index], on the CPU, keyed by parameter name."""
        return {name: a.detach().cpu().contiguous() for name, a in zip(self.names, self.averages[index])}

    def save(self, directory: Path) -> None:
        """All averages into `directory`/posthoc_ema.safetensors (a checkpoint), keyed `<index>/<parameter>`."""
        tensors = {f"{i}/{name}": t for i in range(len(self.sigma_rels)) for name, t in self.tensors(i).items()}
        save_file(tensors, str(Path(directory) / STATE_FILE), metadata={"sigma_rels": json.dumps(self.sigma_rels)})

    def load(self, directory: Path, key: str) -> None:
        """Restore the averages saved by `save`; a checkpoint without them, or with other widths, is a ConfigError
        naming `key` (the config key that switches post-hoc EMA on)."""
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"{directory} holds no post-hoc EMA ({STATE_FILE}): the run was started without {key}, "
                              "and the power-function averages cannot start mid-run. Resume with "
                              f"--{key}=false, or start afresh")
        with safe_open(str(path), framework="pt") as f:
            saved = json.loads(f.metadata()["sigma_rels"])
        if saved != self.sigma_rels:
            raise ConfigError(f"{path} tracks the widths {saved}, this run {self.sigma_rels} ({key}_sigma_rels); "
                              "resume with the widths the run started with")
        tensors = load_file(str(path))
        for i, average in enumerate(self.averages):
            for name, a in zip(self.names, average):
                a.copy_(tensors[f"{i}/{name}"])


@dataclass(frozen=True)
class Snapshot:
    step: int
    sigma_rel: float
    path: Path


def snapshot_name(step: int, sigma_rel: float) -> str:
    return f"phema-{step:08d}-{sigma_rel:.3f}.safetensors"


def snapshot_interval(step: int, every: int, limit: int) -> int:
    """The interval between kept snapshots once step `step` has its snapshot: every·2^k, the smallest k that keeps
    its multiples up to `step`, and `step` itself (the last step of a run may lie between them), within `limit`."""
    interval = every
    while step // interval + (step % interval != 0) > limit:
        interval *= 2
    return interval


def kept_steps(step: int, every: int, limit: int) -> list[int]:
    """The snapshot steps kept once step `step` has its snapshot: the multiples of `snapshot_interval`, and `step`."""
    interval = snapshot_interval(step, every, limit)
    grid = list(range(interval, step + 1, interval))
    return grid if step % interval == 0 else grid + [step]


def list_snapshots(directory: Path) -> list[Snapshot]:
    """The snapshots in `directory`, by step then width (the width read from each file, not its name)."""
    found = []
    for path in Path(directory).glob("phema-*.safetensors"):
        match = SNAPSHOT_PATTERN.match(path.name)
        if match:
            with safe_open(str(path), framework="pt") as f:
                sigma_rel = float(json.loads(f.metadata()["posthoc_ema"])["sigma_rel"])
            found.append(Snapshot(int(match.group(1)), sigma_rel, path))
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


class PosthocEMA:
    """What the training spine holds: the averages (`ema`) and when and where their snapshots are written."""

    def __init__(self, ema: PowerFunctionEMA, directory: Path, every: int, limit: int, write: bool = True):
        self.ema, self.directory, self.every, self.limit = ema, Path(directory), every, limit
        self.write = write  # the main process writes; the others only average

    def update(self, model: nn.Module, step: int) -> None:
        self.ema.update(model, step)

    def after_step(self, step: int, last: bool) -> None:
        """Snapshot step `step` if it is due (on the interval, or the run's last step), then delete the snapshots
        that the bound no longer keeps (those of later steps too: a resumed run writes them again)."""
        if not self.write or (step % snapshot_interval(step, self.every, self.limit) and not last):
            return
        keep = kept_steps(step, self.every, self.limit)
        self.directory.mkdir(parents=True, exist_ok=True)
        for i, sigma_rel in enumerate(self.ema.sigma_rels):
            path = self.directory / snapshot_name(step, sigma_rel)
            tmp = path.with_name(path.name + ".tmp")  # renamed when complete: a half-written file never counts
            # One metadata key: safetensors writes several in no fixed order, and the files should be reproducible.
            record = json.dumps({"step": step, "sigma_rel": sigma_rel})
            save_file(self.ema.tensors(i), str(tmp), metadata={"posthoc_ema": record})
            os.replace(tmp, path)
        for snapshot in list_snapshots(self.directory):
            if snapshot.step not in keep or snapshot.sigma_rel not in self.ema.sigma_rels:
                snapshot.path.unlink()


def disk_cost(model: nn.Module, sigma_rels: list[float], limit: int) -> tuple[int, int]:
    """(bytes of one snapshot file: 4 per float32 parameter, besides a header of ~100 bytes per tensor; the most files
    kept: limit × widths)."""
    return 4 * sum(p.numel() for p in model.parameters()), limit * len(sigma_rels)


def make_posthoc_ema(model: nn.Module, train_cfg, stage_dir: Path, accelerator, fresh: bool) -> PosthocEMA | None:
    """The post-hoc EMA of `model` if train.ema_posthoc is set, else None. The main process of a fresh (not resumed)
    run first deletes the snapshots of an earlier run in the same folder, and prints the disk cost."""
    if not train_cfg.ema_posthoc:
        return None
    directory = Path(stage_dir) / SNAPSHOT_DIR
    main = accelerator.is_main_process
    if main and fresh and directory.is_dir():
        old = list_snapshots(directory)
        for snapshot in old:
            snapshot.path.unlink()
        if old:
            print(f"post-hoc EMA: deleted the {len(old)} snapshots of an earlier run in {directory}")
    sigma_rels, limit = train_cfg.ema_posthoc_sigma_rels, train_cfg.ema_posthoc_max_snapshots
    size, count = disk_cost(model, sigma_rels, limit)
    accelerator.print(
        f"post-hoc EMA: widths σ_rel {', '.join(f'{s:g}' for s in sigma_rels)}, a snapshot every "
        f"{train_cfg.ema_posthoc_every} steps into {directory} (at most {limit} steps kept: the interval doubles); "
        f"{size:,} bytes per snapshot x {count} files = {size * count / 1e6:.1f} MB at most")
    return PosthocEMA(PowerFunctionEMA(model, sigma_rels), directory, train_cfg.ema_posthoc_every, limit, write=main)


# ----- reconstruction after training -----

def check_request(directory: Path, sigma_rels: list[float], step: int | None = None) -> int:
    """The step to reconstruct at (default: the latest snapshot's); a ValueError (FileNotFoundError without
    snapshots) naming what is wrong with the widths or the step, before any weights are read."""
    for sigma_rel in sigma_rels:
        if not 0 < sigma_rel < MAX_SIGMA_REL:
            raise ValueError(f"sigma_rel {sigma_rel:g}: must lie in (0, {MAX_SIGMA_REL})")
    steps = sorted({s.step for s in list_snapshots(directory)})
    if not steps:
        raise FileNotFoundError(f"{directory} holds no post-hoc EMA snapshots (phema-<step>-<width>.safetensors): "
                                "train with denoiser.train.ema_posthoc=true")
    if step is not None and step not in steps:
        raise ValueError(f"no snapshot at step {step} in {directory}; the snapshots' steps: {steps}")
    return steps[-1] if step is None else step


def reconstruct(directory: Path, sigma_rels: list[float], step: int | None = None,
                ) -> tuple[dict[float, dict[str, torch.Tensor]], int, list[Snapshot]]:
    """The EMA of each width in `sigma_rels` at snapshot step `step` (default: the latest), from the snapshots of
    `directory` up to that step: ({σ_rel: {parameter: float32 tensor}}, the step, the snapshots used).

    1. the coefficients that combine the snapshots' profiles into each target's (`solve_posthoc_coefficients`);
    2. the weighted sum of the snapshots' tensors, in float64 (the coefficients alternate in sign), then float32.
    """
    step = check_request(directory, sigma_rels, step)
    used = [s for s in list_snapshots(directory) if s.step <= step]
    coefficients = solve_posthoc_coefficients([s.step for s in used], [s.sigma_rel for s in used], step, sigma_rels)
    sums: list[dict[str, torch.Tensor]] = [{} for _ in sigma_rels]
    for i, snapshot in enumerate(used):
        for name, tensor in load_file(str(snapshot.path)).items():
            for j, total in enumerate(sums):
                term = tensor.double() * float(coefficients[i, j])
                total[name] = term if name not in total else total[name].add_(term)
    return {s: {k: v.float() for k, v in total.items()} for s, total in zip(sigma_rels, sums)}, step, used
