"""Which W&B mode, project and entity a run, an evaluation or a dashboard uses: the same answer for each."""

from __future__ import annotations

import netrc
import os


def wandb_mode() -> str:
    """Offline unless an API key is configured; WANDB_MODE, when set, wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def wandb_project(project: str | None = None) -> str:
    """The config's W&B project, else WANDB_PROJECT, else llm."""
    return project or os.environ.get("WANDB_PROJECT") or "llm"


def wandb_entity(entity: str | None = None) -> str | None:
    """The config's W&B entity, else WANDB_ENTITY, else None: the API key's default entity."""
    return entity or os.environ.get("WANDB_ENTITY") or None
