"""Local result files and the W&B run."""

from refusal_lab.tracking.results import ResultFiles, package_versions, write_results
from refusal_lab.tracking.wandb_tracker import JobInfo, NullTracker, WandbTracker, make_tracker

__all__ = ["JobInfo", "NullTracker", "ResultFiles", "WandbTracker", "make_tracker", "package_versions", "write_results"]
