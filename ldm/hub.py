"""The Hugging Face Hub (or any server speaking its HTTP API, see HF_ENDPOINT): sharing a saved pipeline, and
reading the files of a published model, with the Hub's answer in one line when it refuses."""

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


class HubError(ValueError):
    """The Hub refused a request (no such repository or revision, gated, no token, offline and not cached): its
    answer in one line."""


def hub_answer(error: Exception) -> str:
    """The Hub's answer to a failed request in one line: what it said (X-Error-Message) and what went wrong."""
    from huggingface_hub.errors import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    said = getattr(error, "server_message", None) or ""
    said = " ".join(said.split())
    if isinstance(error, GatedRepoError):
        what = "gated: accept its conditions on the Hub with your account and set HF_TOKEN"
    elif isinstance(error, RepositoryNotFoundError):
        what = "not found (or private: set HF_TOKEN to a token that can read it)"
    elif isinstance(error, RevisionNotFoundError):
        what = "no such revision"
    elif isinstance(error, OfflineModeIsEnabled):
        what = "HF_HUB_OFFLINE is set and it is not in the local cache: run once online, or give a local folder"
    else:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        what = lines[0] if lines else type(error).__name__
    return f"{what} ({said})" if said and said not in what else what


def repo_files(repo_id: str, revision: str | None = None) -> list[str]:
    """Every file path of a model repository at `revision`, from the Hub (or, offline, the local cache's copy).
    HubError with the Hub's answer when it refuses."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        if constants.HF_HUB_OFFLINE:  # the files downloaded before are all the cache knows of
            folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
            return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        info = HfApi().model_info(repo_id, revision=revision)
        return sorted(s.rfilename for s in info.siblings or [])
    except LocalEntryNotFoundError as e:
        raise HubError("HF_HUB_OFFLINE is set and it is not in the local cache: run once online, or give a local "
                       "folder") from e
    except (HfHubHTTPError, HFValidationError, OSError) as e:
        raise HubError(hub_answer(e)) from e


def download_files(repo_id: str, revision: str | None, files: list[str]) -> Path:
    """Download exactly `files` of a model repository (through the cache; HF_TOKEN and offline mode apply) and
    return the local snapshot folder that holds them."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=files))
    except (HfHubHTTPError, OSError) as e:
        raise HubError(hub_answer(e)) from e


def download_file(repo_id: str, revision: str | None, filename: str) -> Path:
    """One small file of a model repository (a config), through the cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except (HfHubHTTPError, OSError) as e:
        raise HubError(hub_answer(e)) from e
