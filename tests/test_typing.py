"""Typing of the public API: the ``.pyi`` stubs of the compiled modules.

Two kinds of test:

* without mypy: every name in ``fastrec.__all__`` resolves, through the package's import
  lines, to a definition in a ``.py`` or ``.pyi`` file (a compiled module without a stub, or a
  stub missing a name, fails), and every public name a stub declares exists at runtime;
* with mypy (skipped when it is not installed; the ``test`` extra does not include it): a
  snippet using the API the way a Flower user would type-checks cleanly under ``--strict``
  with the precise types revealed, and a snippet of deliberate mistakes gets exactly the
  expected errors.
"""

import ast
import importlib
import importlib.machinery
import pathlib
import pkgutil
import re
import subprocess
import sys
import textwrap

import pytest

import fastrec

PKG = pathlib.Path(fastrec.__file__).resolve().parent
# A module that is a compiled extension needs a stub next to it.
_EXT_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)


# ---------------------------------------------------------------------------------------------
# Stub coverage, with ast (no mypy)
# ---------------------------------------------------------------------------------------------

def _source_of(module: str) -> pathlib.Path:
    """The file a type checker reads for ``fastrec.<module>``: its .pyi if any, else its .py."""
    for suffix in (".pyi", ".py"):
        path = PKG / f"{module}{suffix}"
        if path.exists():
            return path
    raise AssertionError(f"fastrec.{module} has neither a .pyi stub nor a .py source in {PKG}")


def _defined_names(tree: ast.Module) -> dict:
    """Top-level name -> its defining node (def, class, assignment)."""
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node
    return out


def _resolve(module: str, name: str, seen=()) -> tuple:
    """(file, node) of the definition a type checker sees for ``fastrec.<module>.<name>``."""
    assert (module, name) not in seen, f"import cycle resolving {name} via {seen}"
    path = _source_of(module)
    tree = ast.parse(path.read_text(), str(path))
    defined = _defined_names(tree)
    if name in defined:
        return path, defined[name]
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _resolve(node.module, alias.name, seen + ((module, name),))
    raise AssertionError(f"{name!r} is not declared in {path.name} (looked up for "
                         f"fastrec.{module})")


def _compiled_modules() -> list:
    """Submodules that are extension modules (in an editable install they live elsewhere)."""
    candidates = {p.stem for p in PKG.glob("*.pyx")}
    # Extension modules are the private _* ones; importing the public ones would need their
    # optional extras (fastrec.dask needs dask and cloudpickle).
    candidates |= {info.name for info in pkgutil.iter_modules(fastrec.__path__)
                   if info.name.startswith("_")}
    return sorted(name for name in candidates
                  if str(getattr(importlib.import_module(f"fastrec.{name}"), "__file__", ""))
                  .endswith(_EXT_SUFFIXES))


def test_every_compiled_module_has_a_stub():
    compiled = _compiled_modules()
    assert {"_array", "_records", "_sampling"} <= set(compiled), compiled
    missing = [m for m in compiled if not (PKG / f"{m}.pyi").exists()]
    assert not missing, f"compiled modules without a .pyi stub: {missing}"
    assert (PKG / "py.typed").exists()


@pytest.mark.parametrize("name", fastrec.__all__)
def test_public_name_is_declared(name):
    path, node = _resolve("__init__", name)
    runtime = getattr(fastrec, name)
    # The declaration is of the right kind: a class for a class, a def for a function.
    if isinstance(runtime, type):
        assert isinstance(node, ast.ClassDef), f"{name}: {path.name} does not declare a class"
    elif callable(runtime):
        assert isinstance(node, (ast.FunctionDef, ast.ClassDef)), (
            f"{name}: {path.name} does not declare a function")
    # Compiled classes are declared in their stub, with the module the runtime reports.
    module = getattr(runtime, "__module__", "")
    if module.startswith("fastrec._"):
        assert path == PKG / f"{module.split('.')[1]}.pyi", (name, path)


def _public_stub_members(tree: ast.Module):
    """(qualified name, node) of every non-underscore top-level name and class member."""
    for name, node in _defined_names(tree).items():
        if name.startswith("_"):
            continue
        yield name, node
        if isinstance(node, ast.ClassDef):
            for member, sub in _defined_names(ast.Module(body=node.body,
                                                         type_ignores=[])).items():
                if not member.startswith("_"):
                    yield f"{name}.{member}", sub


@pytest.mark.parametrize("module", ["_array", "_records", "_sampling"])
def test_stub_declares_only_what_exists(module):
    """No invented members: every public name in the stub exists on the compiled module."""
    tree = ast.parse((PKG / f"{module}.pyi").read_text())
    runtime = importlib.import_module(f"fastrec.{module}")
    members = list(_public_stub_members(tree))
    assert members
    for qualname, _ in members:
        obj = runtime
        for part in qualname.split("."):
            assert hasattr(obj, part), f"fastrec.{module}.pyi declares {qualname}, which the " \
                                       f"compiled module does not have"
            obj = getattr(obj, part)


def test_public_modules_import_only_declared_names():
    """What records.py, sampling.py, interop.py, array.py take from compiled modules is stubbed."""
    for module in ("records", "sampling", "interop", "array"):
        tree = ast.parse((PKG / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                for alias in node.names:
                    _resolve(node.module, alias.name)
        # ``from . import _sampling`` then ``_sampling.f(...)``: each f is declared too.
        imported = {alias.asname or alias.name for node in tree.body
                    if isinstance(node, ast.ImportFrom) and node.level == 1 and not node.module
                    for alias in node.names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported):
                _resolve(node.value.id, node.attr)


def test_resolver_catches_a_missing_name():
    with pytest.raises(AssertionError, match="not declared"):
        _resolve("_records", "NoSuchRecord")


# ---------------------------------------------------------------------------------------------
# mypy
# ---------------------------------------------------------------------------------------------

# A user program in the style the README shows; the __future__ import lets it use 3.10's
# ``X | Y`` annotations on 3.9 as well, as a 3.9 user would.
GOOD = '''
from __future__ import annotations

import numpy as np
import numpy.typing as npt

import fastrec
from fastrec import (Array, ConfigsRecord, FinalizeThenSampleFactory, MetricsRecord,
                     ParametersRecord, RecordSet, TensorSpec, array_from_numpy)
from fastrec.records import TypedDict

weights: npt.NDArray[np.float32] = np.zeros((2, 3), dtype=np.float32)
arr = array_from_numpy(weights)
params = ParametersRecord({"w": arr, "b": Array("float32", [1], "numpy.ndarray", b"")},
                          keep_input=True)
metrics = MetricsRecord({"accuracy": 0.9, "hist": [1, 2, 3]})
metrics["loss"] = 0.25
metrics.update({"n": 10})
configs = ConfigsRecord({"lr": 0.01, "name": "sgd", "flags": [True, False]})
plain: dict[str, float] = {"a": 1.0}
from_dict = MetricsRecord(plain)  # any Mapping when the input is kept
owned: dict[str, float | int | list[int] | list[float]] = {"a": 1.0}
moved = MetricsRecord(owned, keep_input=False)

rs = RecordSet(parameters_records={"model": params}, metrics_records={"eval": metrics})
rs.configs_records["fit"] = configs
for name, record in rs.metrics_records.items():
    total: float = 0.0
    for value in record.values():
        if isinstance(value, (int, float)):
            total += value
size: int = rs.parameters_records["model"].count_bytes() + metrics.count_bytes()
loaded = rs.parameters_records["model"]["w"].numpy()
shape: list[int] = rs.parameters_records["model"]["w"].shape
lr = rs.configs_records["fit"].get("lr", 0.1)

factory = FinalizeThenSampleFactory(sample_size=2, seed=0)
process = factory.create({"accuracy": lambda v: v}, {"accuracy": TensorSpec("float32")})
state = process.initialize()
out = process.next(state, [metrics, {"accuracy": 0.5}])
current, everything = out.result
bad: int = fastrec.count_non_finite(np.array([np.nan]))

reveal_type(metrics)
reveal_type(metrics["accuracy"])
reveal_type(configs["lr"])
reveal_type(params["w"])
reveal_type(rs.parameters_records)
reveal_type(rs.metrics_records)
reveal_type(rs.configs_records)
reveal_type(rs.metrics_records["eval"])
reveal_type(metrics.pop("missing", None))
reveal_type(lr)
reveal_type(factory.create)
'''

# Each line with a mistake ends in "# E: <error code>".
BAD = '''
import fastrec
from fastrec import ConfigsRecord, MetricsRecord, ParametersRecord, RecordSet

metrics = MetricsRecord({"accuracy": 0.9})
MetricsRecord({1: 2.0})  # E: dict-item
MetricsRecord({"name": "text"})  # E: dict-item
metrics["accuracy"].upper()  # E: union-attr
metrics["flag"] = "yes"  # E: assignment
ParametersRecord({"w": [1.0, 2.0]})  # E: dict-item
ConfigsRecord({"x": {"nested": 1}})  # E: dict-item
rs = RecordSet(metrics_records={"m": metrics})
rs.metrics_records["c"] = ConfigsRecord({"lr": 0.1})  # E: assignment
RecordSet(configs_records={"m": metrics})  # E: dict-item
rs.parameters_records = {}  # E: misc
n: str = metrics.count_bytes()  # E: assignment
frozen: "fastrec.records.TypedDict[str, float]" = {}  # E: assignment
'''

_LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<kind>error|note): (?P<msg>.*?)"
                   r"(?:  \[(?P<code>[a-z-]+)\])?$")


def _split_top(text: str, sep: str) -> list:
    """``text`` split at each ``sep`` outside brackets."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        if text[i] == "[":
            depth += 1
        elif text[i] == "]":
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    return parts + [text[start:]]


def _union(text: str) -> set:
    """Members of a mypy union, flattened, whether printed as ``A | B`` or as (nested)
    ``Union[A, B]`` (the spelling mypy uses when checking for Python 3.9)."""
    text = text.strip()
    members = _split_top(text, " | ")
    if len(members) > 1:
        return set().union(*(_union(m) for m in members))
    if text.startswith("Union[") and text.endswith("]"):
        return set().union(*(_union(m) for m in _split_top(text[len("Union["):-1], ", ")))
    return {text}


def test_union_reads_both_spellings():
    assert _union("Union[Union[int, float], Union[list[int], list[float]]]") == \
        _union("int | float | list[int] | list[float]") == {"int", "float", "list[int]", "list[float]"}
    assert _union("dict[str, int | None] | None") == {"dict[str, int | None]", "None"}


@pytest.fixture(scope="module")
def mypy_run(tmp_path_factory, request):
    pytest.importorskip("mypy")
    tmp = tmp_path_factory.mktemp("typing")
    (tmp / "good.py").write_text(textwrap.dedent(GOOD))
    (tmp / "bad.py").write_text(textwrap.dedent(BAD))
    config_cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    cache = config_cache.mkdir("mypy") if config_cache is not None else tmp / ".mypy_cache"
    # A subprocess in an empty directory: mypy finds fastrec where this interpreter does
    # (site-packages, or the editable install's path entry), not in the working tree.
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--show-error-codes",
         "--no-pretty", "--no-color-output", "--cache-dir", str(cache), "good.py", "bad.py"],
        cwd=tmp, capture_output=True, text=True, timeout=300)
    assert not proc.stderr.strip() or "error" not in proc.stderr.lower(), proc.stderr
    results = {"good.py": [], "bad.py": []}
    for line in proc.stdout.splitlines():
        m = _LINE.match(line)
        if m and m["file"] in results:
            results[m["file"]].append((int(m["line"]), m["kind"], m["msg"], m["code"]))
        elif m is None and line.strip() and not line.startswith(" "):
            raise AssertionError(f"unexpected mypy output: {line!r}\n{proc.stdout}")
    return results, proc.stdout


def test_mypy_good_snippet_has_no_errors(mypy_run):
    results, stdout = mypy_run
    errors = [r for r in results["good.py"] if r[1] == "error"]
    assert not errors, stdout


def test_mypy_reads_the_stubs(mypy_run):
    results, stdout = mypy_run
    # Older mypy spells builtins with their module ("builtins.int"); newer ones do not.
    revealed = [re.match(r'Revealed type is "(.*)"$', msg)[1].replace("builtins.", "")
                for _, kind, msg, _ in results["good.py"]
                if kind == "note" and msg.startswith("Revealed type")]
    assert len(revealed) == 11, stdout
    (metrics, metric_value, config_value, param_value, params_dict, metrics_dict, configs_dict,
     one_record, popped, lr, create) = revealed
    assert metrics == "fastrec._records.MetricsRecord"
    assert _union(metric_value) == {"int", "float", "list[int]", "list[float]"}
    assert _union(config_value) == {"int", "float", "str", "bytes", "bool", "list[int]",
                                    "list[float]", "list[str]", "list[bytes]", "list[bool]"}
    assert param_value == "fastrec._array.Array"
    assert params_dict == "fastrec._records.TypedDict[str, fastrec._records.ParametersRecord]"
    assert metrics_dict == "fastrec._records.TypedDict[str, fastrec._records.MetricsRecord]"
    assert configs_dict == "fastrec._records.TypedDict[str, fastrec._records.ConfigsRecord]"
    assert one_record == "fastrec._records.MetricsRecord"
    assert _union(popped) == {"int", "float", "list[int]", "list[float]", "None"}
    # get("lr", 0.1) is ConfigsRecordValues | float; mypy folds bool into int there.
    assert _union(lr) == _union(config_value) - {"bool"}
    assert "AggregationProcess" in create and "Any" not in create.split("->")[-1]


def test_mypy_reports_the_deliberate_errors(mypy_run):
    results, stdout = mypy_run
    source = textwrap.dedent(BAD).splitlines()
    expected = {}
    for number, text in enumerate(source, start=1):
        if "# E: " in text:
            expected[number] = text.split("# E: ")[1].strip()
    assert len(expected) == 11
    got: dict = {}
    for line, kind, _, code in results["bad.py"]:
        if kind == "error":
            got.setdefault(line, set()).add(code)
    # Every marked line is reported with its code, and nothing else is.
    assert set(got) == set(expected), stdout
    for line, code in expected.items():
        assert code in got[line], (line, source[line - 1], got[line], stdout)


def test_mypy_checks_the_package_itself_cleanly(tmp_path):
    """The installed package's own Python modules type-check against the stubs."""
    pytest.importorskip("mypy")
    import importlib.util

    # fastrec.interop imports flwr lazily and fastrec.dask needs the dask extra; without them
    # installed mypy cannot follow those imports.
    optional = ("flwr", "dask", "cloudpickle")
    flwr = ([] if all(importlib.util.find_spec(m) for m in optional)
            else ["--ignore-missing-imports"])
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--show-error-codes", *flwr,
         "--cache-dir", str(tmp_path / ".mypy_cache"), "-p", "fastrec"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
