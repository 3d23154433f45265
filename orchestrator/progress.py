"""A rich progress bar for `moe-sweep train`: steps, loss and throughput."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from moe_core.train.callbacks import TrainCallback


class TrainProgress(TrainCallback):
    """A live bar on a terminal; one line per evaluation when output goes to a file or pipe."""

    def __init__(self, total_steps: int) -> None:
        self._total = total_steps
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
        )
        self._task = self._progress.add_task("train", total=total_steps, loss="-", val="-", tps="-")
        self._tokenising: Any = None  # a second line while the corpus is tokenised (first use only)

    def __enter__(self) -> "TrainProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def on_tokenising(self, source: str, tokens: int) -> None:
        if self._tokenising is None:
            self._tokenising = self._progress.add_task(f"tokenising {source}", total=None, loss="-", val="-", tps="-")
        self._progress.update(self._tokenising, completed=tokens)

    def on_step(self, step: int, row: dict[str, Any], model: Any) -> None:
        if self._tokenising is not None:
            self._progress.remove_task(self._tokenising)
            self._tokenising = None
        fields = {"loss": f"{row['train_loss']:.3f}", "tps": f"{row.get('tokens_per_second', 0):,.0f}"}
        if "val_loss" in row:
            fields["val"] = f"{row['val_loss']:.3f}"
            if not self._progress.console.is_terminal:
                self._progress.console.print(
                    f"step {step}/{self._total}  loss {fields['loss']}  val {fields['val']}  {fields['tps']} tok/s"
                )
        self._progress.update(self._task, completed=step, **fields)
