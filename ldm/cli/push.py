"""`ldm push`: upload a saved pipeline with its model card to the Hugging Face Hub."""

from __future__ import annotations

import argparse

from ldm.cli.common import CLIError, check_exists


def add_push_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push",
        help="upload a saved pipeline (weights, code, model card, samples) to the Hugging Face Hub",
        description="Create the Hub repository if needed and upload the pipeline folder as it is, keeping the model "
        "card written by training. Log in first (`hf auth login`) or set HF_TOKEN; the token is never taken on the "
        "command line (where shell history and process lists would keep it), printed or written anywhere.",
    )
    p.add_argument("--model", required=True, help="folder written by LatentDiffusionPipeline.save_pretrained")
    p.add_argument("--repo_id", required=True, help="user-or-org/name on the Hub")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--commit_message", default="Upload latent diffusion pipeline")
    p.set_defaults(func=push)


def push(args: argparse.Namespace) -> int:
    check_exists("--model", args.model, "model_index.json")
    from huggingface_hub.errors import HfHubHTTPError

    from ldm.hub import push_pipeline

    try:
        url = push_pipeline(args.model, args.repo_id, private=args.private, commit_message=args.commit_message)
    except HfHubHTTPError as e:  # its message holds the status, the server's reason and the URL, not the token
        status = getattr(e.response, "status_code", None)
        hint = " Check the token (HF_TOKEN or `hf auth login`): it needs write access to the repository." \
            if status in (401, 403) else ""
        raise CLIError(f"could not push to {args.repo_id}: {str(e).splitlines()[0]}.{hint}") from e
    except OSError as e:  # no connection
        raise CLIError(f"could not push to {args.repo_id}: {e}") from e
    print(f"pushed {args.model} to {args.repo_id}: {url}")
    return 0
