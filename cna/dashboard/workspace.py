"""The W&B workspace (and report) that `spec.dashboard_spec()` describes, built with `wandb-workspaces`.

Building needs no network: `build_workspace` and `build_report` make the objects, `viewspec` is what saving
the workspace would upload (a report's needs the server). `save_workspace` updates the workspace of the same
name and runs, or creates it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cna.dashboard.spec import DashboardSpec, Key, Panel, dashboard_spec
from cna.errors import CnaError


class MissingDependency(CnaError):
    """wandb-workspaces is not installed."""


def _libraries() -> tuple[Any, Any]:
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as error:
        raise MissingDependency(f"wandb-workspaces is not installed ({error.name}): "
                                "pip install 'cna[dashboard]'") from error
    return ws, wr


@dataclass(frozen=True)
class RunSelection:
    """Which runs the dashboard shows: one W&B project, optionally one multirun group and any of some tags."""

    entity: str
    project: str
    group: str | None = None
    tags: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        scope = self.group or "all runs"
        return f"cna: {scope}" + (f" [{', '.join(self.tags)}]" if self.tags else "")

    @property
    def view_name(self) -> str:
        """A stable internal name (`nw-<id>-v`), so saving again updates the same workspace."""
        digest = hashlib.sha1("\n".join([self.entity, self.project, self.title]).encode()).hexdigest()[:12]
        return f"nw-cna{digest}-v"

    def filters(self) -> Any:
        """Group equals, and tags include any of, the given ones; "" (every run) when neither is given."""
        ws, _ = _libraries()
        filters = [ws.Metric("Group") == self.group] if self.group else []
        if self.tags:
            filters.append(ws.Tags().isin(list(self.tags)))
        return ws.And(*filters) if filters else ""


def _metric(wr: Any, key: Key) -> Any:
    """A key as a run-level accessor (scatter and parallel axes read one value per run)."""
    return wr.Config(key.name) if key.source == "config" else wr.SummaryMetric(key.name)


def _panel(wr: Any, panel: Panel, x_axis: Key) -> Any:
    names = [key.name for key in panel.keys]
    if panel.kind == "line":
        return wr.LinePlot(title=panel.title, x=x_axis.name, y=names, title_x=x_axis.name)
    if panel.kind == "scatter":
        x, y = panel.keys
        return wr.ScatterPlot(title=panel.title, x=_metric(wr, x), y=_metric(wr, y))
    if panel.kind == "parallel":
        return wr.ParallelCoordinatesPlot(title=panel.title, columns=[
            wr.ParallelCoordinatesPlotColumn(metric=_metric(wr, key), display_name=key.name) for key in panel.keys])
    if panel.kind == "table":
        return wr.WeavePanelSummaryTable(table_name=names[0], layout=wr.Layout(w=24, h=12))
    return wr.MediaBrowser(title=panel.title, media_keys=names, num_columns=2)


def build_workspace(selection: RunSelection, spec: DashboardSpec | None = None) -> Any:
    """The saved-view object: one section per spec section; runs filtered by group and tags, grouped by the
    spec's keys (method, then model) and coloured by method."""
    ws, wr = _libraries()
    spec = spec or dashboard_spec()
    spec.validate()
    sections = [ws.Section(name=section.name, is_open=True,
                           panels=[_panel(wr, panel, spec.x_axis) for panel in section.panels])
                for section in spec.sections]
    runs = ws.RunsetSettings(filters=selection.filters(), groupby=[ws.Config(key.name) for key in spec.group_by],
                             group_colors=dict(spec.group_colours))
    workspace = ws.Workspace(entity=selection.entity, project=selection.project, name=selection.title,
                             sections=sections, runset_settings=runs,
                             settings=ws.WorkspaceSettings(x_axis=spec.x_axis.name, max_runs=spec.max_runs))
    workspace._internal_name = selection.view_name
    return workspace


def build_report(selection: RunSelection, spec: DashboardSpec | None = None) -> Any:
    """The same panels as a report: one heading and one panel grid per section, each over the selected runs."""
    _, wr = _libraries()
    spec = spec or dashboard_spec()
    spec.validate()
    groupby = [f"config.{key.name}" for key in spec.group_by]
    blocks: list[Any] = []
    for section in spec.sections:
        runset = wr.Runset(entity=selection.entity, project=selection.project, name=selection.title,
                           filters=selection.filters(), groupby=groupby)
        blocks += [wr.H2(section.name), wr.P(" ".join(panel.about for panel in section.panels)),
                   wr.PanelGrid(runsets=[runset], panels=[_panel(wr, panel, spec.x_axis) for panel in section.panels])]
    return wr.Report(entity=selection.entity, project=selection.project, title=selection.title,
                     description="CNA vs CAA vs directional ablation: refusal, quality, MMLU, KL and over-refusal "
                                 "against alpha, and the recipe sweep.", blocks=blocks)


def viewspec(workspace: Any) -> dict:
    """What saving a workspace would upload, as JSON-ready data (offline: no server is asked)."""
    return workspace._to_model().spec.model_dump(by_alias=True, exclude_none=True, mode="json")


def save_workspace(workspace: Any) -> str:
    """Update the saved view of the same internal name, or create it; returns its URL."""
    from wandb_workspaces.workspaces import internal

    try:
        existing = internal.View.from_name(workspace.entity, workspace.project, workspace._internal_name)
    except ValueError:  # no such view yet
        existing = None
    if existing is not None:
        workspace._internal_id = existing.id
    workspace.save()
    return workspace.url
