"""dapo report: PNGs and a self-contained HTML page from hand-written run directories."""
import json

import pytest

pytest.importorskip("matplotlib")

from dapo.report import ReportError, load_run, main, mean_over_seeds, read_metrics, write_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(path, preset, steps=6, with_eval=True, drop=(), summary=True, config=True):
    path.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        m = {
            "step": s, "rollout/acc": 0.1 * s, "actor/entropy": 1.0 / s, "response/len_mean": 10.0 + s,
            "actor/clipfrac_high": 0.01 * s, "actor/clipfrac_low": 0.002 * s, "batch/kept_frac": 0.5,
            "batch/samples_total": 64.0 * s, "time/step": 0.5,
        }
        if with_eval and s % 3 == 0:
            m["eval/acc"] = 0.05 * s
        for k in drop:
            m.pop(k, None)
        lines.append(json.dumps(m))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if summary:
        (path / "summary.json").write_text(json.dumps(
            {"before": {"accuracy": 0.125, "n": 8}, "after": {"accuracy": 0.625, "n": 8}, "wall_s": 12.5,
             "steps": steps, "preset": preset, "stopped_by": None}))
    if config:
        (path / "config.yaml").write_text(f"preset: {preset}\nseed: 0\nalgo:\n  eps_high: 0.28\n")
    return path


def assert_png(p):
    data = p.read_bytes()
    assert data[:8] == PNG_MAGIC, p
    assert len(data) > 5000, (p, len(data))  # a drawn plot, not an empty canvas


def test_two_runs_overlaid(tmp_path):
    a = make_run(tmp_path / "runs" / "dapo-addition-1", "dapo")
    b = make_run(tmp_path / "runs" / "baseline", "grpo", steps=4, with_eval=False)
    page = write_report([a, b], tmp_path / "out")
    assert page == tmp_path / "out" / "report.html"
    for stem in ("accuracy", "entropy", "response_length", "clip_fraction", "groups_kept"):
        for x in ("step", "samples"):
            assert_png(tmp_path / "out" / f"{stem}_vs_{x}.png")
    text = page.read_text()
    assert "dapo-addition-1" in text and "baseline (grpo)" in text  # preset added when the name lacks it
    assert text.count("src='data:image/png;base64,") == 10
    assert "0.625" in text and "12.5" in text  # the summary table
    assert "<img" in text and "file://" not in text and "src='/" not in text  # self-contained


def test_missing_metrics_are_skipped(tmp_path):
    a = make_run(tmp_path / "a", "dapo", with_eval=False, drop=("actor/entropy", "batch/samples_total"))
    b = make_run(tmp_path / "b", "dapo", with_eval=False, drop=("actor/entropy",), summary=False, config=False)
    page = write_report([a, b], tmp_path / "out")
    out = tmp_path / "out"
    assert not (out / "entropy_vs_step.png").exists() and not (out / "entropy_vs_samples.png").exists()
    assert_png(out / "accuracy_vs_samples.png")  # b still has samples_total
    text = page.read_text()
    assert "Mean token entropy" not in text and "no summary.json" in text


def test_run_without_metrics_names_it(tmp_path):
    good = make_run(tmp_path / "good", "dapo")
    bad = tmp_path / "empty-run"
    bad.mkdir()
    with pytest.raises(ReportError, match="empty-run.*metrics.jsonl"):
        write_report([good, bad], tmp_path / "out")
    with pytest.raises(ReportError, match="no such run directory"):
        load_run(tmp_path / "nope")


def test_metrics_reader_tolerates_resume_and_cut_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "rollout/acc": 0.1}\n{"step": 2, "rollout/acc": "nan"}\n'
                 '{"step": 2, "rollout/acc": 0.3}\n{"step": 3, "rollo')
    rows = read_metrics(p)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["rollout/acc"] == 0.3


def test_cli_default_out_dir(tmp_path, capsys):
    a = make_run(tmp_path / "r1", "dapo", steps=3)
    assert main([str(a)]) == 0
    assert (a / "report" / "report.html").exists()
    assert "report.html" in capsys.readouterr().out


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ReportError, match="pip install matplotlib"):
        write_report([make_run(tmp_path / "r", "dapo")], tmp_path / "out")


def test_mean_over_seeds_averages_each_step(tmp_path):
    for seed, steps in ((0, 4), (1, 6)):
        make_run(tmp_path / f"dapo-lr0.0001-s{seed}", "dapo", steps=steps, with_eval=False)
    (tmp_path / "dapo-lr0.0001-s1" / "metrics.jsonl").write_text("\n".join(
        json.dumps({"step": s, "rollout/acc": 1.0, "batch/samples_total": 100.0 * s}) for s in range(1, 7)) + "\n")
    make_run(tmp_path / "grpo-lr0.0001-s0", "grpo", steps=3, with_eval=False)
    for seed in (0, 1):  # names without the preset get it appended: "len-s0 (dapo)"
        make_run(tmp_path / f"len-s{seed}", "dapo", steps=2, with_eval=False)
    runs = [load_run(tmp_path / n) for n in ("dapo-lr0.0001-s0", "dapo-lr0.0001-s1", "grpo-lr0.0001-s0", "len-s0", "len-s1")]
    lines = {r.label: r for r in mean_over_seeds(runs)}
    assert set(lines) == {"dapo-lr0.0001 (mean of 2)", "grpo-lr0.0001", "len (dapo) (mean of 2)"}
    d = lines["dapo-lr0.0001 (mean of 2)"]
    assert [r["step"] for r in d.rows] == [1, 2, 3, 4, 5, 6]
    assert d.rows[1]["rollout/acc"] == pytest.approx((0.2 + 1.0) / 2)  # both seeds at step 2
    assert d.rows[1]["batch/samples_total"] == pytest.approx((128.0 + 200.0) / 2)
    assert d.rows[4]["rollout/acc"] == 1.0  # only seed 1 reached step 5
    assert d.rows[0]["actor/entropy"] == 1.0  # a key only one seed logged is that seed's value
    page = write_report([r.path for r in runs], tmp_path / "rep", mean_seeds=True)
    assert_png(page.parent / "accuracy_vs_step.png")
    assert "dapo-lr0.0001-s1" in page.read_text()  # the table still lists every run


def test_the_held_out_line_runs_from_before_to_after(tmp_path):
    """eval/acc every 3 steps (0.15 at 3, 0.30 at 6 of 7) plus summary.json's before (at 0) and after (at the
    last step): on both axes; a run whose last step measured already keeps that one point there."""
    run = load_run(make_run(tmp_path / "r", "dapo", steps=7))
    assert run.series("step", "eval/acc") == ([0.0, 3, 6, 7.0], [0.125, pytest.approx(0.15), pytest.approx(0.3), 0.625])
    assert run.series("batch/samples_total", "eval/acc")[0] == [0.0, 192.0, 384.0, 448.0]
    assert run.series("step", "rollout/acc")[0] == [1, 2, 3, 4, 5, 6, 7]  # other lines untouched
    ends = load_run(make_run(tmp_path / "e", "dapo", steps=6))
    assert ends.series("step", "eval/acc")[0] == [0.0, 3, 6]
    bare = load_run(make_run(tmp_path / "b", "dapo", steps=4, with_eval=False, summary=False))
    assert bare.series("step", "eval/acc") == ([], [])


def test_multi_turn_panels_drawn_when_logged(tmp_path):
    """Turns, tool calls per trajectory and the observation share: drawn from a run that logged them (a
    hand-written metrics file), with the held-out series where it has them; absent for a single-turn run."""
    run = make_run(tmp_path / "tools", "dapo", steps=4)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in lines:
        s = r["step"]
        r.update({"env/turns_mean": 1.0 + 0.25 * s, "tool/calls_per_traj": 0.25 * s, "env/obs_frac": 0.1 * s})
        if s % 2 == 0:
            r.update({"eval/turns_mean": 1.5, "eval/tool_calls_mean": 0.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert load_run(run).series("step", "tool/calls_per_traj") == ([1, 2, 3, 4], [0.25, 0.5, 0.75, 1.0])
    assert load_run(run).series("step", "eval/turns_mean") == ([2, 4], [1.5, 1.5])
    write_report([run], tmp_path / "out")
    for stem in ("turns", "tool_calls", "obs_frac"):
        for x in ("step", "samples"):
            assert_png(tmp_path / "out" / f"{stem}_vs_{x}.png")
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 16  # the five usual panels and three more, two axes each
    write_report([make_run(tmp_path / "plain", "dapo")], tmp_path / "out2")
    assert not list((tmp_path / "out2").glob("turns_*")) and not list((tmp_path / "out2").glob("obs_frac_*"))
