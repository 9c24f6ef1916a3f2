"""`make wandb-dashboard`: a saved W&B workspace built from the metric declaration (llm/observe/metrics.py),
so that its panels show exactly the keys the runs log, with `wandb-workspaces`."""

from __future__ import annotations

import warnings

from llm.errors import ConfigError
from llm.observe.metrics import SECTIONS, X_AXES, charts
from llm.wandb_settings import wandb_entity, wandb_mode, wandb_project

VIEW_NAME = "Pretraining"


def _workspaces():
    """wandb_workspaces' two modules; its pydantic-v1-style validators warn on import, about its code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    return wr, ws


def build_workspace(entity: str, project: str, x: str = "step", name: str = VIEW_NAME):
    """The workspace object: one section per metric section, one line plot per chart, runs grouped
    by W&B group (the experiment's name). Builds offline; nothing is sent until it is saved."""
    wr, ws = _workspaces()

    if x not in X_AXES:
        raise ConfigError(f"x={x}: not an x-axis; use one of {', '.join(X_AXES)}")
    sections = [
        ws.Section(
            name=section,
            is_open=True,
            panels=[
                # a family of keys (each benchmark's scores) by its pattern: every task a run names
                wr.LinePlot(title=c.title, x=X_AXES[x], y=c.keys, metric_regex=c.pattern, title_y=c.unit)
                for c in charts(section)
            ],
        )
        for section in SECTIONS
    ]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=sections,
        settings=ws.WorkspaceSettings(x_axis=X_AXES[x]),
        runset_settings=ws.RunsetSettings(groupby=[ws.Metric("Group")]),  # the run's group: its experiment
    )


def panel_keys(workspace) -> set[str]:
    """Every metric a panel of the workspace plots, its x-axis included, and its patterns."""
    keys: set[str] = set()
    for section in workspace.sections:
        for panel in section.panels:
            keys.update(panel.y or [])
            keys.add(panel.x)
            if panel.metric_regex:
                keys.add(panel.metric_regex)
    return keys


def wandb_dashboard(entity: str | None = None, project: str | None = None, x: str = "step", url: str | None = None):
    """Build, or update, a saved W&B workspace of the training metrics.

    Args:
        entity: W&B entity (WANDB_ENTITY=); default: the API key's default entity
        project: W&B project (WANDB_PROJECT=); default: llm, the runs' default
        x: the x-axis of every panel: step or tokens
        url: a workspace this command saved before, to update in place instead of saving a new one
    """
    if wandb_mode() != "online":
        raise ConfigError(
            "wandb-dashboard: W&B is offline here (no WANDB_API_KEY, no `wandb login`, or WANDB_MODE set); "
            "a workspace is saved on a W&B server: set WANDB_API_KEY (and WANDB_ENTITY) and run it again"
        )
    import wandb

    project = wandb_project(project)
    entity = wandb_entity(entity) or wandb.Api().default_entity
    if not entity:
        raise ConfigError("wandb-dashboard: no W&B entity; set WANDB_ENTITY to your user or team name")
    built = build_workspace(entity, project, x)
    if url:
        saved = _workspaces()[1].Workspace.from_url(url)
        saved.sections, saved.settings, saved.runset_settings = built.sections, built.settings, built.runset_settings
        built = saved
    built.save()
    print(f"workspace {'updated' if url else 'saved'}: {built.url}")
    print(f"update it later with: make wandb-dashboard ARGS=--url='{built.url}'")
