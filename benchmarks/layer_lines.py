"""Lines of the experiments layer by folder and by kind, at a git revision or in the tree.

    python -m benchmarks.layer_lines [--rev REV ...]

For each folder (`vcl_jax/protocols`, `vcl_jax/configs`, `vcl_jax/analysis`, `experiments`,
and the old `vcl_jax/sections.py`) the number of lines (`wc -l`) split into code, docstring,
comment and blank lines: a docstring is the first statement of a module, class or function
when it is a string (found with `ast`), a comment a line whose text starts with `#`, code
every other non-blank line. Without `--rev` the working tree is counted.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess

FOLDERS = ("vcl_jax/protocols", "vcl_jax/configs", "vcl_jax/analysis", "experiments")
FILES = ("vcl_jax/sections.py",)  # the shared sections before they moved into configs/
KINDS = ("code", "docstring", "comment", "blank")


def _files(rev: str | None) -> dict[str, str]:
    """``{path: text}`` of the counted Python files at ``rev`` (None: the working tree)."""
    if rev is None:
        paths = [os.path.join(d, f) for d in FOLDERS if os.path.isdir(d)
                 for f in sorted(os.listdir(d)) if f.endswith(".py")]
        paths += [f for f in FILES if os.path.isfile(f)]
        return {p: open(p).read() for p in paths}
    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, *FOLDERS, *FILES],
                            check=True, capture_output=True, text=True).stdout.split()
    return {p: subprocess.run(["git", "show", f"{rev}:{p}"], check=True, capture_output=True,
                              text=True).stdout
            for p in listed if p.endswith(".py") and (os.path.dirname(p) in FOLDERS or p in FILES)}


def count(text: str) -> dict[str, int]:
    """Lines of one file by kind (module docstring included)."""
    docstring = set()
    for node in ast.walk(ast.parse(text)):
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and ast.get_docstring(node) is not None):
            first = node.body[0]
            docstring |= set(range(first.lineno, first.end_lineno + 1))
    out = dict.fromkeys(KINDS, 0)
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        kind = ("docstring" if i in docstring else "blank" if not s
                else "comment" if s.startswith("#") else "code")
        out[kind] += 1
    return out


def by_folder(files: dict[str, str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for path, text in files.items():
        folder = path if path in FILES else os.path.dirname(path)
        row = out.setdefault(folder, {"lines": 0, **dict.fromkeys(KINDS, 0)})
        row["lines"] += len(text.splitlines())
        for kind, n in count(text).items():
            row[kind] += n
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", action="append", default=None,
                        help="a git revision to count (repeatable; default: the working tree)")
    parser.add_argument("--out", default=None, help="also write the counts to this JSON file")
    args = parser.parse_args(argv)
    out = {}
    for rev in args.rev or [None]:
        rows = by_folder(_files(rev))
        out[rev or "working tree"] = rows
        print(f"{rev or 'working tree'}:")
        for folder, row in sorted(rows.items()):
            print(f"  {folder:22s} {row['lines']:5d} lines: "
                  + ", ".join(f"{row[k]} {k}" for k in KINDS))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
