"""Tests of the ``python -m fastrec demo`` simulation."""

import doctest
import io
import math
import subprocess
import sys

import numpy as np
import pytest

from fastrec import FinalizeThenSampleFactory
from fastrec import __main__ as cli
from fastrec import demo


def test_docstrings():
    assert doctest.testmod(demo).failed == 0


def quiet_run(**kw):
    args = dict(rounds=3, clients=400, sample_size=7, seed=5, chunk=150, progress=False)
    args.update(kw)
    out = io.StringIO()
    return demo.run(out=out, err=io.StringIO(), **args), out.getvalue()


def test_main_prints_summary(capsys):
    assert demo.main(["--rounds", "2", "--clients", "300", "--sample-size", "5", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert "2 rounds x 300 clients, sample size 5" in captured.out
    assert "all rounds' sample: 5 clients" in captured.out
    assert "throughput:" in captured.out
    assert "100.0%" in captured.err and "round 2/2" in captured.err


def test_module_entry_point_subprocess():
    proc = subprocess.run([sys.executable, "-m", "fastrec", "demo", "--rounds", "2", "--clients",
                           "50", "--sample-size", "4", "--seed", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "last round's sample: 4 clients" in proc.stdout
    assert "[" in proc.stderr and "clients/s" in proc.stderr


def test_closed_stdout_pipe_stops_quietly():
    # `python -m fastrec demo | head -1`: the reader leaves early. Here it has left before
    # the first line, so the demo's first write fails for sure: no traceback, status 1.
    proc = subprocess.Popen([sys.executable, "-m", "fastrec", "demo", "--rounds", "2",
                             "--clients", "200", "--seed", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err, err


def test_cli_errors(capsys):
    assert cli.main([]) == 2
    assert cli.main(["nope"]) == 2
    assert cli.main(["--help"]) == 0
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--clients", "-3"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["demo", "--sample-size", "0"])


def assert_same_samples(a, b):
    """Per-metric sample arrays (the finalized leaves here are plain arrays) are equal."""
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(a[name], b[name])


def test_chunked_workers_match_one_machine_and_counts_are_right():
    rounds, clients, k, seed = 3, 400, 7, 5
    result, _ = quiet_run(rounds=rounds, clients=clients, sample_size=k, seed=seed, chunk=150)
    state = result["state"]
    # Replay: same record stream (chunks of 150), one process call per round.
    process = FinalizeThenSampleFactory(k, seed=seed).create(demo.FINALIZERS, demo.SPEC)
    rng = np.random.default_rng(seed)
    ref = process.initialize()
    all_bad = 0
    for r in range(rounds):
        round_clients = []
        for a in range(0, clients, 150):
            round_clients += demo.simulate_clients(rng, min(150, clients - a))
        out = process.next(ref, round_clients)
        bad_loss = sum(not math.isfinite(c["loss"][0] / c["loss"][1]) for c in round_clients)
        assert result["measurements"][r] == {"loss": bad_loss, "accuracy": 0, "num_examples": 0}
        assert out.measurements == result["measurements"][r]
        ref = out.state
        all_bad += bad_loss
    assert all_bad > 0
    assert np.array_equal(state["indices"], ref["indices"])
    assert np.array_equal(state["rounds"], ref["rounds"])
    assert_same_samples(state["samples"], ref["samples"])
    assert state["round"] == rounds
    assert_same_samples(result["current"], out.result[0])
    assert state["rounds"].max() < rounds and state["indices"].max() < clients


def test_seeded_runs_reproduce():
    a, text_a = quiet_run()
    b, text_b = quiet_run()
    assert_same_samples(a["state"]["samples"], b["state"]["samples"])
    assert text_a.split("throughput")[0] == text_b.split("throughput")[0]


@pytest.mark.parametrize("rounds, clients", [(0, 10), (2, 0), (1, 3)])
def test_degenerate_sizes(rounds, clients):
    result, text = quiet_run(rounds=rounds, clients=clients)
    assert len(result["state"]["indices"]) == min(7, rounds * clients)
    assert "throughput" in text


def test_progress_bar():
    stream = io.StringIO()
    bar = demo.Progress(10, stream=stream)
    bar.update(4, "round 1/2")
    bar.update(6, "round 2/2")
    bar.close()
    text = stream.getvalue()
    assert text.startswith("\r[") and "100.0%" in text and text.endswith("\n")
    silent = io.StringIO()
    off = demo.Progress(10, stream=silent, enabled=False)
    off.update(10, "x")
    off.close()
    assert silent.getvalue() == ""
