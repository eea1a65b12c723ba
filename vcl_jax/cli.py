"""The command line every experiment shares: a preset, overrides, a run directory.

:func:`command` runs an entry point as a program: the errors a user can fix (a bad
setting, missing data, a damaged checkpoint, a locked run directory, a diverged run)
print as one ``error:`` line and exit 2, and SIGTERM or Ctrl-C stops the run between
its writes' atomic steps with a non-zero exit (143 / 130), leaving every finished
checkpoint loadable for the re-run that resumes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

from vcl_jax import distributed
from vcl_jax.checkpoint import CheckpointError, ConfigMismatchError, read_run_config
from vcl_jax.config import ConfigError, config_text, flat_dict, from_dict, override, preset
from vcl_jax.data.errors import DataError
from vcl_jax.interrupt import Terminated, on_signal, stop_if_requested
from vcl_jax.run_lock import RunLockedError
from vcl_jax.training.guard import DivergenceError

# Errors whose message says what to change; anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, ConfigMismatchError, CheckpointError, DataError, DivergenceError,
               RunLockedError)


def command(main: Callable[[], object]) -> int:
    """Runs ``main()`` as a program and returns its exit status (see the module doc)."""
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        main()
        stop_if_requested()  # a SIGTERM during the last evaluation: the run is complete
        return 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "SIGTERM" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
        print(f"{what}: stopped. Every finished task's checkpoint is intact; re-run the same "
              f"command to resume after the last one.", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


COMPILE_CACHE_ENV = "VCL_JAX_COMPILE_CACHE"


def enable_compile_cache() -> str | None:
    """Turns on JAX's persistent compilation cache for this process, so that a program
    compiled once (a train step, a sampler of one batch) loads from disk in later runs and
    sub-runs instead of compiling again (VCL's train step: 17 s on 2 cores, 79 s unrolled).

    The folder: ``$VCL_JAX_COMPILE_CACHE``, else ``$JAX_COMPILATION_CACHE_DIR``, else
    ``<cache root>/jit`` (the cache root of the classifiers and kernels);
    ``VCL_JAX_COMPILE_CACHE=0`` turns it off. Returns the folder, or None when off.
    """
    import jax

    from vcl_jax.eval.classifier import cache_dir

    folder = os.environ.get(COMPILE_CACHE_ENV) or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if folder == "0":
        return None
    folder = folder or os.path.join(cache_dir(), "jit")
    jax.config.update("jax_compilation_cache_dir", folder)
    # Only programs worth it (unless the environment says otherwise, as the tests' does): an
    # entry costs a disk write.
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 1.0)))
    return folder


def default_run_dir(name: str, preset_name: str, base, cfg) -> str:
    """``runs/<name>_<preset>``, followed by every setting that differs from the preset
    (``runs/vcl_diffusion_cpu-seed=1``), so that each config gets a directory of its own;
    the data folder is not part of it."""
    want, have = flat_dict(base), flat_dict(cfg)
    fmt = lambda v: ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)  # noqa: E731
    # a field by its name alone (each names one field of an experiment's config)
    changed = [f"{k.rsplit('.', 1)[-1]}={fmt(v)}" for k, v in have.items()
               if k != "data.data_dir" and v != want[k]]
    folder = "-".join([f"{name}_{preset_name}", *changed])
    return os.path.join("runs", folder.replace(os.sep, "_").replace(" ", ""))


def experiment_main(argv: list[str] | None, *, doc: str, name: str, presets: dict,
                    run: Callable[..., dict]) -> dict:
    """Parses ``--preset | --config``, ``--run-dir --data-dir --quiet --show-config
    key=value…``, runs, prints the summary (with ``--show-config``: prints the config and
    returns ``{}``).

    Args:
      argv: command-line arguments (None: ``sys.argv``).
      doc: the entry point's docstring (its ``--help``).
      name: experiment name; the default run directory is ``runs/<name>_<preset>`` (or
        ``runs/<name>_from-<run>`` with ``--config``) with the settings that differ from it
        (:func:`default_run_dir`).
      presets: the experiment's presets.
      run: ``run(cfg, run_dir, progress=...) -> metrics``, writing ``summary.md``.
    """
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None,
                        help=f"one of {', '.join(presets)} (default: cpu)")
    parser.add_argument("--config", default=None,
                        help="start from a run's config instead of a preset: its run "
                             "directory or its config.json (then the overrides)")
    parser.add_argument("--run-dir", default=None,
                        help=f"default: runs/{name}_<preset>[-key=value for each override]")
    parser.add_argument("--data-dir", default=None, help="folder with local dataset files")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--show-config", action="store_true",
                        help="print the config, by section, and exit without running")
    parser.add_argument("--coordinator", default=None,
                        help="several processes (hosts): process 0's host:port, or 'auto' "
                             "for the cluster's own description (vcl_jax.distributed)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("overrides", nargs="*",
                        help="config overrides, key=value or section.key=value")
    # Intermixed: overrides may stand before, between or after the options.
    args = parser.parse_intermixed_args(argv)
    if args.config and args.preset:
        raise ConfigError("give --preset or --config (a run's config), not both")
    if args.config:
        cls = type(next(iter(presets.values())))
        base = from_dict(cls, read_run_config(args.config)).validate()
        folder = args.config.removesuffix("config.json").rstrip(os.sep) or "."
        label = f"from-{os.path.basename(os.path.abspath(folder))}"
    else:
        label = args.preset or "cpu"
        base = preset(presets, label)
    cfg = override(base, args.overrides)
    if args.data_dir:
        cfg = override(cfg, [f"data_dir={args.data_dir}"])
    if args.show_config:
        print(config_text(cfg.validate()))
        return {}
    run_dir = args.run_dir or default_run_dir(name, label, base, cfg)
    if args.coordinator:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    enable_compile_cache()
    primary = distributed.is_primary()
    metrics = run(cfg, run_dir, progress=not args.quiet and primary)
    if primary:
        with open(os.path.join(run_dir, "summary.md")) as f:
            print(f.read())
    return metrics
