"""The report: sweet-spot selection on hand-made summaries; missing runs are listed, not fatal."""

import json

import pytest
import yaml

from prunerl.report import aggregate, read_runs, report, sweet_spots, worst_seed_table


def write_run(root, name, *, method, sparsity, seed, clean, attacks, kappa=0.3, interval=15,
              lipschitz=None, summary=True):
    d = root / name
    d.mkdir(parents=True)
    cfg = {"env": {"name": "hopper"}, "algo": {"kappa": kappa}, "seed": seed,
           "pruning": {"criterion": method, "final_sparsity": sparsity, "interval": interval}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    if summary:
        (d / "summary.json").write_text(json.dumps({
            "env": "hopper", "kappa": kappa, "seed": seed, "pruning_method": method,
            "final_sparsity": sparsity, "clean_return": clean, "attack_returns": attacks,
            "lipschitz_surrogate": lipschitz, "certified_bound": None, "sparsity": {"global": sparsity}}))
    return d


@pytest.fixture
def hand_made(tmp_path):
    # baseline (unpruned): clean 100, mad 50, random 80 (two seeds averaging to these)
    write_run(tmp_path, "b0", method="none", sparsity=0.0, seed=0, clean=90, attacks={"mad": 40, "random": 70})
    write_run(tmp_path, "b1", method="none", sparsity=0.0, seed=1, clean=110, attacks={"mad": 60, "random": 90})
    # magnitude at 0.3: clean 100 (1.0), mad 75 (1.5), random 80 (1.0) -> robust 1.25, score 1.125
    write_run(tmp_path, "m3a", method="magnitude", sparsity=0.3, seed=0, clean=100, attacks={"mad": 70, "random": 80})
    write_run(tmp_path, "m3b", method="magnitude", sparsity=0.3, seed=1, clean=100, attacks={"mad": 80, "random": 80})
    # magnitude at 0.7: clean 60 (0.6), mad 100 (2.0), random 96 (1.2) -> robust 1.6, score 1.1
    write_run(tmp_path, "m7a", method="magnitude", sparsity=0.7, seed=0, clean=60, attacks={"mad": 100, "random": 96})
    write_run(tmp_path, "m7b", method="magnitude", sparsity=0.7, seed=1, clean=60, attacks={"mad": 100, "random": 96})
    # a failed run: config but no summary
    write_run(tmp_path, "broken", method="magnitude", sparsity=0.9, seed=0, clean=0, attacks={}, summary=False)
    return tmp_path


def test_sweet_spot_selection_by_hand(hand_made):
    rs = read_runs(hand_made)
    assert len(rs.runs) == 6
    assert [why for p, why in rs.problems if p.endswith("broken")] == [
        "no summary.json (the run failed or has not finished)"]
    (row,) = sweet_spots(aggregate(rs.runs))
    assert row["method"] == "magnitude" and row["sweet_spot"] == 0.3
    assert row["clean"] == pytest.approx(1.0)
    assert row["norm_robust_avg"] == pytest.approx((75 / 50 + 80 / 80) / 2)
    # worst attack at 0.3 is mad (75) vs the baseline's worst (mad, 50)
    assert row["robust_worst"] == pytest.approx(75 / 50)
    assert row["score"] == pytest.approx((1.0 + 1.25) / 2)


def test_worst_seed_table_by_hand(hand_made):
    (row,) = worst_seed_table(aggregate(read_runs(hand_made).runs))
    # mad peaks at 0.7 (100; worst seed 100); random peaks at 0.7 (96; worst seed 96)
    assert row["pruning"] == 0.7
    assert row["worst_seed_abs"] == pytest.approx((100 + 96) / 2)
    assert row["worst_seed_norm"] == pytest.approx((100 / 50 + 96 / 80) / 2)


def test_report_writes_tables_figures_and_lists_missing_runs(hand_made, tmp_path):
    out = tmp_path / "out"
    result = report(hand_made, out)
    for name in ("summary.md", "table2_sweet_spots.md", "table2_sweet_spots.csv", "table3_worst_seed.md",
                 "table3_worst_seed.csv", "aggregated.csv", "fig2_frontier_hopper.png", "fig3_attacks_hopper.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    md = (out / "summary.md").read_text()
    assert "broken" in md and "Missing or failed runs" in md
    assert "| hopper | 0.30 | magnitude | 15 | 30% | 1.00 | 1.50 | 1.25 | 2 |" in md
    assert result["runs"] == 6


def test_report_on_small_real_runs(small_cfg, tmp_path):
    """Real (tiny) fits with pruning and the end-of-run evaluation, then the report on them."""
    from prunerl.fit import fit

    runs = tmp_path / "runs"
    for sparsity in (0.0, 0.5):
        for seed in (0, 1):
            fit(small_cfg("pruning=magnitude", f"pruning.final_sparsity={sparsity}", f"seed={seed}",
                          "evaluation.attacks=[random,mad]", "evaluation.episodes=2",
                          run_dir=runs / f"s{sparsity}_seed{seed}"))
    (runs / "crashed").mkdir()
    (runs / "crashed" / "config.yaml").write_text("env: {name: inverted_pendulum}\n")
    out = tmp_path / "report"
    result = report(runs, out)
    assert result["runs"] == 4
    assert [p for p, _ in result["problems"]] == [str(runs / "crashed")]
    (row,) = result["table2"]
    assert row["env"] == "inverted_pendulum" and row["method"] == "magnitude" and row["seeds"] == 2
    assert row["sweet_spot"] in (0.0, 0.5)
    for name in ("summary.md", "table2_sweet_spots.md", "table3_worst_seed.md", "aggregated.csv",
                 "fig2_frontier_inverted_pendulum.png", "fig3_attacks_inverted_pendulum.png",
                 "lipschitz_inverted_pendulum.png"):
        assert (out / name).stat().st_size > 0, name
    csv_text = (out / "aggregated.csv").read_text()
    assert "random_mean" in csv_text and "mad_mean" in csv_text and "lipschitz_mean" in csv_text
