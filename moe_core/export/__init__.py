"""Export to the Hugging Face format (`export_hf`, `export_run`); needs transformers and
safetensors, which the rest of moe_core does not, so they are checked here once, as a one-line
error instead of an ImportError deep in the export."""

from __future__ import annotations

from importlib.util import find_spec

from moe_core.errors import ConfigError

_MISSING = [name for name in ("transformers", "safetensors") if find_spec(name) is None]
if _MISSING:
    raise ConfigError(f"exporting to Hugging Face needs {' and '.join(_MISSING)}: pip install 'moe-sweep[hf]'")

from moe_core.export.hf import ExportInfo, export_hf, export_run

__all__ = ["ExportInfo", "export_hf", "export_run"]
