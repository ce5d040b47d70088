"""Classifier-FID and images/s of a teacher and its consistency student (`ldm distill`), side by side, in one run.

  teacher  its saved sampler at its default step count (50), then at each of --steps (1, 2, 4, 8)
  student  LCMScheduler at each of --steps

Every row draws the same seeds (and, for class and text models, the same conditions: the teacher at its own
guidance scale, the student at 1, its guidance being in its weights) through `ldm eval`'s evaluation
(`ldm.eval.evaluation.evaluate_pipeline`): FID on the features of --features against the data's training images,
images/s from the sampling time alone (after one untimed warm-up batch per pipeline, the same batch size for all).
The table gives each row's ratios to the teacher's default and, for the student, to the teacher at the same steps;
the last line checks issue 21's bar: the student at its own step count within 1.5x the teacher's default FID at
>= 10x its images/s.

    python benchmarks/distill_speed.py --teacher runs/digits/pipeline --student runs/digits/student \\
        --data configs/digits.yaml --features runs/digits/classifier --num_samples 1000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="the trained model's pipeline folder")
    p.add_argument("--student", required=True, help="its student (ldm distill's <output_dir>/student)")
    p.add_argument("--data", required=True, help="YAML config or image folder: the real images")
    p.add_argument("--features", help="classifier folder (ldm train-classifier); default: Inception, if available")
    p.add_argument("--steps", default="1,2,4,8", help="comma-separated step counts for both models")
    p.add_argument("--teacher_scheduler", default=None, help="the teacher's sampler for every row (default: its saved "
                   "one; e.g. ddim, as the README's ldm eval)")
    p.add_argument("--teacher_steps", type=int, default=None, help="the teacher's default step count (default: its "
                   "own, 50)")
    p.add_argument("--num_samples", type=int, default=1000, help="samples per row")
    p.add_argument("--batch_size", type=int, default=250, help="images per forward pass, for every row")
    p.add_argument("--seed", type=int, default=0, help="sample i is drawn with seed + i")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--cache_dir", default=None, help="where the real images' features are cached")
    p.add_argument("--out", default=None, help="also write the rows as JSON")
    return p.parse_args()


def load(folder: str, device: str, scheduler: str | None = None):
    from ldm.cli.common import set_sampler
    from ldm.pipelines.loading import load_pipeline

    pipe = load_pipeline(folder)
    set_sampler(pipe, scheduler, keep_saved=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def main() -> None:
    args = parse_args()
    import torch

    from ldm.eval.conditional import check_classifier_matches, plan_for
    from ldm.eval.evaluation import evaluate_pipeline, headline_key, load_data, resolve_data
    from ldm.eval.features import cached_real_features, default_cache_dir, load_feature_network
    from ldm.pipelines.loading import num_inference_steps_of
    from ldm.schedulers import objective_of

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    steps = [int(s) for s in args.steps.split(",") if s]
    teacher, student = load(args.teacher, device, args.teacher_scheduler), load(args.student, device)
    if objective_of(student.scheduler.config) != "consistency":
        raise SystemExit(f"--student {args.student}: not a consistency student (its sampler is "
                         f"{type(student.scheduler).__name__}); give ldm distill's <output_dir>/student")
    network = load_feature_network(args.features)
    key = headline_key(network, "fid")
    channels, size = teacher.vae.config.in_channels, teacher.vae.config.sample_size
    train, _, info = load_data(args.data, channels, size)
    data_cfg = resolve_data(args.data, channels, size)
    plans = {"teacher": plan_for(teacher, data_cfg, info), "student": plan_for(student, data_cfg, info)}
    check_classifier_matches(network, plans["teacher"])
    real = cached_real_features(network, train, info.fingerprint, "train", args.cache_dir or default_cache_dir(),
                                args.batch_size, device)
    pipes = {"teacher": teacher, "student": student}
    for name, pipe in pipes.items():  # one untimed batch each: kernels, allocator, caches
        evaluate_pipeline(pipe, network, real, min(args.batch_size, args.num_samples), 1, args.batch_size,
                          seed=args.seed, names=("fid",), plan=plans[name])

    default_steps = args.teacher_steps or num_inference_steps_of(teacher)
    runs = [("teacher", "default", default_steps)] + [("teacher", "", n) for n in steps] + [
        ("student", "", n) for n in steps]
    rows = []
    for name, label, n in runs:
        result = evaluate_pipeline(pipes[name], network, real, args.num_samples, n, args.batch_size, seed=args.seed,
                                   names=("fid",), plan=plans[name])
        rows.append({"model": name, "label": label, "sampler": result["scheduler"], "steps": n,
                     "fid": result["metrics"][key], "images_per_sec": 1.0 / result["seconds_per_image"]})
        print(f"{name:>7} {result['scheduler']:>28} {n:>3} steps: {key} {rows[-1]['fid']:.4g}, "
              f"{rows[-1]['images_per_sec']:.1f} images/s", flush=True)

    print_table(rows, key, device, args, num_inference_steps_of(student))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "metric": key, "device": device, **vars(args)}, indent=1))
        print(f"wrote {args.out}")


def print_table(rows: list[dict], key: str, device: str, args: argparse.Namespace, own: int) -> None:
    """Markdown: each row with its ratios to the teacher's default and (students) to the teacher at the same steps;
    then the bar for the student at its own step count `own`."""
    base = rows[0]
    same = {r["steps"]: r for r in rows[1:] if r["model"] == "teacher"}
    print(f"\n{key} of {args.num_samples} samples and images/s at batch {args.batch_size} on {device}\n")
    print(f"| model | sampler | steps | {key} | images/s | {key} / teacher default | speed-up over teacher default "
          f"| {key} / teacher same steps | speed-up over teacher same steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = f"{r['model']} ({r['label']})" if r["label"] else r["model"]
        cells = [name, r["sampler"], str(r["steps"]), f"{r['fid']:.4g}", f"{r['images_per_sec']:.1f}",
                 f"{r['fid'] / base['fid']:.2f}x", f"{r['images_per_sec'] / base['images_per_sec']:.1f}x"]
        twin = same.get(r["steps"]) if r["model"] == "student" else None
        cells += ([f"{r['fid'] / twin['fid']:.2f}x", f"{r['images_per_sec'] / twin['images_per_sec']:.1f}x"]
                  if twin else ["", ""])
        print("| " + " | ".join(cells) + " |")
    mine = next((r for r in rows if r["model"] == "student" and r["steps"] == own), None)
    if mine is not None:
        fid, speed = mine["fid"] / base["fid"], mine["images_per_sec"] / base["images_per_sec"]
        met = fid <= 1.5 and speed >= 10
        print(f"\nstudent at its own {own} steps: {fid:.2f}x the teacher default's {key} (bar: <= 1.5x) at "
              f"{speed:.1f}x its images/s (bar: >= 10x): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
