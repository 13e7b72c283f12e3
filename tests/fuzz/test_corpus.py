"""Every fuzz harness's seed corpus, replayed without atheris: the regression tests of fuzzing.

Inputs that once crashed or broke a harness's contract are added to its corpus directory
(tests/fuzz/corpus/<name>/), so each of them runs here on every interpreter and numpy of the
matrix, not only under the fuzzer.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
HARNESSES = sorted(HERE.glob("fuzz_*.py"))


def _load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(path.stem, module)
    spec.loader.exec_module(module)
    return module


def test_every_harness_has_a_seed_corpus():
    assert {p.stem for p in HARNESSES} >= {"fuzz_npy", "fuzz_state"}
    for path in HARNESSES:
        corpus = HERE / "corpus" / path.stem[len("fuzz_"):]
        assert corpus.is_dir() and any(corpus.iterdir()), f"{path.name} has no seed corpus"


@pytest.mark.parametrize("path", HARNESSES, ids=[p.stem for p in HARNESSES])
def test_seed_corpus_replays_clean(path):
    module = _load(path)
    files = sorted(p for p in (HERE / "corpus" / path.stem[len("fuzz_"):]).iterdir() if p.is_file())
    for f in files:
        try:
            module.TestOneInput(f.read_bytes())
        except Exception as exc:  # noqa: BLE001 - name the input that broke the contract
            raise AssertionError(f"{path.name} on {f.relative_to(HERE)}: "
                                 f"{type(exc).__name__}: {exc}") from exc


def test_state_harness_contract_catches_a_broken_process(monkeypatch):
    """The state harness's oracle is not vacuous: a process that returns too many clients fails."""
    module = _load(HERE / "fuzz_state.py")
    import fastrec.sampling as sampling

    real_union = getattr(sampling, "_union", None)
    if real_union is None:
        pytest.skip("fastrec.sampling has no _union to break any more; update this test")

    def too_many(state, keys, rounds, indices, samples, k):
        return real_union(state, keys, rounds, indices, samples, k + 1)

    monkeypatch.setattr(sampling, "_union", too_many)
    found = False
    for seed in sorted((HERE / "corpus" / "state").iterdir()):
        try:
            module.TestOneInput(seed.read_bytes())
        except AssertionError:
            found = True
            break
    assert found, "no seed input reaches a round with more clients than the sample size"
