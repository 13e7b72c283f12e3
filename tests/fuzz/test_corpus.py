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


def test_state_harness_oracle_rejects_broken_states():
    """The state harness's oracle is not vacuous: too many clients, or out of order, fail it."""
    module = _load(HERE / "fuzz_state.py")
    process = module._process(2)
    clients = [{"loss": [float(i), 1.0], "acc": 0.5} for i in range(6)]
    state = process.next(process.initialize(), clients).state
    module._check_output(process, state, 2)  # the honest state passes
    with pytest.raises(AssertionError, match="sample size"):
        module._check_output(process, state, 1)
    swapped = dict(state, rounds=state["rounds"][::-1].copy(), indices=state["indices"][::-1].copy())
    assert len(set(state["indices"].tolist())) == 2
    with pytest.raises(AssertionError, match="arrival order"):
        module._check_output(process, swapped, 2)
