"""Figures: self-contained HTML dashboards (plotly) and the static circuit figure (matplotlib)."""

from refusal_lab.viz.baseline import write_baseline_dashboard
from refusal_lab.viz.circuit import draw_circuit
from refusal_lab.viz.dashboard import write_dashboard

__all__ = ["draw_circuit", "write_baseline_dashboard", "write_dashboard"]
