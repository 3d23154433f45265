"""analysis: SQL and pandas over the sweeps' result tables, and the study's findings as figures and
an HTML report. Reads Parquet only; imports no torch (a test checks)."""

from analysis.tables import AnalysisError, connect, load_steps, load_trials, query, sweeps

__all__ = ["AnalysisError", "connect", "load_steps", "load_trials", "query", "sweeps"]
