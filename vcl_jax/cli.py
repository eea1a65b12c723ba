"""The command line every experiment shares: a preset, overrides, a run directory."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from vcl_jax.config import override, preset


def experiment_main(argv: list[str] | None, *, doc: str, name: str, presets: dict,
                    run: Callable[..., dict]) -> dict:
    """Parses ``--preset --run-dir --data-dir --quiet key=value…``, runs, prints the summary.

    Args:
      argv: command-line arguments (None: ``sys.argv``).
      doc: the entry point's docstring (its ``--help``).
      name: experiment name; the default run directory is ``runs/<name>_<preset>``.
      presets: the experiment's presets.
      run: ``run(cfg, run_dir, progress=...) -> metrics``, writing ``summary.md``.
    """
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help=f"one of {', '.join(presets)}")
    parser.add_argument("--run-dir", default=None, help=f"default: runs/{name}_<preset>")
    parser.add_argument("--data-dir", default=None, help="folder with local dataset files")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    # Intermixed: overrides may stand before, between or after the options.
    args = parser.parse_intermixed_args(argv)
    cfg = override(preset(presets, args.preset), args.overrides)
    if args.data_dir:
        cfg = override(cfg, [f"data_dir={args.data_dir}"])
    run_dir = args.run_dir or os.path.join("runs", f"{name}_{args.preset}")
    metrics = run(cfg, run_dir, progress=not args.quiet)
    with open(os.path.join(run_dir, "summary.md")) as f:
        print(f.read())
    return metrics
