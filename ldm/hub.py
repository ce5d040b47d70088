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
