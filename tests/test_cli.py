"""Every script in ``experiments/`` and ``benchmarks/`` has a command line (``seqjax.cli``, tyro): ``--help``
exits 0 with the usage, and a misspelled option exits non-zero with a message that names it."""

import glob
import os
import re
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(p for d in ("experiments", "benchmarks") for p in glob.glob(os.path.join(ROOT, d, "*.py"))
                 if 'if __name__ == "__main__":' in open(p).read())
MISSPELLED = "--no_such_option=1"

# One interpreter per folder runs each script once per command line, as `python <script> <arg>` would (the
# script's folder first on sys.path, __name__ == "__main__"): the test pays two jax imports, not forty.
_DRIVER = r"""
import os, runpy, sys, traceback
sep, args, scripts = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
for path in scripts:
    for arg in args:
        sys.argv, sys.path[0] = [path, arg], os.path.dirname(path)
        for f in (sys.stdout, sys.stderr):
            print(f"{sep}:{path} {arg}", file=f, flush=True)
        try:
            runpy.run_path(path, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except Exception:
            traceback.print_exc()
            code = "crashed"
        sys.stderr.flush()
        print(f"{sep}=exit {code}", flush=True)
"""


def _blocks(text: str, sep: str) -> dict[str, str]:
    parts = re.split(f"^{re.escape(sep)}:(.*)\n", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _run(scripts: list[str], args: list[str]) -> dict[tuple[str, str], tuple[str, str, str]]:
    """``{(script, arg): (exit code, stdout, stderr)}`` of each script run with each arg."""
    sep = f"@@{uuid.uuid4().hex}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", COLUMNS="200")
    p = subprocess.run([sys.executable, "-c", _DRIVER, sep, " ".join(args), *scripts], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
    outs, errs = _blocks(p.stdout, sep), _blocks(p.stderr, sep)
    res = {}
    for script in scripts:
        for arg in args:
            out = outs.get(f"{script} {arg}", "")
            body, _, tail = out.partition(f"{sep}=exit ")
            code = tail.split()[0] if tail else f"none (the interpreter stopped: {p.returncode})"
            res[script, arg] = (code, body, errs.get(f"{script} {arg}", p.stderr[-3000:]))
    return res


def _repeated_help(usage: str) -> list[str]:
    """Help texts (defaults left out) that tyro's usage gives to more than one option: a field comment that
    spans lines is read as the help of the fields after it."""
    seen = {}
    for line in usage.splitlines():
        m = re.match(r"(--[\w.-]+)(?: [A-Z{][^ ]*)?\s{2,}(.*)$", line.strip("│| "))  # boxes nest: strip them all
        text = re.sub(r"\(default:.*?\)|\(required\)", "", m.group(2)).strip("│| ") if m else ""
        if text:
            seen.setdefault(text, []).append(m.group(1))
    return sorted(t for t, opts in seen.items() if len(opts) > 1)


def test_repeated_help_finds_a_misattributed_comment():
    ok = "│ --lr FLOAT     peak learning rate (default: 0.001) │\n│ --seed INT     data seed (default: 0) │"
    bad = '│ --d_model INT  "<m>+ngram<n>": n-gram head (default: 64) │\n│ --steps INT    "<m>+ngram<n>": n-gram head (default: 1500) │'
    assert _repeated_help(ok) == [] and _repeated_help(bad) == ['"<m>+ngram<n>": n-gram head']


def test_every_script_has_help_and_rejects_a_misspelled_option():
    assert len(SCRIPTS) >= 20, SCRIPTS
    folders = sorted({os.path.dirname(s) for s in SCRIPTS})
    with ThreadPoolExecutor(max_workers=len(folders)) as pool:
        runs = pool.map(lambda d: _run([s for s in SCRIPTS if os.path.dirname(s) == d], ["--help", MISSPELLED]),
                        folders)
        results = {k: v for r in runs for k, v in r.items()}
    failures = []
    for script in SCRIPTS:
        name = os.path.relpath(script, ROOT)
        code, out, err = results[script, "--help"]
        if code != "0" or "usage:" not in out:
            failures.append(f"{name} --help: exit {code}\n{out[-1500:]}{err[-1500:]}")
        repeated = _repeated_help(out)
        if repeated:
            failures.append(f"{name} --help: one help text on several options (a comment tyro misattributed): {repeated}")
        code, _, err = results[script, MISSPELLED]
        if code in ("0", "crashed") or code.startswith("none") or MISSPELLED.split("=")[0] not in err:
            failures.append(f"{name} {MISSPELLED}: exit {code}\n{err[-1500:]}")
    assert not failures, "\n\n".join(failures)
