"""What a sweep optimises: `sweep.objective` (an eval metric) in `sweep.mode` (min | max).

One place decides "better" for the leaderboard, ASHA's rungs, Optuna's direction and the
registry's champion: `Objective.loss(value)` is smaller for better values in either mode, and
infinite for a trial without a finite value (it ranks last).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("min", "max")


@dataclass(frozen=True)
class Objective:
    metric: str = "eval_loss"
    mode: str = "min"

    @classmethod
    def of(cls, config) -> Objective:
        return cls(config.sweep.objective, config.sweep.mode)

    @property
    def direction(self) -> str:
        """Optuna's study direction."""
        return "minimize" if self.mode == "min" else "maximize"

    def value(self, metrics: dict | None) -> float | None:
        """The objective in `metrics` (an evaluation's, or a result's last), None if absent."""
        value = (metrics or {}).get(self.metric)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value)

    def of_result(self, result) -> float | None:
        """A `qlora.TrialResult`'s final objective (its last evaluation's metrics)."""
        metrics = dict(getattr(result, "eval_metrics", None) or {})
        if result.eval_loss is not None:
            metrics.setdefault("eval_loss", result.eval_loss)
        return self.value(metrics)

    def loss(self, value: float | None) -> float:
        """Smaller is better, in either mode; no finite value ranks last (inf)."""
        if value is None or not math.isfinite(value):
            return math.inf
        return value if self.mode == "min" else -value

    def of_row(self, row: dict) -> float | None:
        """A summary row's final objective (`eval_metrics`, with `eval_loss` beside them)."""
        metrics = dict(row.get("eval_metrics") or {})
        if row.get("eval_loss") is not None:
            metrics.setdefault("eval_loss", row["eval_loss"])
        return self.value(metrics)

    def ranked(self, rows: list[dict]) -> list[dict]:
        """The leaderboard: trials that succeeded, best objective first, then the others; ties
        by name."""
        from qlora.config import TrialStatus

        def key(row):
            ok = TrialStatus(row["status"]).succeeded
            return (not ok, self.loss(self.of_row(row)) if ok else math.inf, row["name"])

        return sorted(rows, key=key)

    def best(self, rows: list[dict]) -> dict | None:
        """The finished trial with the best final objective (None if no trial finished with one)."""
        from qlora.config import TrialStatus

        done = [r for r in rows if r.get("status") == TrialStatus.FINISHED
                and math.isfinite(self.loss(self.of_row(r)))]
        return self.ranked(done)[0] if done else None


def leaderboard_markdown(rows: list[dict], objective: Objective, title: str) -> str:
    """The leaderboard as a markdown table (the parent run's description in the MLflow UI)."""
    extra = [k for k in ("eval_exact_match", "eval_token_f1") if k != objective.metric
             and any(k in (r.get("eval_metrics") or {}) for r in rows)]
    cols = ["#", "trial", "lora_r", "lora_alpha", "learning_rate", f"**{objective.metric}**"]
    if objective.metric != "eval_loss":
        cols.append("eval_loss")
    cols += [*extra, "quant", "bits/w", "peak MiB", "status"]
    lines = [f"### {title}", "",
             f"Ranked by `{objective.metric}` ({objective.mode}).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i, r in enumerate(objective.ranked(rows), 1):
        metrics = {**(r.get("eval_metrics") or {}), "eval_loss": r.get("eval_loss")}
        cells = [str(i), r["name"], str(r["lora_r"]), f"{r['lora_alpha']:g}",
                 f"{r['learning_rate']:g}", _num(objective.of_row(r))]
        if objective.metric != "eval_loss":
            cells.append(_num(metrics["eval_loss"]))
        cells += [_num(metrics.get(k)) for k in extra] + base_cells(r) + [str(r["status"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def base_cells(row: dict) -> list[str]:
    """A row's base as the leaderboards show it: storage type (with LoftQ's init), measured
    bits per weight, peak memory in MiB ("-" where not measured)."""
    quant = row.get("quant_type") or "-"
    if row.get("lora_init") == "loftq":
        quant += "+loftq"
    bits, peak = row.get("base_bits_per_weight"), row.get("memory_peak_mib")
    return [quant, "-" if bits is None else f"{bits:.2f}",
            "-" if peak is None else f"{peak:.0f}"]


def _num(value) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"
