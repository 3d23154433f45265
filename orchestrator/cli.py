"""The `moe-sweep` command. User mistakes print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moe_core.accounting import count_params
from analysis.tables import AnalysisError
from moe_core.errors import ConfigError
from moe_core.files import DamagedFileWarning, write_json
from moe_core.train.checkpoint import CheckpointError
from moe_core.yaml_io import load_model_config


def _describe(args: argparse.Namespace) -> None:
    cfg = load_model_config(args.config)
    counts = count_params(cfg)
    table = Table(title=f"{args.config}: {cfg.moe.layout}, {cfg.n_layers} layers, d={cfg.d_model}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in counts.to_dict().items():
        table.add_row(key, f"{value:,}")
    Console().print(table)


def _train(args: argparse.Namespace) -> None:
    from moe_core.train.distributed import DataParallel, init_from_env
    from moe_core.train.loop import train_trial
    from moe_core.trial import load_trial_config
    from orchestrator.progress import TrainProgress

    trial = load_trial_config(args.config)
    init_from_env()  # under torchrun: data-parallel workers
    if not DataParallel.current().is_main:
        train_trial(trial, args.out)
        return
    with TrainProgress(trial.total_steps) as progress:
        summary = train_trial(trial, args.out, callbacks=[progress])
    Console().print(
        f"{summary.status}: {summary.steps} steps, {summary.tokens:,} tokens, train loss {summary.train_loss:.4f}, "
        f"val loss {summary.val_loss:.4f} (ppl {summary.perplexity:.1f}), "
        f"{summary.tokens_per_second:,.0f} tokens/s -> {args.out}"
    )
    if summary.status != "completed":
        raise SystemExit(1)


def _build_corpus(args: argparse.Namespace) -> None:
    from moe_core.data.config import DataConfig
    from moe_core.data.corpora import debian_docs_dir
    from moe_core.data.debian_docs import build_debian_docs

    out = Path(args.out) if args.out else debian_docs_dir(DataConfig())
    counts = build_debian_docs(out)
    Console().print(f"wrote {sum(counts.values()):,} documents to {out}: {counts}")


def _eval(args: argparse.Namespace) -> None:
    from moe_core.data.tokens import trial_tokenizer
    from moe_core.train.checkpoint import load_trained
    from moe_core.train.evaluation import Tasks
    from moe_core.train.loop import train_device

    if args.examples is not None and args.examples < 1:
        raise ConfigError(f"--examples must be at least 1, not {args.examples}")
    trial, model = load_trained(Path(args.run_dir))
    # As the trainer scored it at the end: its device (bf16 autocast on CUDA) and batch size.
    device = train_device(trial.train.device)
    tasks = Tasks.resolve(args.tasks or trial.train.downstream or ["bible_next_verse"], args.examples)
    scores = tasks.score(model.to(device), trial_tokenizer(trial.data), trial, device, args.batch_size)
    console = Console()
    console.print(f"{args.run_dir}: {trial.model.moe.layout if trial.model.moe.is_moe else 'dense'}", soft_wrap=True)
    table = Table()
    for col in ("task", "examples", "acc", "acc_norm"):
        table.add_column(col, justify="left" if col == "task" else "right")
    results = {}
    for name, r in scores.items():
        results[name] = {"acc": r.acc, "acc_norm": r.acc_norm, "n": r.n}
        table.add_row(name, str(r.n), f"{r.acc:.4f}", f"{r.acc_norm:.4f}")
    console.print(table)
    if args.json:
        write_json(Path(args.json), results, indent=1)
        console.print(f"-> {args.json}", soft_wrap=True)


def _export(args: argparse.Namespace) -> None:
    from moe_core.export import export_run  # needs the hf extra: a one-line error otherwise

    info = export_run(Path(args.run_dir), Path(args.out))
    remote = ", trust_remote_code=True" if info.remote_code else ""
    Console().print(f"wrote {info.architecture} to {info.out_dir} ({info.reason})", soft_wrap=True)
    Console().print(f"load it: AutoModelForCausalLM.from_pretrained({str(info.out_dir)!r}{remote})", soft_wrap=True)


def _demo(args: argparse.Namespace) -> None:
    from orchestrator.demo import run_demo  # imports torch training code only when asked

    run_demo(steps=args.steps, seed=args.seed)


def _plan(args: argparse.Namespace) -> None:
    import json

    from orchestrator.plan_view import plans_json, print_plans
    from orchestrator.planner import plan_path

    plans = plan_path(args.path)
    cluster = None
    if args.gpus is not None:
        from orchestrator.plan_view import queue_schedule

        cluster = queue_schedule(plans, args.gpus, args.gpus_per_node)
    if args.json:
        print(json.dumps(plans_json(plans, cluster), indent=1))
    else:
        print_plans(plans, Console(width=max(Console().width, 160)), limit=args.limit, cluster=cluster)


def _run(args: argparse.Namespace) -> None:
    from orchestrator.sweep_runner import RunOptions, run_sweeps

    options = RunOptions(
        runs_dir=args.runs_dir, address=args.address, restart=args.restart, mlflow_uri=args.mlflow_uri,
        num_cpus=args.num_cpus, dashboard=not args.no_dashboard, simulate=args.simulate,
    )
    counts = run_sweeps(args.sweep, options)
    if any(c.get("failed") for c in counts.values()):
        raise SystemExit(1)


def _status(args: argparse.Namespace) -> None:
    from orchestrator.status import print_statuses

    print_statuses(args.name, args.runs_dir, Console())


def _query(args: argparse.Namespace) -> None:
    from analysis.tables import query

    df = query(args.sql, args.runs_dir, args.sweep, simulated=args.simulated)
    if args.format == "csv":
        print(df.to_csv(index=False), end="")
    elif args.format == "json":
        print(df.to_json(orient="records", indent=1))
    elif args.format == "parquet":
        if not args.out:
            raise ConfigError("--format parquet needs --out FILE")
        df.to_parquet(args.out, index=False)
        print(f"{len(df)} rows -> {args.out}")
    else:
        table = Table(show_lines=False)
        for col in df.columns:
            table.add_column(str(col), overflow="fold")
        for row in df.head(args.limit).itertuples(index=False):
            table.add_row(*(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row))
        Console(width=max(Console().width, 160)).print(table)
        if len(df) > args.limit:
            print(f"... {len(df) - args.limit} more rows (--limit N, or --format csv)")


def _report(args: argparse.Namespace) -> None:
    from analysis.report import write_report
    from analysis.tables import load_steps, load_trials, simulated_trials, sweeps

    if not args.all and not args.name:
        raise ConfigError("give a sweep NAME or --all")
    names = sweeps(args.runs_dir) if args.all else [args.name]
    trials, steps = load_trials(args.runs_dir, names), load_steps(args.runs_dir, names)
    if trials.empty and simulated_trials(args.runs_dir, names):
        raise AnalysisError(f"{', '.join(names)}: only simulated trials (moe-sweep run --simulate: nothing trained); "
                            "findings need trained ones")
    title = "All sweeps" if args.all else f"Sweep {args.name}"
    path = write_report(trials, steps, args.out, f"{title}: MoE design findings ({len(trials)} trials)")
    Console().print(f"report -> {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-sweep", description="FLOP-matched MoE sweeps.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("describe", help="parameter and FLOP accounting of a trial config's model")
    p.add_argument("config", help="YAML file with a `model:` section")
    p.set_defaults(func=_describe)
    p = sub.add_parser("plan", help="expand sweep YAMLs into FLOP-matched trials; nothing runs")
    p.add_argument("path", help="a sweep YAML, or a folder of them")
    p.add_argument("--json", action="store_true", help="print one JSON object (trials, skipped, totals)")
    p.add_argument("--limit", type=int, default=40, help="trials shown per sweep in the table (default 40)")
    p.add_argument("--gpus", type=int, help="also the wall time of the whole queue on this many GPUs (list-scheduled, longest first)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="with --gpus: GPUs per node (default 8)")
    p.set_defaults(func=_plan)
    p = sub.add_parser("run", help="run (or resume) sweeps on Ray as one queue: results in runs/<name>/ and MLflow")
    p.add_argument("sweep", nargs="+", help="sweep YAMLs or folders of them (one queue, longest planned trial first)")
    p.add_argument("--runs-dir", default="runs", help="where results go (default: runs)")
    p.add_argument("--address", help="join a Ray cluster: 'auto', host:port or ray://host:port (default: local Ray)")
    p.add_argument("--restart", action="store_true", help="delete this sweep's results and start over")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite:///<runs-dir>/mlflow.db)")
    p.add_argument("--num-cpus", type=float, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard")
    p.add_argument("--simulate", type=float, metavar="SCALE",
                   help="no training: each trial holds its resources for its planned wall time x SCALE (rows say simulated)")
    p.set_defaults(func=_run)
    p = sub.add_parser("status", help="trials per state, best so far and time left of sweeps")
    p.add_argument("name", nargs="+", help="sweep names (folders under --runs-dir), or sweep YAMLs or folders of them")
    p.add_argument("--runs-dir", default="runs")
    p.set_defaults(func=_status)
    p = sub.add_parser("query", help="DuckDB SQL over the result tables (tables: trials, steps)")
    p.add_argument("sql", help="e.g. \"select layout, avg(val_loss) from trials group by 1\"")
    p.add_argument("--sweep", help="one sweep (default: every sweep under --runs-dir)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    p.add_argument("--out", help="output file for --format parquet")
    p.add_argument("--limit", type=int, default=50, help="rows shown as a table (default 50)")
    p.add_argument("--simulated", action="store_true", help="the simulated trials (--simulate runs) instead of trained ones")
    p.set_defaults(func=_query)
    p = sub.add_parser("report", help="the study's findings as figures and an HTML page")
    p.add_argument("name", nargs="?", help="sweep name")
    p.add_argument("--all", action="store_true", help="every sweep under --runs-dir together")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--out", required=True, help="output folder (index.html and PNGs)")
    p.set_defaults(func=_report)
    p = sub.add_parser("train", help="train one trial config alone (no Ray, no MLflow)")
    p.add_argument("config", help="trial YAML with model, train, data sections")
    p.add_argument("--out", required=True, help="output folder; re-running on it resumes")
    p.set_defaults(func=_train)
    p = sub.add_parser("eval", help="score a trained trial on multiple-choice tasks (accuracy, as lm-eval-harness)")
    p.add_argument("run_dir", help="the trial's folder (`train --out`, or runs/<sweep>/trial_runs/<trial_id>)")
    p.add_argument("--tasks", nargs="+", help="built-in task names or JSONL files (default: the trial's "
                   "train.downstream, else bible_next_verse)")
    p.add_argument("--examples", type=int, help="at most this many examples per task")
    p.add_argument("--batch-size", type=int, help="requests per forward pass (default: as the trainer, 4 x micro_batch_size)")
    p.add_argument("--json", help="also write the accuracies to this JSON file")
    p.set_defaults(func=_eval)
    p = sub.add_parser("export", help="write a trained trial in the Hugging Face format (transformers, lm-eval, vLLM)")
    p.add_argument("run_dir", help="the trial's folder (`train --out`, or runs/<sweep>/trial_runs/<trial_id>)")
    p.add_argument("--out", required=True, help="a new or empty folder")
    p.set_defaults(func=_export)
    p = sub.add_parser("build-corpus", help="build a built-in corpus from installed Debian packages")
    p.add_argument("name", choices=["debian-docs"])
    p.add_argument("--out", help="output folder (default: the data cache's corpora/debian_docs)")
    p.set_defaults(func=_build_corpus)
    p = sub.add_parser("demo", help="train dense, vanilla MoE, UniPool and PathMoE on a synthetic task")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    return parser


def _one_line_warnings() -> None:
    """Damaged files set aside or left out are reported as one line each, not as Python warnings."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
        if issubclass(category, DamagedFileWarning):
            print(f"moe-sweep: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _one_line_warnings()
    try:
        args.func(args)
    except (ConfigError, CheckpointError, AnalysisError) as err:
        print(f"moe-sweep: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
