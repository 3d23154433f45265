"""SQL and pandas over the sweeps' result tables (schema: docs/results.md). No torch here.

DuckDB loads the per-trial Parquet files into two tables, `trials` and `steps`, covering every
sweep under the runs folder, or one. Files of different sweeps may differ in extra columns
(`val_loss/<set>`, routing statistics): they are unioned by name.

A damaged file (truncated, empty, not Parquet, another table's: damage from outside, such as a
full disk on shared storage) is left out with a `DamagedFileWarning` naming it, and listed in a
third table, `damaged` (file, reason); `moe-sweep run` repairs it.

Rows of simulated trials (`moe-sweep run --simulate`: resources held, nothing trained) are never
mixed with trained ones: the tables hold trained trials only, or with `simulated=True` simulated
ones only.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import duckdb
import pandas as pd

from moe_core.files import DamagedFileWarning
from orchestrator.results import DamagedFile, file_damage, read_rows_of


class AnalysisError(ValueError):
    """A user mistake (a missing sweep, bad SQL): the message is one line."""


def sweeps(runs_dir: str | Path = "runs") -> list[str]:
    """Sweeps with result tables under `runs_dir`."""
    runs = Path(runs_dir)
    if not runs.is_dir():
        return []
    return sorted(p.name for p in runs.iterdir() if any((p / "tables" / "trials").glob("*.parquet")))


def _files(runs_dir: str | Path, table: str, sweep: str | list[str] | None) -> list[str]:
    runs = Path(runs_dir)
    known = sweeps(runs)
    names = known if sweep is None else ([sweep] if isinstance(sweep, str) else list(sweep))
    missing = [n for n in names if n not in known]
    if missing:
        have = f"; sweeps there: {', '.join(known)}" if known else " (no sweeps there yet: run `moe-sweep run`)"
        raise AnalysisError(f"no results for sweep '{missing[0]}' under {runs}{have}")
    if not names:
        raise AnalysisError(f"no sweep results under {runs} (run `moe-sweep run SWEEP.yaml` first)")
    return [str(f) for n in names for f in sorted((runs / n / "tables" / table).glob("*.parquet"))]


def connect(runs_dir: str | Path = "runs", sweep: str | list[str] | None = None,
            simulated: bool = False) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with tables `trials` and `steps`, loaded once from the
    per-trial Parquet files (opening thousands of small files per query would dominate; loaded,
    queries over 2,000 trials x 1,000 steps take milliseconds). Keep it for many queries. The
    tables hold trained trials, or with `simulated` simulated ones, never both."""
    con = duckdb.connect()
    damaged: list[tuple[str, str]] = []
    for table in ("trials", "steps"):
        files, bad = _whole(_files(runs_dir, table, sweep), table)
        damaged += bad
        try:
            _load(con, table, files)
        except duckdb.Error:  # a footer that reads but data that does not: find the files by reading each
            files, bad = _readable(files, table)
            damaged += bad
            _load(con, table, files)
    con.execute("create table damaged (file varchar, reason varchar)")
    for file, reason in damaged:
        con.execute("insert into damaged values (?, ?)", [file, reason])
        warnings.warn(f"{file}: damaged ({reason}); left out of the tables (`moe-sweep run` repairs it)",
                      DamagedFileWarning, stacklevel=2)
    has_flag = "simulated" in [c[0] for c in con.execute("describe trials").fetchall()]
    if has_flag:  # tables written before the column existed hold trained trials only
        con.execute(f"delete from trials where coalesce(simulated, false) != {str(simulated).lower()}")
    elif simulated:
        con.execute("delete from trials")
    con.execute("delete from steps where trial_id not in (select trial_id from trials)")
    return con


def _load(con: duckdb.DuckDBPyConnection, table: str, files: list[str]) -> None:
    con.execute(f"drop table if exists {table}")
    if files:
        listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        con.execute(f"create table {table} as select * from read_parquet([{listing}], union_by_name = true)")
    else:
        con.execute(f"create table {table} (trial_id varchar)")


def _whole(files: list[str], table: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The files whose footers are whole, and (file, reason) for the others (footers only: cheap)."""
    good, bad = [], []
    for f in files:
        try:
            damage = file_damage(Path(f), table)
        except FileNotFoundError:  # gone since listed (a restart cleaning up)
            continue
        (good.append(f) if damage is None else bad.append((f, damage)))
    return good, bad


def _readable(files: list[str], table: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The files that read whole, and (file, reason) for the others (every page read)."""
    good, bad = [], []
    for f in files:
        try:
            read_rows_of(Path(f), table)
            good.append(f)
        except DamagedFile as err:  # read_rows_of turns every read error into one
            bad.append((f, err.reason))
    return good, bad


def simulated_trials(runs_dir: str | Path = "runs", sweep: str | list[str] | None = None) -> int:
    """How many simulated trials the sweeps hold (what the default tables leave out)."""
    con = connect(runs_dir, sweep, simulated=True)
    try:
        return int(con.execute("select count(*) from trials").fetchone()[0])
    finally:
        con.close()


# Statement kinds a query may run: reads only (SELECT covers WITH, DESCRIBE, SHOW and SUMMARIZE).
_READS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def query(sql: str, runs_dir: str | Path = "runs", sweep: str | list[str] | None = None,
          simulated: bool = False) -> pd.DataFrame:
    """Run read-only DuckDB SQL over the tables `trials` and `steps`; a pandas DataFrame. A write
    (DROP, INSERT, COPY, ATTACH, SET...) is refused: the tables are copies, and saying "Success"
    to a write that changes nothing on disk would mislead."""
    con = connect(runs_dir, sweep, simulated)
    try:
        writes = [s.type.name for s in con.extract_statements(sql) if s.type not in _READS]
        if writes:
            raise AnalysisError(f"queries are read-only (SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN); got {writes[0]}")
        con.execute("set enable_external_access = false")  # nor read or write other files
        return con.execute(sql).df()
    except duckdb.Error as err:
        raise AnalysisError(f"SQL error: {_one_line(err)}") from None
    finally:
        con.close()


def _one_line(err: duckdb.Error) -> str:
    """DuckDB's message with its hints ("Candidate bindings: ...") but without the caret picture
    of the query that follows them."""
    lines = []
    for line in str(err).strip().splitlines():
        if line.startswith("LINE "):
            break
        if line.strip():
            lines.append(line.strip())
    return "; ".join(lines)


def load_trials(runs_dir: str | Path = "runs", sweep: str | list[str] | None = None,
                simulated: bool = False) -> pd.DataFrame:
    """The trials table (one row per trial) of one, several or all sweeps: trained trials, or
    with `simulated` the simulated ones."""
    return query("select * from trials", runs_dir, sweep, simulated)


def load_steps(runs_dir: str | Path = "runs", sweep: str | list[str] | None = None,
               simulated: bool = False) -> pd.DataFrame:
    """The steps table (one row per optimizer step of every trial)."""
    return query("select * from steps", runs_dir, sweep, simulated)
