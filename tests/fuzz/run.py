"""Run every tests/fuzz/fuzz_*.py harness under atheris (coverage-guided, derandomized, bounded).

    python tests/fuzz/run.py                      # each harness 60 s, seed 1
    python tests/fuzz/run.py --seconds 3600 npy   # one harness, an hour
    python tests/fuzz/run.py --replay             # only replay the seed corpora (no atheris)

Each harness runs in its own process: ``atheris.instrument_imports()`` instruments the harness and
the fastrec Python modules it imports (so coverage feedback reaches them), then libFuzzer runs
``TestOneInput`` with ``-seed=1`` and ``-max_total_time``, starting from the seed corpus
``tests/fuzz/corpus/<name>/``. New interesting inputs go to a scratch corpus (``--keep-corpus DIR``
keeps them); a crash or a failed assertion is written to ``--artifacts`` and fails the run. Prints
one line per harness with its executions; ``--results FILE`` appends them as tab-separated rows
for .ci/run's summary. Exit status: 0 if every harness ran clean.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent

# The child: instrument, import the harness, hand TestOneInput to libFuzzer.
_CHILD = r"""
import importlib, sys
import atheris
stem, argv = sys.argv[1], sys.argv[2:]
with atheris.instrument_imports(include=["fastrec", stem]):
    module = importlib.import_module(stem)
atheris.Setup([stem] + argv, module.TestOneInput)
atheris.Fuzz()
"""


def _libfuzzer(scratch: pathlib.Path) -> str | None:
    """A shared libFuzzer for the child to preload, or None (Python-only coverage then).

    atheris ships libFuzzer as a static archive beside itself; linked into a shared object and
    preloaded, it is the libFuzzer atheris uses ("Using preloaded libfuzzer") and the one a
    fastrec built with FASTREC_FUZZ (Clang coverage callbacks) links to on import, so the C
    parsers' branches guide the fuzzer too.
    """
    import importlib.util
    import sysconfig

    archive = pathlib.Path(sysconfig.get_paths()["purelib"]) / "libclang_rt.fuzzer_no_main.a"
    spec = importlib.util.find_spec("atheris")
    if spec is not None and spec.origin is not None:
        archive = pathlib.Path(spec.origin).parent.parent / "libclang_rt.fuzzer_no_main.a"
    clang = shutil.which(os.environ.get("CC", "clang")) or shutil.which("clang")
    if not archive.is_file() or clang is None:
        return None
    out = scratch / "libfuzzer.so"
    if not out.exists():
        subprocess.run([clang, "-shared", "-o", str(out), "-Wl,--whole-archive", str(archive),
                        "-Wl,--no-whole-archive", "-lstdc++", "-lpthread", "-ldl", "-lm"],
                       check=True)
    return str(out)


def _instrumented() -> bool:
    """Whether the installed fastrec was built with FASTREC_FUZZ (its C is coverage-guided)."""
    import importlib.util

    spec = importlib.util.find_spec("fastrec")
    if spec is None or spec.origin is None:
        return False
    for so in pathlib.Path(spec.origin).parent.glob("_*.so"):
        if b"__sanitizer_cov_8bit_counters_init" in so.read_bytes():
            return True
    return False


def harnesses(names: list[str]) -> list[pathlib.Path]:
    found = sorted(HERE.glob("fuzz_*.py"))
    if names:
        found = [p for p in found if p.stem[len("fuzz_"):] in names or p.stem in names]
    return found


def corpus_dir(harness: pathlib.Path) -> pathlib.Path:
    return HERE / "corpus" / harness.stem[len("fuzz_"):]


def replay(harness: pathlib.Path) -> tuple[bool, str]:
    """Run the harness on each file of its seed corpus, in this process (no atheris needed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(harness.stem, harness)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    files = sorted(p for p in corpus_dir(harness).glob("*") if p.is_file())
    for p in files:
        module.TestOneInput(p.read_bytes())
    return True, f"{len(files)} seed inputs replayed"


def fuzz(harness: pathlib.Path, seconds: int, seed: int, artifacts: pathlib.Path,
         keep: pathlib.Path | None) -> tuple[bool, str]:
    name = harness.stem[len("fuzz_"):]
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    seeds = corpus_dir(harness)
    out_corpus = (keep / name) if keep else scratch / "corpus"
    out_corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    argv = [f"-seed={seed}", f"-max_total_time={seconds}", "-print_final_stats=1",
            "-timeout=20", "-rss_limit_mb=4096", "-max_len=4096",
            f"-artifact_prefix={artifacts}/{name}-", str(out_corpus)]
    if seeds.is_dir():
        argv.append(str(seeds))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    core = _libfuzzer(scratch)
    if core:
        env["LD_PRELOAD"] = " ".join(filter(None, [core, os.environ.get("LD_PRELOAD")]))
    log = scratch / "log.txt"
    with open(log, "wb") as f:
        proc = subprocess.run([sys.executable, "-c", _CHILD, harness.stem, *argv], env=env,
                              stdout=f, stderr=subprocess.STDOUT, timeout=seconds + 300)
    text = log.read_text(errors="replace")
    execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    cov = re.findall(r"#\d+\s+\w+\s+cov: (\d+) ft: (\d+)", text)
    corpus_n = sum(1 for _ in out_corpus.iterdir())
    guided = "C and Python" if core and _instrumented() else "Python only"
    detail = (f"{execs[-1] if execs else '?'} executions in {seconds} s, "
              f"coverage {cov[-1][0] if cov else '?'} edges ({guided}), "
              f"{corpus_n} new corpus inputs")
    if proc.returncode != 0 or not execs:
        crash = sorted(artifacts.glob(f"{name}-*"))
        tail = "\n".join(text.splitlines()[-40:])
        print(tail, file=sys.stderr)
        return False, (f"exit {proc.returncode}; " + detail
                       + (f"; reproducer {crash[-1]}" if crash else ""))
    shutil.rmtree(scratch, ignore_errors=True)
    return True, detail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="harness names (npy, state, ...); default all")
    ap.add_argument("--seconds", type=int, default=60, help="per harness (default 60)")
    ap.add_argument("--seed", type=int, default=1, help="libFuzzer -seed (default 1)")
    ap.add_argument("--jobs", type=int, default=1, help="harnesses run at once (default 1)")
    ap.add_argument("--artifacts", type=pathlib.Path,
                    default=pathlib.Path(tempfile.gettempdir()) / "fastrec-fuzz-artifacts")
    ap.add_argument("--keep-corpus", type=pathlib.Path, default=None)
    ap.add_argument("--results", type=pathlib.Path, default=None)
    ap.add_argument("--replay", action="store_true", help="only replay the seed corpora")
    args = ap.parse_args()
    found = harnesses(args.names)
    if not found:
        print("no harness matched", args.names, file=sys.stderr)
        return 1

    def one(h):
        try:
            if args.replay:
                return h, *replay(h)
            return h, *fuzz(h, args.seconds, args.seed, args.artifacts, args.keep_corpus)
        except Exception as exc:  # noqa: BLE001 - reported as this harness's failure
            return h, False, f"{type(exc).__name__}: {exc}"

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        outcomes = list(pool.map(one, found))
    ok_all = True
    for h, ok, detail in outcomes:
        ok_all &= ok
        print(f"fuzz {h.stem:16s} {'ok' if ok else 'FAIL'}  {detail}")
        if args.results:
            with open(args.results, "a") as f:
                f.write(f"{h.stem}\t{'ok' if ok else 'FAIL'}\t{detail}\n")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
