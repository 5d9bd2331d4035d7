"""Reading fedsim run directories: metrics, summaries and configs as plain Python objects.

The privacy/utility tables, plots and reports build on these readers (see the analysis issue).
"""

from analysis.runs import Run, load_run

__all__ = ["Run", "load_run"]
