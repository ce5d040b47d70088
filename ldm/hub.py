"""Sharing a saved pipeline on the Hugging Face Hub (or any server speaking its HTTP API, see HF_ENDPOINT)."""

from __future__ import annotations

from pathlib import Path


def push_pipeline(model_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                  commit_message: str = "Upload latent diffusion pipeline") -> str:
    """Create `repo_id` if needed and upload the pipeline folder as it is: weights, code, model card, samples.

    Unlike `DiffusionPipeline.push_to_hub`, which replaces the folder's README.md with a generic card, this keeps
    the model card that training wrote. Returns the commit URL.
    """
    from huggingface_hub import HfApi

    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no model_index.json; expected a folder written by save_pretrained")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(model_dir),
        commit_message=commit_message,
        # Training leftovers have no place in a shared model.
        ignore_patterns=["*.tmp", "__pycache__/*", "*.pyc"],
    )
    return commit.commit_url if hasattr(commit, "commit_url") else str(commit)


def push_space(model_dir: str | Path, model_id: str, space_id: str, private: bool = False, token: str | None = None,
               title: str | None = None) -> str:
    """Create the Gradio Space `space_id` if needed and upload the model folder's demo (app.py, serving.py,
    requirements.txt) with a Space card naming `model_id` (the app downloads the model from there). Returns the
    commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from ldm.demo.space import APP_FILES, space_card

    files = (*APP_FILES, "requirements.txt")
    model_dir = Path(model_dir)
    missing = [name for name in files if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} has no {', '.join(missing)}; write them with write_demo_files first")
    api = HfApi(token=token)
    api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    card = space_card(model_id, title or model_id.split("/")[-1])
    operations = [CommitOperationAdd("README.md", card.encode())] + [
        CommitOperationAdd(name, str(model_dir / name)) for name in files]
    commit = api.create_commit(space_id, operations, repo_type="space", commit_message=f"Demo of {model_id}")
    return commit.commit_url if hasattr(commit, "commit_url") else str(commit)
