"""`chunkattn-train` with two test hooks, run by tests/test_train.py as a subprocess.

    python tests/train_helper.py [chunkattn-train options]

Environment (both hooks write MARKER when they are reached, so the test knows when to act):
  TRAIN_HELPER_MARKER       the file to create.
  TRAIN_HELPER_PAUSE_AT=K   before step K+1 (the batch of step index K >= 1), wait until MARKER.go
                            exists: the test sends its signal in between, deterministically.
  TRAIN_HELPER_HANG_SAVE=S  the save of step S hangs after its files are written and before
                            Orbax renames the folder: the test SIGKILLs the process mid-save.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import time

from chunkattn import train


def _mark() -> pathlib.Path:
    marker = pathlib.Path(os.environ["TRAIN_HELPER_MARKER"])
    marker.write_text(str(os.getpid()))
    return marker


def pause_at(k: int) -> None:
    batch_at = train.batch_at

    def paused(data, seed, step, batch, seq_len):
        if step == k:  # K >= 1: validation batches are step 0
            go = _mark().with_suffix(".go")
            deadline = time.monotonic() + 120
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return batch_at(data, seed, step, batch, seq_len)

    train.batch_at = paused


def hang_save(step: int) -> None:
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def hanging(self, *args, **kwargs):
        if self.get_final().name == str(step):  # the step folder, after its items are written
            _mark()
            time.sleep(120)
        return await finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = hanging


if __name__ == "__main__":
    argv = sys.argv[1:]
    # As in a terminal, whatever the test runner's workers ignore (children inherit SIG_IGN).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if "TRAIN_HELPER_PAUSE_AT" in os.environ:
        pause_at(int(os.environ["TRAIN_HELPER_PAUSE_AT"]))
    if "TRAIN_HELPER_HANG_SAVE" in os.environ:
        hang_save(int(os.environ["TRAIN_HELPER_HANG_SAVE"]))
    sys.exit(train.main(argv))
