"""The benchmarks run end to end at tiny sizes and write the promised columns."""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import re
import shutil
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import jax  # noqa: E402
import memory_vs_seqlen  # noqa: E402
import pytest  # noqa: E402
import speed  # noqa: E402

REQUIRED = (
    "impl, backend, device, seq_len, batch, heads, head_dim, dtype, causal, fwd_temp_bytes, "
    "fwdbwd_temp_bytes, fwd_peak_bytes, fwdbwd_peak_bytes, status"
).split(", ")


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


PROGRESS = re.compile(r"^\[\s*(\d+)/(\d+)\] (.*)  \(\d+:\d\d elapsed, ETA \d+:\d\d\)$")


def _progress(text: str) -> list[tuple[int, int, str]]:
    """The `[i/n] <row>  (m:ss elapsed, ETA m:ss)` lines a benchmark printed."""
    found = [PROGRESS.match(line) for line in text.splitlines()]
    return [(int(m[1]), int(m[2]), m[3]) for m in found if m]


@pytest.fixture
def default_out():
    """A tag unique to this test run, and the files it leaves in the default folder removed."""
    tag = f"pytest{os.getpid()}"
    yield tag
    for path in common.DEFAULT_OUT.glob(f"*_{tag}_*"):
        path.unlink()
    if common.DEFAULT_OUT.is_dir() and not any(common.DEFAULT_OUT.iterdir()):
        common.DEFAULT_OUT.rmdir()


def test_results_go_to_the_untracked_bench_out_by_default(capsys):
    assert common.DEFAULT_OUT == BENCH / "out"
    root = BENCH.parent
    if shutil.which("git") and (root / ".git").exists():
        probe = subprocess.run(
            ["git", "check-ignore", "-q", "bench/out/speed_cpu_2026-01-01.csv"], cwd=root
        )
        assert probe.returncode == 0, "bench/out/ must be ignored by git"
    import decode
    import variants
    import varlen

    for module in (speed, memory_vs_seqlen, decode, variants, varlen):
        with pytest.raises(SystemExit):
            module.main(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default bench/out/, untracked; --out bench/results to commit the run)" in text


def test_progress_line_and_eta():
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        progress = common.Progress(3)
        for name in "abc":
            progress.row(f"row {name}")
    assert [(i, n, t) for i, n, t in _progress(buf.getvalue())] == [
        (1, 3, "row a"),
        (2, 3, "row b"),
        (3, 3, "row c"),
    ]
    assert buf.getvalue().splitlines()[-1].endswith("ETA 0:00)")


def test_formats_for_humans():
    assert common.format_tflops(0.01234) == "0.01234" and common.format_tflops(514.31) == "514.3"
    assert common.format_tflops(0.0004321) != "0.0"
    assert [common.format_bytes(b) for b in (2**20, 64 * 2**20, 2**30, 1.5 * 2**30)] == [
        "1 MiB",
        "64 MiB",
        "1 GiB",
        "1.5 GiB",
    ]
    assert common.format_bytes(96 * 2**40) == "96 TiB"
    assert [common.format_tokens(t) for t in (512, 1024, 16384, 2**20)] == [
        "512",
        "1k",
        "16k",
        "1M",
    ]
    assert len(common.log2_ticks(2**25, 2**47)) <= 8
    for impl in common.available():
        assert common.label(impl) != impl, f"{impl} has no legend name"
    assert common.label("chunkattn_chunked") == "chunkattn (chunked)"
    assert common.label("dense_xla") == "dense XLA"
    model = common.device_model()
    if jax.default_backend() == "cpu":  # device_kind is just "cpu": the model comes from the OS
        assert model.lower() != "cpu" and model.endswith(" cores"), model
    else:
        assert model == jax.devices()[0].device_kind


def test_memory_plot_reads_at_a_glance(tmp_path):
    """MiB/GiB ticks, human legend names, the device model in the title."""
    env = dict(common.environment(), batch=1, heads=8, head_dim=128, dtype="float32")
    rows = []
    for impl, per_token in (("chunkattn_chunked", 2**12), ("dense_xla", None)):
        for t in (1024, 4096, 16384):
            b = per_token * t if per_token else 4 * 8 * t * t
            rows.append(
                dict(env, impl=impl, seq_len=t, causal=True, fwd_temp_bytes=b, fwdbwd_temp_bytes=b)
            )
    fig = memory_vs_seqlen.plot(rows, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks and all(re.fullmatch(r"[\d.,]+ (KiB|MiB|GiB|TiB)", t) for t in ticks), ticks
    assert {"MiB", "GiB"} <= {t.split()[-1] for t in ticks}, ticks
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1k", "2k", "4k", "8k", "16k"]
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend == ["chunkattn (chunked)", "dense XLA"]
    title = fig._suptitle.get_text()
    assert env["device_model"] in title and "cpu (cpu)" not in title
    # --replot redraws a committed CSV's plot beside it, the values read back as numbers.
    path = tmp_path / "memory_vs_seqlen_cpu_2026-01-01.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=memory_vs_seqlen.COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    assert common.read_rows(path)[0]["fwd_temp_bytes"] == rows[0]["fwd_temp_bytes"]
    assert common.read_rows(path)[0]["causal"] is True
    assert memory_vs_seqlen.main(["--replot", str(path)]) == 0
    assert path.with_suffix(".png").stat().st_size > 0


def test_memory_vs_seqlen_writes_csv_and_plot(tmp_path, capsys):
    assert (
        memory_vs_seqlen.main(
            [
                "--seq-lens",
                "2048",
                "4096",
                "--heads",
                "2",
                "--head-dim",
                "16",
                # The softmax implementations: the variants have their own test (below).
                "--impls",
                "chunkattn_chunked",
                "dense_xla",
                "jax_nn_xla",
                "rabe_staats",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    (csv_path,) = tmp_path.glob("memory_vs_seqlen_*.csv")
    assert list(tmp_path.glob("memory_vs_seqlen_*.png"))
    rows = _rows(csv_path)
    assert set(REQUIRED) <= set(rows[0])
    assert [(i, n) for i, n, _ in _progress(capsys.readouterr().out)] == [
        (i, len(rows)) for i in range(1, len(rows) + 1)
    ]
    impls = {r["impl"] for r in rows}
    assert {"chunkattn_chunked", "dense_xla", "jax_nn_xla", "rabe_staats"} <= impls
    temp = {(r["impl"], int(r["seq_len"])): int(r["fwdbwd_temp_bytes"]) for r in rows}
    # Doubling T quadruples dense memory; chunked (fixed 512-chunks) grows at most linearly.
    assert temp["dense_xla", 4096] > 3 * temp["dense_xla", 2048]
    assert temp["chunkattn_chunked", 4096] <= 2.2 * temp["chunkattn_chunked", 2048]


def test_speed_writes_ratios(default_out, capsys):
    assert (
        speed.main(
            [
                "--quick",
                "--seq-lens",
                "128",
                "--tokens",
                "256",
                "--heads",
                "2",
                "--head-dim",
                "16",
                "--reps",
                "1",
                "--mask",
                "causal",
                "--impls",
                "chunkattn_chunked",
                "dense_xla",
                "--tag",
                default_out,
            ]
        )
        == 0
    )
    # No --out: the CSV and plot land in the untracked bench/out/.
    (csv_path,) = common.DEFAULT_OUT.glob(f"speed_{default_out}_*.csv")
    assert list(common.DEFAULT_OUT.glob(f"speed_{default_out}_*.png"))
    rows = _rows(csv_path)
    # One progress line per row as it finishes, counting up to the total, TFLOP/s never "0.0".
    lines = _progress(capsys.readouterr().out)
    assert [(i, n) for i, n, _ in lines] == [(1, 2), (2, 2)]
    for (_, _, text), r in zip(lines, rows, strict=True):
        assert r["impl"] in text
        shown = [float(x) for x in re.findall(r"([\d.e+-]+) TFLOP/s", text)]
        assert len(shown) == 2 and all(x > 0 for x in shown), text
        assert abs(shown[0] / float(r["fwd_tflops"]) - 1) < 1e-3, (text, r["fwd_tflops"])
    assert {r["impl"] for r in rows} == {"chunkattn_chunked", "dense_xla"}
    for r in rows:
        assert r["status"] == "ok" and float(r["fwdbwd_ms"]) > 0 and float(r["fwd_tflops"]) > 0
    dense = next(r for r in rows if r["impl"] == "dense_xla")
    assert abs(float(dense["fwdbwd_vs_dense_xla"]) - 1.0) < 1e-9
    png = csv_path.with_suffix(".png")
    png.unlink()
    assert speed.main(["--replot", str(csv_path)]) == 0 and png.stat().st_size > 0


VARIANTS = ("variant_linear", "variant_delta", "variant_caterpillar")


def test_variants_are_registered_causal_and_linear_in_memory(tmp_path):
    """The variant adapters run, see only the past, refuse full attention, and stay O(T)."""
    impls = common.available()
    q, k, v, _ = common.inputs(jax.random.PRNGKey(0), 1, 40, 2, 8, "float32")[0]
    for name in VARIANTS:
        fn = impls[name]
        out = fn(q, k, v, True)
        assert out.shape == v.shape and bool(jax.numpy.isfinite(out).all()), name
        # Changing the future (t >= 25) leaves the past unchanged; the present changes.
        late = [x.at[:, 25:].multiply(-2.0) for x in (q, k, v)]
        out2 = fn(*late, True)
        assert float(abs(out2[:, :25] - out[:, :25]).max()) < 1e-5, name
        assert float(abs(out2[:, 25:] - out[:, 25:]).max()) > 1e-3, name
        with pytest.raises(NotImplementedError, match="causal"):
            fn(q, k, v, False)
    assert (
        memory_vs_seqlen.main(
            ["--seq-lens", "1024", "2048", "--heads", "2", "--head-dim", "16", "--mask", "both"]
            + ["--impls", *VARIANTS, "--tag", "variants", "--out", str(tmp_path)]
        )
        == 0
    )
    (csv_path,) = tmp_path.glob("memory_vs_seqlen_variants_*.csv")
    rows = _rows(csv_path)
    assert {r["impl"] for r in rows} == set(VARIANTS)
    assert {r["status"] for r in rows if r["causal"] == "False"} == {"unsupported"}
    temp = {
        (r["impl"], int(r["seq_len"])): int(r["fwdbwd_temp_bytes"])
        for r in rows
        if r["causal"] == "True"
    }
    for name in VARIANTS:
        assert {r["status"] for r in rows if r["impl"] == name and r["causal"] == "True"} == {
            "compiled"
        }
        # Linear in T up to XLA's layout slack at these tiny sizes; [T, T] scores would be 4×.
        assert temp[name, 2048] <= 2.5 * temp[name, 1024], (name, temp)


def test_speed_times_variants_and_marks_full_unsupported(tmp_path):
    args = ["--quick", "--seq-lens", "64", "--tokens", "64", "--heads", "2", "--head-dim", "8"]
    args += ["--reps", "1", "--impls", "dense_xla", *VARIANTS, "--tag", "v", "--out", str(tmp_path)]
    assert speed.main([*args, "--interleave"]) == 0  # round-robin timing; unsupported is a row
    (csv_path,) = tmp_path.glob("speed_v_*.csv")
    rows = _rows(csv_path)
    for r in rows:
        if r["impl"].startswith("variant_"):
            want = "ok" if r["causal"] == "True" else "unsupported"
            assert r["status"] == want, r
            if want == "ok":
                assert float(r["fwdbwd_ms"]) > 0 and float(r["fwdbwd_vs_dense_xla"]) > 0
    assert {r["impl"] for r in rows} == {"dense_xla", *VARIANTS}
    with pytest.raises(SystemExit):
        speed.main(["--impls", "no_such_impl", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        memory_vs_seqlen.main(["--tag", "a/b", "--out", str(tmp_path)])


def test_variants_training_comparison_writes_csv_and_plot(tmp_path):
    """The race and the speed and memory against T, for the hybrid on a tiny corpus and model
    (every kind runs the same code; what differs per kind is its CLI flags, checked below)."""
    import variants

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"f{i}.txt").write_text(f"the quick brown fox jumps over the lazy dog {i}\n" * 40)
    args = ["--steps", "4", "--seq-len", "16", "--batch", "2", "--layers", "2", "--dim", "16"]
    args += ["--heads", "2", "--log-every", "2", "--eval-every", "2", "--val-batches", "1"]
    args += ["--caterpillar-length", "4", "--seeds", "0", "--data", str(corpus)]
    args += ["--attention", "hybrid", "--speed-seq-lens", "16", "--speed-reps", "1"]
    assert variants.main([*args, "--out", str(tmp_path)]) == 0
    race_only = lambda paths: [p for p in paths if not p.name.startswith("variants_speed_")]
    (csv_path,) = race_only(tmp_path.glob("variants_*.csv"))
    assert race_only(tmp_path.glob("variants_*.png"))
    (row,) = _rows(csv_path)
    assert list(row) == variants.COLUMNS
    assert row["attention"] == "hybrid" and row["variant_config"] == "--hybrid-pattern gs"
    assert 0 < float(row["heldout_loss"]) < 10 and float(row["tokens_per_s_median"]) > 0
    # With one held-out batch the score is the CLI's own val_loss batch: a restore check.
    assert abs(float(row["heldout_loss"]) - float(row["val_loss"])) < 1e-3, row
    (speed_csv,) = tmp_path.glob("variants_speed_*.csv")
    assert list(tmp_path.glob("variants_speed_*.png"))
    (speed,) = _rows(speed_csv)
    assert list(speed) == variants.SPEED_COLUMNS
    assert (speed["attention"], speed["seq_len"], speed["params"]) == (
        "hybrid",
        "16",
        row["params"],
    )
    assert float(speed["tokens_per_s"]) > 0 and int(speed["temp_bytes"]) > 0
    parsed = variants.parse_args(args)
    assert variants.variant_flags("caterpillar", parsed) == [
        "--caterpillar-heads", "4", "--caterpillar-length", "4",
    ]  # fmt: skip
    assert variants.variant_flags("gated_delta", parsed) == []
    assert variants.KINDS[-2:] == ("gated_delta", "hybrid")  # the default race runs all six


def test_variants_default_is_short_and_full_is_the_readme_table():
    import variants

    quick, full = variants.parse_args([]), variants.parse_args(["--full"])
    assert (quick.steps, quick.seeds, quick.val_batches) == (200, [0], 8)
    assert (full.steps, full.seeds, full.val_batches) == (200, [0, 1, 2], 32)
    assert max(quick.speed_seq_lens) <= 2048 and max(full.speed_seq_lens) == 16384
    mixed = variants.parse_args(["--full", "--seeds", "5", "--steps", "7"])
    assert (mixed.steps, mixed.seeds, mixed.val_batches) == (7, [5], 32)
    assert variants.parse_args(["--speed-seq-lens"]).speed_seq_lens == []  # the part skipped
    readme = (BENCH.parent / "README.md").read_text()
    assert "bench/variants.py --full" in readme and "200 steps" in readme


def test_decode_times_every_path_and_writes_bandwidth(default_out, capsys):
    import decode

    argv = ["--lengths", "256", "1000", "--batch", "1", "--heads", "4", "--kv-heads", "2"]
    argv += ["--head-dim", "16", "--reps", "2", "--tag", default_out]
    assert decode.main(argv) == 0
    (csv_path,) = common.DEFAULT_OUT.glob(f"decode_{default_out}_*.csv")
    assert list(common.DEFAULT_OUT.glob(f"decode_{default_out}_*.png"))
    rows = _rows(csv_path)
    assert [(i, n) for i, n, _ in _progress(capsys.readouterr().out)] == [
        (i, len(rows)) for i in range(1, len(rows) + 1)
    ]
    assert {(r["impl"], r["cache_len"]) for r in rows} >= {
        (impl, n) for impl in ("decode", "chunked", "dense_xla") for n in ("256", "1000")
    }
    for r in rows:
        assert r["status"] == "ok" and float(r["ms"]) > 0 and float(r["cache_gb_per_s"]) > 0
        assert int(r["filled"]) == int(int(r["cache_len"]) * 0.75)
    assert float(next(r for r in rows if r["impl"] == "chunked")["vs_chunked"]) == 1.0


def test_memory_workers_get_the_gpu_memory_the_parent_leaves(monkeypatch):
    """The orchestrating parent reserves no GPU memory; each measuring worker takes one pool."""
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    env = memory_vs_seqlen.worker_env()
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) >= 0.9
    assert memory_vs_seqlen.PARENT_ENV == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def test_varlen_compares_packing_and_sweeps_documents(tmp_path, capsys):
    import varlen

    args = ["--tokens", "256", "--docs", "8", "--sweep", "1", "--heads", "2", "--head-dim", "8"]
    args += ["--impls", "varlen", "padded", "--reps", "1", "--out", str(tmp_path)]
    assert varlen.main(args) == 0
    (csv_path,) = tmp_path.glob("varlen_*.csv")
    assert list(tmp_path.glob("varlen_*.png"))
    rows = _rows(csv_path)
    assert list(rows[0]) == varlen.COLUMNS
    assert [(i, n) for i, n, _ in _progress(capsys.readouterr().out)] == [(1, 3), (2, 3), (3, 3)]
    assert [(r["part"], r["impl"], r["num_docs"]) for r in rows] == [
        ("compare", "varlen", "8"),
        ("compare", "padded", "8"),
        ("sweep", "varlen", "1"),
    ]
    for r in rows:
        assert r["status"] == "ok" and float(r["fwdbwd_ms"]) > 0 and int(r["fwdbwd_temp_bytes"]) > 0
        assert int(r["total_tokens"]) == 256 and r["date"] and r["jax_version"] and r["device"]
    assert float(rows[0]["fwdbwd_vs_varlen"]) == 1.0 and float(rows[1]["fwdbwd_vs_varlen"]) > 0
    # Pairs: the documents' causal pairs, the padded batch's, the whole square's.
    lengths = varlen.document_lengths(256, 8, 0)
    assert lengths.sum() == 256 and lengths.min() >= 1 and int(rows[0]["max_len"]) == lengths.max()
    assert int(rows[0]["causal_pairs"]) == sum(t * (t + 1) // 2 for t in lengths)
    assert int(rows[2]["causal_pairs"]) == 256 * 257 // 2
    assert [r["layout"] for r in rows] == ["[256, N, H]", f"[8, {lengths.max()}, N, H]"] + [
        "[256, N, H]"
    ]
    # A program past the memory limit is compiled (its temp bytes known) but not run.
    tiny = argparse.Namespace(
        heads=2, head_dim=8, reps=1, warmup=0, implementation=None, time_limit_gib=1e-9
    )
    row = varlen.measure("dense_segments", lengths, tiny, "compare", jax.numpy.dtype("float32"), {})
    assert row["status"].startswith("not timed") and row["fwdbwd_temp_bytes"] > 0
    assert "fwdbwd_ms" not in row and row["status"].endswith("limit")
    # --replot redraws the committed CSV's plot.
    png = csv_path.with_suffix(".png")
    png.unlink()
    assert varlen.main(["--replot", str(csv_path)]) == 0 and png.stat().st_size > 0
