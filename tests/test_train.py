"""The training CLI: resume is bitwise exact and loses nothing (signals, a kill mid-save), runs
are protected and compared, bad input exits 2 with one line, progress and summary are readable.

The subprocess runs go through tests/train_helper.py, which adds two hooks: a pause before a
given step (the test signals the process there) and a save that hangs before Orbax renames its
folder (the test SIGKILLs the process there).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from chunkattn import train

HELPER = pathlib.Path(__file__).with_name("train_helper.py")
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
    "--warmup",
    "2",
    "--log-every",
    "1",
    "--eval-every",
    "4",
    "--ckpt-every",
    "4",
    "--sample",
    "0",
]
STEPS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        (d / f"f{i}.txt").write_text(f"the quick brown fox jumps over the lazy dog {i}\n" * 60)
    return str(d)


class _FakeTTY(io.StringIO):
    def isatty(self):
        return True


def _main_on_cpu(argv) -> int:
    with jax.default_device(jax.devices("cpu")[0]):  # the subprocess runs use the CPU too
        return train.main(argv)


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """STEPS steps in one go, on a 'terminal', with a sample: the reference for every resume."""
    out = tmp_path_factory.mktemp("straight") / "run"
    args = ["--data", corpus, "--steps", str(STEPS), *SMALL, "--sample", "8", "--out", str(out)]
    stdout, stderr = io.StringIO(), _FakeTTY()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert _main_on_cpu(args) == 0, stderr.getvalue()
    return {"out": out, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out):
    return {r["step"]: (r["loss"], r.get("val_loss")) for r in _rows(out)}


def _params(out, corpus):
    """The newest checkpoint's parameters, restored as the notebook and bench/variants do."""
    a = train.parse_args(["--data", corpus, *SMALL, "--out", str(out)])
    _, _, _, params, tx, *_ = train.build(a)
    params, _, step = train.restore(out, params, tx.init(params))
    return step, [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def _assert_bitwise(out, reference, corpus):
    assert _losses(out) == _losses(reference)  # every logged loss, exactly
    (step, got), (ref_step, want) = _params(out, corpus), _params(reference, corpus)
    assert step == ref_step == STEPS
    assert all(np.array_equal(x, y) for x, y in zip(got, want, strict=True))


def test_k_steps_then_resume_to_n_is_bitwise_n_steps(straight, corpus, tmp_path):
    """--schedule-steps N on the first part: the resumed run follows the same schedule."""
    part = tmp_path / "part"
    shutil.copytree(straight["out"], part)  # a used --out: --overwrite must clear it all
    args = ["--data", corpus, *SMALL, "--out", str(part)]
    assert _main_on_cpu([*args, "--steps", "4", "--schedule-steps", str(STEPS), "--overwrite"]) == 0
    assert sorted(os.listdir(part / "checkpoints")) == ["4"]
    assert [r["step"] for r in _rows(part)] == [1, 2, 3, 4]
    assert _main_on_cpu([*args, "--steps", str(STEPS), "--resume"]) == 0
    _assert_bitwise(part, straight["out"], corpus)
    assert (part / "loss.png").exists()


def test_a_larger_steps_on_resume_keeps_the_schedule_and_its_final_rate(straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight["out"], out)
    # Only --steps: every other option comes from the run's config.json.
    assert _main_on_cpu(["--out", str(out), "--resume", "--steps", "10", "--sample", "0"]) == 0
    err = capsys.readouterr().err
    assert "steps 9-10 run past the learning-rate schedule (8 steps)" in err, err
    rows, before = _rows(out), _rows(straight["out"])
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [(r["loss"], r["lr"]) for r in rows[:STEPS]] == [(r["loss"], r["lr"]) for r in before]
    assert [r["lr"] for r in rows[STEPS:]] == pytest.approx([1e-4, 1e-4], rel=1e-6)
    saved = json.loads((out / "config.json").read_text())["options"]
    assert (saved["steps"], saved["schedule_steps"]) == (10, STEPS)


def test_xla_and_chunked_give_the_same_losses(straight, corpus, tmp_path):
    out = tmp_path / "xla"
    argv = ["--data", corpus, "--steps", str(STEPS), "--attention", "xla", *SMALL]
    assert _main_on_cpu([*argv, "--out", str(out)]) == 0
    xla, chunked = _losses(out), _losses(straight["out"])
    assert max(abs(xla[s][0] - chunked[s][0]) for s in chunked) < 2e-3, (xla, chunked)


def test_progress_bar_on_a_terminal_and_summary_at_the_end(straight):
    err, out, run = straight["stderr"], straight["stdout"], straight["out"]
    assert "\r" in err and "loss=" in err and "tok/s=" in err, err  # tqdm, with its postfix
    assert f"{STEPS}/{STEPS} [" in err and "<00:00" in err, err  # steps done, elapsed<ETA
    assert "done: step 8 of 8 (8 trained in" in out and "tokens/s)" in out, out
    last = _rows(run)[-1]
    assert f"train {last['loss']:.4f} (step 8), validation {last['val_loss']:.4f}" in out, out
    for path in ("checkpoints", "metrics.jsonl", "loss.png", "sample.txt"):
        assert str(run / path) in out, out
    sample = (run / "sample.txt").read_text()
    label = "--- sample: 8 bytes generated after a 16-byte prompt from the validation text ---"
    assert f"{label}\n{sample}\n--- end of sample ---" in out, out


def test_new_run_into_a_used_out_is_refused(straight, corpus, capsys):
    argv = ["--data", corpus, "--steps", "2", *SMALL, "--out", str(straight["out"])]
    assert _main_on_cpu(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "--overwrite" in err[0], err


def test_resume_with_changed_options_names_each_and_exits_2(straight, corpus, capsys):
    out = str(straight["out"])
    changed = ["--dim", "64", "--layers", "2", "--log-every", "3"]  # the last may change
    assert _main_on_cpu(["--data", corpus, "--out", out, "--resume", *changed]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith(
        "chunkattn-train: error: --resume: --layers 2 differs from the run's 1"
    )
    assert err[1].startswith("chunkattn-train: error: --resume: --dim 64 differs from the run's 32")
    assert _main_on_cpu(["--out", out, "--resume", "--steps", "4"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--steps 4: the run in" in err[0] and "at step 8" in err[0], err


def test_nothing_to_train_after_the_last_step(straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight["out"], out)
    argv = ["--out", str(out), "--resume", "--log-every", "2", "--sample", "0"]
    assert _main_on_cpu(argv) == 0
    assert "nothing to train: the run is at step 8 of 8" in capsys.readouterr().out
    assert _rows(out) == _rows(straight["out"])


def _env(tmp_path, **hooks):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TRAIN_HELPER_MARKER=str(tmp_path / "marker"))
    # The four processes compile the same programs: a shared compilation cache halves their time.
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"))
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.update({f"TRAIN_HELPER_{k.upper()}": str(v) for k, v in hooks.items()})
    return env


def _start(argv, tmp_path, **hooks):
    (tmp_path / "marker").unlink(missing_ok=True)
    (tmp_path / "marker.go").unlink(missing_ok=True)
    cmd = [sys.executable, str(HELPER), *argv]
    return subprocess.Popen(
        cmd, env=_env(tmp_path, **hooks), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_marker(proc, tmp_path):
    deadline = time.monotonic() + 240
    while not (tmp_path / "marker").exists():
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before the hook:\n{proc.communicate()[1]}")
        assert time.monotonic() < deadline, "the hook was never reached"
        time.sleep(0.02)


def _signal_at_pause(proc, tmp_path, signum):
    _wait_for_marker(proc, tmp_path)
    proc.send_signal(signum)
    time.sleep(0.2)  # the handler runs within the pause's 10 ms sleeps
    (tmp_path / "marker.go").touch()
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


def test_sigint_kill_mid_save_and_sigterm_lose_nothing(straight, corpus, tmp_path):
    """SIGINT, then SIGKILL inside a save, then SIGTERM, then the rest: every step once, bitwise."""
    out = tmp_path / "run"
    argv = ["--data", corpus, "--steps", str(STEPS), *SMALL, "--out", str(out)]
    # 1. SIGINT while step 3 runs: saved at step 3, exit 130.
    rc, _, err = _signal_at_pause(_start(argv, tmp_path, pause_at=2), tmp_path, signal.SIGINT)
    assert rc == 130, err
    assert f"SIGINT: stopped at step 3 of 8; checkpoint {out / 'checkpoints' / '3'}" in err, err
    assert f"metrics {out / 'metrics.jsonl'}" in err and "Traceback" not in err, err
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]
    # 2. Resume; killed while the step-8 save is being written (steps 4 and 8 are due).
    proc = _start([*argv, "--resume"], tmp_path, hang_save=8)
    _wait_for_marker(proc, tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    assert sorted(os.listdir(out / "checkpoints")) == ["3", "4", "8.orbax-checkpoint-tmp"]
    # 3. Resume from 4, the newest complete one; SIGTERM while step 6 runs: saved at 6, exit 143.
    proc = _start(["--out", str(out), "--resume"], tmp_path, pause_at=5)
    rc, _, err = _signal_at_pause(proc, tmp_path, signal.SIGTERM)
    assert rc == 143, err
    tmp = out / "checkpoints" / "8.orbax-checkpoint-tmp"
    assert f"ignoring incomplete checkpoint {tmp} (its save never finished)" in err, err
    assert "resuming" in err and "at step 4 of 8" in err, err
    assert "SIGTERM: stopped at step 6 of 8" in err, err
    # 4. The rest, as a log file sees it: plain lines, no carriage returns.
    proc = _start(["--out", str(out), "--resume"], tmp_path)
    stdout, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert "\r" not in err and "step 8/8  loss " in err and "eta " in err, err
    assert "done: step 8 of 8 (2 trained in" in stdout, stdout
    assert [r["step"] for r in _rows(out)] == list(range(1, STEPS + 1))  # each step once
    _assert_bitwise(out, straight["out"], corpus)


def test_corrupt_checkpoint_exits_2(straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight["out"], out)
    for f in (out / "checkpoints").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    assert _main_on_cpu(["--out", str(out), "--resume", "--steps", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreadable" in err[0], err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "/no/such/path"], "no such file"),
        (["--data", "{empty_dir}"], "no files in that folder"),
        (["--data", "{empty_file}"], "no text, the files are empty"),
        (["--data", "{short_file}"], "less than one batch"),
        (["--seq-len", "64", "--max-seq-len", "32"], "larger than the model allows"),
        (["--seq-len", "32", "--sample", "100"], "--sample 100 does not fit"),
        (["--attention", "linear", "--sample", "10"], "has no KV cache"),
        (["--attention", "flash"], "unknown"),
        (["--attention", "pallas"], "--attention pallas needs a GPU"),
        (["--resume", "--out", "{empty_dir}"], "no checkpoint"),
        (["--resume", "--overwrite"], "pick one"),
        (["--out", "{short_file}/run"], "cannot write there"),
        (["--lr", "0"], "--lr must be a positive number"),
        (["--lr", "-0.1"], "--lr must be a positive number"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--lr", "fast"], "invalid float value"),
        (["--steps", "0"], "--steps must be positive"),
        (["--log-every", "0"], "--log-every must be positive"),
        (["--eval-every", "-1"], "--eval-every must be positive"),
        (["--ckpt-every", "0"], "--ckpt-every must be positive"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints must be positive"),
        (["--schedule-steps", "0"], "--schedule-steps must be positive"),
        (["--warmup", "-1"], "--warmup must be zero or positive"),
        (["--seed", "-1"], "--seed must be zero or positive"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--no-such-option"], "unrecognized arguments"),
        (["--attention", "delta", "--dpfp-nu", "0"], "--dpfp-nu must be positive"),
        (["--attention", "caterpillar", "--caterpillar-heads", "-1"], "must be positive"),
        (["--attention", "caterpillar", "--caterpillar-length", "0"], "must be positive"),
        (["--dpfp-nu", "2"], "--dpfp-nu applies to --attention delta, not chunked"),
        (["--attention", "delta", "--caterpillar-length", "8"], "applies to --attention cater"),
        (["--attention", "linear", "--sinks"], "--sinks applies to --attention chunked, pallas"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    if "needs a GPU" in message and jax.default_backend() == "gpu":
        pytest.skip("this machine has the GPU it asks for")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_file").write_bytes(b"")
    (tmp_path / "short_file").write_text("too short for a batch\n")
    args = [a.format(**{p.name: p for p in tmp_path.iterdir()}) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    assert train.main(["--steps", "1", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chunkattn-train: error: "), err
    assert message in err[0], err


def test_help_shows_every_option_with_its_default_and_a_help_line(capsys):
    with pytest.raises(SystemExit) as exit:
        train.main(["--help"])
    assert exit.value.code == 0
    entries = {}  # "--flag" -> its help, the wrapped lines joined
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif line.startswith("   ") and entries:
            entries[flag] += line
    for action in train.make_parser()._actions:
        if action.dest == "help":
            continue
        entry = " ".join(entries[action.option_strings[-1]].split())
        assert action.help and "default" in entry, entry
        if action.default not in (None, False):
            assert f"(default: {action.default})" in entry, entry


def test_the_plot_leaves_the_matplotlib_backend_alone(straight, tmp_path, monkeypatch):
    import matplotlib

    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(straight["out"] / "metrics.jsonl", out)
    monkeypatch.setitem(matplotlib.rcParams, "backend", "svg")  # as if a notebook had chosen it
    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("matplotlib.use called"))
    train.plot_losses(out)
    assert matplotlib.rcParams["backend"] == "svg"
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_dry_run_shows_chunked_fits_where_dense_grows(capsys):
    mem = {}
    for impl in ("xla", "chunked"):
        argv = ["--dry-run", "--attention", impl, "--seq-len", "4096", "--batch-size", "1"]
        assert train.main([*argv, "--layers", "1", "--dim", "64", "--heads", "4"]) == 0
        line = capsys.readouterr().out
        mem[impl] = float(line.split("compiled temp ")[1].split(" MiB")[0])
    assert mem["chunked"] * 10 < mem["xla"], mem


def test_mesh_flag_is_checked(capsys, monkeypatch):
    """Each bad --mesh is one error line, exit status 2, before anything runs."""

    def error(argv: list[str]) -> str:
        assert train.main([*argv, "--steps", "1"]) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("chunkattn-train: error: --mesh "), lines
        return lines[0]

    assert "dp·sp·tp = 8 must equal the device count, 1 present" in error(["--mesh", "dp=2,sp=4"])
    assert "unknown axis 'pp', the axes are dp, sp, tp" in error(["--mesh", "dp=1,pp=1"])
    assert "expected axis=size pairs" in error(["--mesh", "dp=2,sp"])
    assert "sizes must be positive, got tp=0" in error(["--mesh", "tp=0"])
    assert "each axis once" in error(["--mesh", "sp=1,sp=1"])
    monkeypatch.setattr(train.jax, "device_count", lambda: 8)  # parse only: exits before running
    assert "dp·sp·tp = 4 must equal the device count, 8 present" in error(["--mesh", "sp=2,tp=2"])
    assert "dp=2 must divide --batch-size 3" in error(["--mesh", "dp=2,tp=4", "--batch-size", "3"])
    assert "tp=4 must divide --heads 6 (query and kv heads)" in error(
        ["--mesh", "dp=2,tp=4", "--heads", "6", "--dim", "48"]
    )
    assert "sp=4 needs --seq-len to be a multiple of 2·sp = 8" in error(
        ["--mesh", "sp=4,tp=2", "--seq-len", "36"]
    )


def test_mesh_shape_fills_in_the_missing_axes(monkeypatch):
    monkeypatch.setattr(train.jax, "device_count", lambda: 8)
    assert train.parse_mesh("tp=2,dp=4") == {"dp": 4, "sp": 1, "tp": 2}
    assert train.parse_mesh("dp=2,sp=2,tp=2") == {"dp": 2, "sp": 2, "tp": 2}


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


def test_a_mesh_needs_the_chunked_attention(capsys, monkeypatch):
    """A layer with no ring form would silently ignore the mesh: refused up front."""
    monkeypatch.setattr(train.jax, "device_count", lambda: 2)  # parse only: exits before running
    for mesh in ("sp=2", "tp=2", "dp=2"):
        for attention in ("delta", "caterpillar", "xla"):
            assert train.main(["--mesh", mesh, "--attention", attention, "--steps", "1"]) == 2
            err = capsys.readouterr().err
            assert "use --attention chunked" in err and attention in err


def test_sinks_flag_trains_is_saved_and_resumes(straight, corpus, tmp_path, capsys):
    """--sinks: saved in config.json, taken from it by --resume (whose restore needs the sinks'
    parameters), refused where the run had none (also a run saved before the option existed);
    the layers' sinks train."""
    out = tmp_path / "sinks"
    argv = ["--data", corpus, *SMALL, "--out", str(out)]
    assert _main_on_cpu([*argv, "--steps", "2", "--sinks"]) == 0
    assert json.loads((out / "config.json").read_text())["options"]["sinks"] is True
    assert all(np.isfinite(r["loss"]) for r in _rows(out))
    capsys.readouterr()
    assert _main_on_cpu(["--out", str(out), "--resume"]) == 0
    assert "nothing to train: the run is at step 2 of 2" in capsys.readouterr().out
    a = train.parse_args(["--data", corpus, *SMALL, "--sinks", "--out", str(out)])
    model, _, _, params, tx, *_ = train.build(a)
    params, _, step = train.restore(out, params, tx.init(params))
    nnx.update(model, params)
    assert step == 2 and all(np.asarray(b.attn.sinks[...]).all() for b in model.blocks)
    old = tmp_path / "old"  # a run saved before --sinks existed had none
    old.mkdir()
    config = json.loads((straight["out"] / "config.json").read_text())
    del config["options"]["sinks"]
    (old / "config.json").write_text(json.dumps(config))
    for run in (straight["out"], old):
        assert _main_on_cpu(["--out", str(run), "--resume", "--sinks"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "--sinks True differs from the run's False" in err[0], err
