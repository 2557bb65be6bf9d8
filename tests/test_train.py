"""The training CLI: resume loses nothing, xla and chunked agree, bad input exits 2."""

from __future__ import annotations

import json

import pytest

from chunkattn import train

SMALL = [
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--layers",
    "1",
    "--dim",
    "32",
    "--heads",
    "2",
    "--log-every",
    "2",
    "--eval-every",
    "4",
    "--ckpt-every",
    "4",
    "--sample",
    "0",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        (d / f"f{i}.txt").write_text(f"the quick brown fox jumps over the lazy dog {i}\n" * 60)
    return str(d)


def _losses(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(corpus, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main(["--data", corpus, "--steps", "8", "--out", str(full), *SMALL]) == 0
    assert train.main(["--data", corpus, "--steps", "4", "--out", str(part), *SMALL]) == 0
    assert (
        train.main(["--data", corpus, "--steps", "8", "--out", str(part), "--resume", *SMALL]) == 0
    )
    a, b = _losses(full), _losses(part)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x, y)
    assert (full / "loss.png").exists()


def test_xla_and_chunked_give_the_same_losses(corpus, tmp_path):
    runs = {}
    for impl in ("xla", "chunked"):
        out = tmp_path / impl
        assert (
            train.main(
                ["--data", corpus, "--steps", "6", "--attention", impl, "--out", str(out), *SMALL]
            )
            == 0
        )
        runs[impl] = [r["loss"] for r in _losses(out)]
    assert max(abs(x - y) for x, y in zip(*runs.values(), strict=True)) < 2e-3, runs


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "/no/such/path"], "no such file"),
        (["--seq-len", "64", "--max-seq-len", "32"], "larger than the model allows"),
        (["--attention", "flash"], "unknown"),
        (["--resume", "--out", "{empty}"], "no checkpoint"),
        (["--attention", "delta", "--dpfp-nu", "0"], "--dpfp-nu must be positive"),
        (["--attention", "caterpillar", "--caterpillar-heads", "-1"], "must be positive"),
        (["--attention", "caterpillar", "--caterpillar-length", "0"], "must be positive"),
        (["--dpfp-nu", "2"], "--dpfp-nu applies to --attention delta, not chunked"),
        (["--attention", "delta", "--caterpillar-length", "8"], "applies to --attention cater"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    args = [a.replace("{empty}", str(tmp_path)) for a in args]
    assert train.main([*args, "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_corrupt_checkpoint_exits_2(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data", corpus, "--steps", "4", "--out", str(out), *SMALL]) == 0
    for f in (out / "checkpoints").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    assert (
        train.main(["--data", corpus, "--steps", "8", "--out", str(out), "--resume", *SMALL]) == 2
    )
    assert "unreadable" in capsys.readouterr().err


def test_dry_run_shows_chunked_fits_where_dense_grows(capsys):
    mem = {}
    for impl in ("xla", "chunked"):
        assert (
            train.main(
                [
                    "--dry-run",
                    "--attention",
                    impl,
                    "--seq-len",
                    "4096",
                    "--batch-size",
                    "1",
                    "--layers",
                    "1",
                    "--dim",
                    "64",
                    "--heads",
                    "4",
                ]
            )
            == 0
        )
        line = capsys.readouterr().out
        mem[impl] = float(line.split("compiled temp ")[1].split(" MiB")[0])
    assert mem["chunked"] * 10 < mem["xla"], mem


def test_mesh_flag_is_checked(capsys):
    assert train.main(["--mesh", "dp=2,sp=4", "--steps", "1"]) == 2  # one device here
    assert "needs 8 devices" in capsys.readouterr().err
    assert train.main(["--mesh", "tp=1", "--steps", "1"]) == 2
    assert "axes are dp and sp" in capsys.readouterr().err


def test_variant_knobs_reach_the_layers():
    """--dpfp-nu and --caterpillar-heads/-length end up in GPTConfig and every block's layer."""
    model_args = ["--layers", "2", "--dim", "32", "--heads", "2"]
    a = train.parse_args(
        ["--attention", "caterpillar", "--caterpillar-heads", "3", "--caterpillar-length", "8"]
        + model_args
    )
    model = train.build(a)[0]
    assert (model.cfg.caterpillar_heads, model.cfg.caterpillar_length) == (3, 8)
    for block in model.blocks:
        assert (block.attn.height, block.attn.length) == (3, 8)
        assert block.attn.init_k.shape == (3, 8, 16)  # (CH, CL, H)
    model = train.build(train.parse_args(["--attention", "delta", "--dpfp-nu", "3", *model_args]))[
        0
    ]
    assert model.cfg.dpfp_nu == 3 and [b.attn.nu for b in model.blocks] == [3, 3]
    default = train.build(train.parse_args(["--attention", "delta", *model_args]))[0]
    assert default.cfg.dpfp_nu == 1


def test_sequence_parallelism_needs_the_chunked_attention(capsys, monkeypatch):
    """A layer with no ring form would silently ignore the "sp" axis: refused up front."""
    monkeypatch.setattr(train.jax, "device_count", lambda: 2)  # parse only: exits before running
    for attention in ("delta", "caterpillar", "xla"):
        assert train.main(["--mesh", "sp=2", "--attention", attention, "--steps", "1"]) == 2
        err = capsys.readouterr().err
        assert "use --attention chunked" in err and attention in err
