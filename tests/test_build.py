"""The package as installed: the native extension, its stub and its facts."""
import ast
import re
from pathlib import Path

import manifold_sgd
from manifold_sgd import _native


def test_native_extension_is_built():
    # a broken build must not pass silently on the reference path
    assert manifold_sgd.native_available(), manifold_sgd.native_info()


def test_native_info_reports_build_facts():
    info = manifold_sgd.native_info()
    assert info["version"] == manifold_sgd.__version__
    assert isinstance(info["cuda_compiled"], bool)
    assert info["num_threads"] >= 1


def test_table_layout_matches_native():
    info = manifold_sgd.native_info()
    assert info["tensor_fields"] == _native.TENSOR_FIELDS
    assert info["group_fields"] == _native.GROUP_FIELDS
    assert info["report_fields"] == _native.REPORT_FIELDS


def test_type_stub_matches_module():
    stub = Path(manifold_sgd.__file__).with_name("_C.pyi").read_text()
    stubbed = set(re.findall(r"^def (\w+)\(", stub, flags=re.M))
    cuda_only = set(" ".join(re.findall(r"^# cuda-only: (.*)$", stub, flags=re.M)).split())
    assert cuda_only, "the stub marks its CUDA-only names"
    optional = set() if manifold_sgd.native_info()["cuda_compiled"] else cuda_only
    defined = {n for n in dir(_native._C) if not n.startswith("_")}
    stubbed |= set(re.findall(r"^class (\w+)", stub, flags=re.M))
    assert defined - stubbed == set(), "entry points missing from _C.pyi"
    assert stubbed - defined - optional == set(), "_C.pyi names entries the module lacks"


def _doc_params(fn):
    """Parameter names from a pybind11 signature line: 'name(a: T, b: T) -> R'."""
    sig = fn.__doc__.strip().splitlines()[0]
    inner = sig[sig.index("(") + 1:sig.rindex(")")]
    return [n for n in re.findall(r"(?:^|, )(\w+):", inner) if n != "self"]


def test_type_stub_signatures_match_module():
    """Every stubbed function and method takes the parameters the module's takes, in order."""
    tree = ast.parse(Path(manifold_sgd.__file__).with_name("_C.pyi").read_text())
    checked = 0
    for node in tree.body:
        targets = []
        if isinstance(node, ast.FunctionDef):
            targets.append((node, getattr(_native._C, node.name, None)))
        elif isinstance(node, ast.ClassDef):
            cls = getattr(_native._C, node.name, None)
            targets += [(f, None if cls is None else getattr(cls, f.name, None))
                        for f in node.body if isinstance(f, ast.FunctionDef)
                        and not any(isinstance(d, ast.Name) and d.id == "property" for d in f.decorator_list)]
        for f, obj in targets:
            if obj is None:  # a CUDA-only name in a CPU build: test_type_stub_matches_module
                continue
            stubbed = [a.arg for a in f.args.args + f.args.kwonlyargs if a.arg != "self"]
            assert stubbed == _doc_params(obj), f"_C.pyi: {f.name} parameters differ from the module's"
            checked += 1
    assert checked >= 2


def test_enum_names_match_python():
    """The codes of the tables' kind column and the options' enum names come from the native
    enums (csrc/core/step.h); the Python side names the same values in the same order."""
    from manifold_sgd import reference
    info = manifold_sgd.native_info()
    assert tuple(info["kinds"]) == _native.KINDS == reference.KINDS
    assert tuple(info["adaptive_modes"]) == reference.ADAPTIVE
    assert tuple(info["retractions"]) == reference.RETRACTIONS
    assert "sgd" in info["algorithms"]


def test_py_typed_ships():
    assert Path(manifold_sgd.__file__).with_name("py.typed").exists()
