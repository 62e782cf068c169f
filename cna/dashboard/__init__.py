"""W&B dashboards as code: the comparison workspace of cna runs (`python -m cna.dashboard`).

`spec` holds the panel layout and the metric keys, named as the tracker logs them; `workspace` turns it into
a `wandb-workspaces` workspace or report (an optional dependency: `pip install 'cna[dashboard]'`).
"""

from cna.dashboard.spec import DashboardSpec, Key, Panel, Section, dashboard_spec, logged_keys, missing_keys

__all__ = ["DashboardSpec", "Key", "Panel", "Section", "dashboard_spec", "logged_keys", "missing_keys"]
