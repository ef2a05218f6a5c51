"""Task metrics of a generated answer against its reference, and user metrics by import path.

- `exact_match`: 1.0 when prediction and reference are equal after stripping and collapsing runs
  of whitespace to one space; case counts (the bundled tasks ask for case: "Uppercase ...").
- `token_f1`: SQuAD's token F1 on lower-cased whitespace tokens (no article or punctuation
  removal, which is English-specific): the harmonic mean of token precision and recall, with
  multiset overlap. Two empty answers score 1.0, one empty answer 0.0.
- `load_metric("package.module:function")`: a user's `function(prediction, reference) -> float`.

Pure Python: the orchestrator checks a user metric's path with it before anything starts.
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable

Metric = Callable[[str, str], float]
#: Key of the samples in the metrics `train_pack` reports at an evaluation (not a float metric).
SAMPLES = "samples"

__all__ = ["BUILTIN", "SAMPLES", "Metric", "exact_match", "load_metric", "metric_name", "normalize",
           "score", "token_f1"]


def normalize(text: str) -> str:
    """`text` stripped, with every run of whitespace (newlines included) as one space."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = prediction.lower().split(), reference.lower().split()
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


#: The metrics every generation is scored with, by the name they are logged under (`eval_` + name).
BUILTIN: dict[str, Metric] = {"exact_match": exact_match, "token_f1": token_f1}


def load_metric(path: str) -> Metric:
    """The function at `package.module:function`. Raises ValueError saying what is wrong (the
    form, a module that does not import, a missing or non-callable attribute)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"must be package.module:function, got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import-time failure is the user's module, said in one line
        raise ValueError(f"cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"{path!r} is not callable")
    return fn


def metric_name(path: str) -> str:
    """The name a user metric is logged under, without `eval_`: its function's name."""
    return path.partition(":")[2]


def score(prediction: str, reference: str, user: dict[str, Metric] | None = None) -> dict:
    """Every built-in metric and each of `user` ({name: function}) of one answer, as floats."""
    out = {name: fn(prediction, reference) for name, fn in BUILTIN.items()}
    for name, fn in (user or {}).items():
        out[name] = float(fn(prediction, reference))
    return out
