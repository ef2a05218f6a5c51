"""The sweep's plots: artifacts of the parent run, beside the summary, rebuilt by a command."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.finish import best_row
from orchestrator.report import EVAL_VS_PARAMS, LOSS_CURVES, PLOTS, main
from orchestrator.side_by_side import SIDE_BY_SIDE, inline
from orchestrator.tracking.keys import REPORT_DIR

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_image(path: Path) -> None:
    import matplotlib.image
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1024, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 200
    pixels = matplotlib.image.imread(str(path))
    assert pixels.ndim == 3 and pixels.std() > 0  # not a blank canvas


@pytest.mark.slow
def test_plots_are_artifacts_of_the_parent_run_and_open_as_images(optuna_run, tmp_path):
    run = optuna_run
    parent_id = run.parent.info.run_id
    names = {a.path for a in run.client.list_artifacts(parent_id, REPORT_DIR)}
    assert names == {f"{REPORT_DIR}/{name}" for name in (*PLOTS, SIDE_BY_SIDE)}
    folder = Path(run.client.download_artifacts(parent_id, REPORT_DIR, str(tmp_path)))
    for name in PLOTS:
        _is_image(folder / name)
    beside = (run.root / "outputs" / run.config.sweep.name / "latest").resolve()
    assert (beside / "summary.json").is_file()
    for name in PLOTS:
        _is_image(beside / name)
    assert sorted(run.summary["search"]["report"]) == sorted(str(beside / n)
                                                             for n in (*PLOTS, SIDE_BY_SIDE))


@pytest.mark.slow
def test_side_by_side_shows_the_best_trials_answers_to_the_same_prompts(optuna_run):
    run = optuna_run
    text = (run.root / "outputs" / run.config.sweep.name / "latest" / SIDE_BY_SIDE).read_text()
    best = best_row(run.summary["trials"])
    assert text.index(f"**{best['name']}**") < min(
        text.index(f"**{r['name']}**") for r in run.summary["trials"]
        if r is not best and f"**{r['name']}**" in text)  # the best first
    for sample in best["samples"]:  # its final answers, each under its prompt
        section = text[text.index(sample["prompt"].rstrip()):]
        assert f"reference: `{inline(sample['reference'])}`" in section
        assert f"| {best['name']} | `{inline(sample['prediction'])}` |" in section


@pytest.mark.slow
def test_the_report_command_rebuilds_them_for_a_past_sweep(optuna_run, tmp_path, capsys):
    run = optuna_run
    uri = run.config.tracking.uri
    out = tmp_path / "rebuilt"
    assert main(["--sweep", run.config.sweep.name, "--tracking-uri", uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / LOSS_CURVES), str(out / EVAL_VS_PARAMS), str(out / SIDE_BY_SIDE)]
    for name in PLOTS:
        _is_image(out / name)
    by_id = tmp_path / "by-id"
    assert main(["--run-id", run.parent.info.run_id, "--tracking-uri", uri, "--out",
                 str(by_id)]) == 0
    assert all((by_id / name).is_file() for name in PLOTS)
    assert main(["--sweep", "no-such-sweep", "--tracking-uri", uri, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --sweep: no sweep named 'no-such-sweep'")
