"""The README's result tables are the committed results' (regenerated here from results/)."""

from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_coreset_table_is_generated_from_the_committed_runs():
    from experiments.seeds import main
    from vcl_jax.analysis.seeds import uncertainty_seeds_markdown

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    start = readme.index("<!-- coreset-table:")
    runs = readme[start:readme.index("-->", start)].split(":", 1)[1].split()
    out = main([os.path.join(ROOT, r) for r in runs])
    metrics = [json.load(open(os.path.join(ROOT, r, "metrics.json"))) for r in runs]
    assert uncertainty_seeds_markdown(metrics, out).strip() in readme


def test_readme_split_mnist_table_is_the_committed_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for seed in (0, 1, 2):
        path = os.path.join(ROOT, "results", "split_mnist", f"vcl_ng_paper_s{seed}",
                            "metrics.json")
        with open(path) as f:
            runs = json.load(f)["runs"]
        for name, r in runs.items():  # the average accuracy after the last task
            assert f"{100 * r['average'][-1]:.2f}%" in readme, (seed, name)


def test_readme_rank1_tables_are_generated_from_the_committed_runs():
    from vcl_jax.analysis.seeds import fd_across_seeds, fd_seeds_markdown

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    marker, start, found = "<!-- rank1-table:", 0, 0
    while (start := readme.find(marker, start)) >= 0:
        runs = readme[start:readme.index("-->", start)].split(":", 1)[1].split()
        metrics = [json.load(open(os.path.join(ROOT, r, "metrics.json"))) for r in runs]
        assert fd_seeds_markdown(fd_across_seeds(metrics)).strip() in readme, runs
        start, found = start + 1, found + 1
    assert found >= 1
