"""`ldm push`: upload a saved pipeline with its model card to the Hugging Face Hub (and its demo to a Space)."""

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
    p.add_argument("--with_demo", action="store_true",
                   help="also add the web demo (app.py, requirements.txt, a Demo section in the model card) and "
                   "serve it from a Gradio Space (--space_id)")
    p.add_argument("--space_id", default=None,
                   help="with --with_demo: the Space to create or update (default: <repo_id>-demo)")
    p.set_defaults(func=push)


def push(args: argparse.Namespace) -> int:
    check_exists("--model", args.model, "model_index.json")
    if args.space_id and not args.with_demo:
        raise CLIError("--space_id is for the demo's Space: add --with_demo")
    from huggingface_hub.errors import HfHubHTTPError

    from ldm.hub import push_pipeline, push_space

    space_id = (args.space_id or f"{args.repo_id}-demo") if args.with_demo else None
    if space_id:
        from ldm.demo.space import write_demo_files

        written = write_demo_files(args.model, space_id)
        print(f"wrote {', '.join(p.name for p in written)} in {args.model}")
    target = args.repo_id  # the repository being pushed to, for the error message
    try:
        url = push_pipeline(args.model, args.repo_id, private=args.private, commit_message=args.commit_message)
        print(f"pushed {args.model} to {args.repo_id}: {url}")
        if space_id:
            target = space_id
            url = push_space(args.model, args.repo_id, space_id, private=args.private)
            print(f"pushed the demo to the Space {space_id}: {url}")
    except HfHubHTTPError as e:  # its message holds the status, the server's reason and the URL, not the token
        status = getattr(e.response, "status_code", None)
        hint = " Check the token (HF_TOKEN or `hf auth login`): it needs write access to the repository." \
            if status in (401, 403) else ""
        raise CLIError(f"could not push to {target}: {str(e).splitlines()[0]}.{hint}") from e
    except OSError as e:  # no connection
        raise CLIError(f"could not push to {target}: {e}") from e
    return 0
