"""The step benchmark runs end to end and records what its table shows (no timing thresholds)."""
import json
import math

import pytest

from manifold_sgd import bench, native_available

NUMBERS = ("median_ms", "ratio_vs_fused", "ratio_vs_foreach", "gbps", "pct_copy_bw", "min_ms",
           "ratio_vs_fused_min")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = bench.main(["--quick", "--out", str(out)])
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, [f.name for f in files]
    return rc, out, json.loads(files[0].read_text())


def test_quick_bench_succeeds_and_names_files_by_device_and_set(quick_run):
    rc, out, doc = quick_run
    assert rc == 0
    stem = f"{doc['config']['device'].split(':')[0]}_tiny_float32"
    assert (out / f"{stem}.json").exists()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / f"{stem}.png").stat().st_size > 0


def test_json_has_every_table_field_as_positive_finite_numbers(quick_run):
    _, _, doc = quick_run
    assert doc["table_fields"] == list(bench.TABLE_FIELDS)
    rows = doc["results"]
    assert {("SGD fused", "torch"), ("SGD foreach", "torch")} <= {(r["optimizer"], r["backend"])
                                                                  for r in rows}
    for method in bench.DEFAULT_METHODS:  # the column ones run when named
        assert any(r["optimizer"] == method and r["backend"] == "reference" for r in rows)
    for r in rows:
        assert set(bench.TABLE_FIELDS) <= set(r), r
        assert r["set"] == "tiny"
        for key in NUMBERS:
            v = r[key]
            assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (r["optimizer"], key, v)
        assert r["bytes_per_step"] > 0 and len(r["samples_ms"]) >= 1


def test_json_records_machine_roofline_and_run(quick_run):
    _, _, doc = quick_run
    for key in ("timestamp", "command", "machine", "config", "n_params", "n_tensors",
                "copy_bandwidth_gbps", "add_bandwidth_gbps", "floor_ms_fp32", "checks"):
        assert key in doc, key
    assert doc["command"].startswith("python -m manifold_sgd bench")
    for key in ("cpu_model", "torch", "torch_threads", "native"):
        assert key in doc["machine"], key
    assert doc["copy_bandwidth_gbps"] > 0 and math.isfinite(doc["copy_bandwidth_gbps"])
    assert doc["n_params"] == sum(bench.numel(s) for _, s in bench.tiny_shapes())


@pytest.mark.skipif(not native_available(), reason="native extension not built")
def test_native_rows_are_checked_against_reference(quick_run):
    _, _, doc = quick_run
    if doc["config"]["device"] != "cpu":
        pytest.skip("no native kernel for this device in this build")
    assert [c["method"] for c in doc["checks"]] == list(bench.DEFAULT_METHODS)
    assert all(c["ok"] for c in doc["checks"]), doc["checks"]
    assert {r["optimizer"] for r in doc["results"] if r["backend"] == "native"} == set(bench.DEFAULT_METHODS)


def test_table_prints_every_row(quick_run):
    _, _, doc = quick_run
    table = bench.format_table([doc])
    for r in doc["results"]:
        assert f"{r['optimizer']:<20} {r['backend']:<9}" in table


@pytest.mark.parametrize("name, params", [("resnet50", 25_557_032), ("gpt2-small", 124_439_808),
                                          ("transformer36", 18_874_368), ("mlp36", 28_311_552),
                                          ("llm1b", 1_207_959_552)])
def test_shape_sets_have_the_models_parameter_counts(name, params):
    assert sum(bench.numel(s) for _, s in bench.SETS[name]()) == params


@pytest.mark.skipif(not native_available(), reason="needs the native extension")
def test_overhead_mode_measures_both_paths_with_a_noop_kernel(tmp_path, capsys):
    """bench --overhead: per-tensor Python overhead of native steps, steady and full path; the
    kernel is a no-op there, so no weight moves, and the steady path must have engaged."""
    rc = bench.main(["--overhead", "--sets", "tiny", "small-8x8", "--methods", "UN", "--repeat", "2",
                     "--warmup", "1", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "cpu_overhead_float32.json").read_text())
    assert [s["set"] for s in doc["sets"]] == ["tiny", "small-8x8"]
    for s in doc["sets"]:
        paths = {r["path"]: r for r in s["results"]}
        assert set(paths) == {"steady", "full"} and paths["steady"]["steady_engaged"]
        for r in s["results"]:
            assert r["us_per_tensor"] > 0 and len(r["samples_ms"]) == 2 * bench.OVERHEAD_BLOCK
            assert r["us_per_tensor"] == pytest.approx(r["median_ms"] * 1e3 / s["n_tensors"])
    assert bench.small_8x8_shapes() == [(f"{i}.weight", (8, 8)) for i in range(2000)]


@pytest.mark.skipif(not native_available(), reason="native extension not built")
def test_column_methods_run_when_named(tmp_path):
    """The column methods are left out of a default run; named, they run and are checked."""
    assert not [m for m in bench.DEFAULT_METHODS if "column" in m]
    column = [m for m in bench.METHODS if "column" in m]
    assert column
    assert bench.main(["--quick", "--device", "cpu", "--methods", *column, "--out", str(tmp_path)]) == 0
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [c["method"] for c in doc["checks"]] == column
    assert all(c["ok"] for c in doc["checks"]), doc["checks"]


def test_geoopt_bar_reports_its_ceiling_at_the_add_bandwidth():
    # 1e9 bytes at 10 GB/s is a 100 ms floor; geoopt at 500 ms: at most 5x, whatever the step.
    rows = [{"optimizer": "AdamW fused", "backend": "torch", "median_ms": 150.0, "min_ms": 140.0},
            {"optimizer": "geoopt RAdam sphere", "backend": "geoopt", "median_ms": 500.0, "min_ms": 480.0},
            {"optimizer": "Adam row", "backend": "native", "median_ms": 125.0, "min_ms": 120.0,
             "bytes_per_step": 10 ** 9}]
    bars = {b["bar"]: b for b in bench.acceptance_bars(rows, add_gbps=10.0)}
    geo = bars["Adam row native >= 10x faster than geoopt RAdam"]
    assert geo["value"] == pytest.approx(4.0) and not geo["met"]
    assert geo["ceiling"] == pytest.approx(5.0)
    assert bars["Adam row native <= 0.85x AdamW fused"]["value"] == pytest.approx(125 / 150)


def test_step_speed_bars_per_set():
    """Issue #13's bars: PO8 <= 1.3x fused SGD on transformer36 and <= 1.4x on resnet50, the
    Stiefel kernels <= 2x there, each judged at the median and at the minimums."""
    def row(name, backend, med, low):
        return {"optimizer": name, "backend": backend, "median_ms": med, "min_ms": low}
    rows = [row("SGD fused", "torch", 10.0, 9.0), row("FG-SGD PO8", "native", 13.5, 11.6),
            row("Stiefel kernel", "native", 19.0, 18.5), row("Stiefel kernel polar", "native", 21.0, 17.0)]
    bench.add_ratios(rows)
    t36 = bench.step_speed_bars("transformer36", rows)
    assert [(b["bar"], b["met"], b["met_min"]) for b in t36] == [
        ("FG-SGD PO8 native <= 1.3x SGD fused (transformer36)", False, True)]
    r50 = {b["bar"]: b for b in bench.step_speed_bars("resnet50", rows)}
    assert r50["FG-SGD PO8 native <= 1.4x SGD fused (resnet50)"]["met"]
    assert r50["Stiefel kernel native <= 2.0x SGD fused (resnet50)"]["value"] == pytest.approx(1.9)
    polar = r50["Stiefel kernel polar native <= 2.0x SGD fused (resnet50)"]
    assert (polar["met"], polar["met_min"]) == (False, True)
    assert bench.step_speed_bars("gpt2-small", rows) == []
