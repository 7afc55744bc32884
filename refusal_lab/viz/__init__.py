"""Figures: the self-contained HTML dashboard (plotly) and the static circuit figure (matplotlib)."""

from refusal_lab.viz.circuit import draw_circuit
from refusal_lab.viz.dashboard import write_dashboard

__all__ = ["draw_circuit", "write_dashboard"]
