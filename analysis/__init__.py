"""analysis: reads result tables (Parquet) and reports the study's findings. Imports no torch."""
