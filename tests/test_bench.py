"""The benchmarks run end to end at tiny sizes and write the promised columns."""

from __future__ import annotations

import csv
import pathlib
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


def test_memory_vs_seqlen_writes_csv_and_plot(tmp_path):
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
    impls = {r["impl"] for r in rows}
    assert {"chunkattn_chunked", "dense_xla", "jax_nn_xla", "rabe_staats"} <= impls
    temp = {(r["impl"], int(r["seq_len"])): int(r["fwdbwd_temp_bytes"]) for r in rows}
    # Doubling T quadruples dense memory; chunked (fixed 512-chunks) grows at most linearly.
    assert temp["dense_xla", 4096] > 3 * temp["dense_xla", 2048]
    assert temp["chunkattn_chunked", 4096] <= 2.2 * temp["chunkattn_chunked", 2048]


def test_speed_writes_ratios(tmp_path):
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
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    (csv_path,) = tmp_path.glob("speed_*.csv")
    rows = _rows(csv_path)
    assert {r["impl"] for r in rows} == {"chunkattn_chunked", "dense_xla"}
    for r in rows:
        assert r["status"] == "ok" and float(r["fwdbwd_ms"]) > 0 and float(r["fwd_tflops"]) > 0
    dense = next(r for r in rows if r["impl"] == "dense_xla")
    assert abs(float(dense["fwdbwd_vs_dense_xla"]) - 1.0) < 1e-9


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
    assert speed.main(args) == 0
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
    import variants

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"f{i}.txt").write_text(f"the quick brown fox jumps over the lazy dog {i}\n" * 40)
    args = ["--steps", "4", "--seq-len", "16", "--batch", "2", "--layers", "1", "--dim", "16"]
    args += ["--heads", "2", "--log-every", "2", "--eval-every", "2", "--val-batches", "1"]
    args += ["--caterpillar-length", "4", "--seeds", "0", "--data", str(corpus)]
    assert variants.main([*args, "--out", str(tmp_path)]) == 0
    (csv_path,) = tmp_path.glob("variants_*.csv")
    assert list(tmp_path.glob("variants_*.png"))
    rows = _rows(csv_path)
    assert list(rows[0]) == variants.COLUMNS
    assert [r["attention"] for r in rows] == list(variants.KINDS)
    for r in rows:
        assert 0 < float(r["heldout_loss"]) < 10 and float(r["tokens_per_s_median"]) > 0
        # With one held-out batch the score is the CLI's own val_loss batch: a restore check.
        assert abs(float(r["heldout_loss"]) - float(r["val_loss"])) < 1e-3, r
    assert next(r for r in rows if r["attention"] == "caterpillar")["variant_config"] == (
        "--caterpillar-heads 4 --caterpillar-length 4"
    )


def test_decode_times_every_path_and_writes_bandwidth(tmp_path):
    import decode

    argv = ["--lengths", "256", "1000", "--batch", "1", "--heads", "4", "--kv-heads", "2"]
    argv += ["--head-dim", "16", "--reps", "2", "--out", str(tmp_path)]
    assert decode.main(argv) == 0
    (csv_path,) = tmp_path.glob("decode_*.csv")
    assert list(tmp_path.glob("decode_*.png"))
    rows = _rows(csv_path)
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
