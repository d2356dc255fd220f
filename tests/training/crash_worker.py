"""``megavlm train`` (under torchrun) in which one rank is killed with SIGKILL in the middle of a save: right after it
wrote its part of checkpoint ``MEGAVLM_TEST_KILL_STEP``, before the checkpoint is complete (no manifest, not renamed,
``latest`` not moved). ``MEGAVLM_TEST_KILL_RANK`` names the rank."""

import os
import signal
import sys

from megatron.core import dist_checkpointing

from megavlm.cli import main

_save = dist_checkpointing.save


def _save_then_die(state, path, *args, **kwargs):
    out = _save(state, path, *args, **kwargs)
    step = int(os.environ["MEGAVLM_TEST_KILL_STEP"])
    if os.environ["RANK"] == os.environ["MEGAVLM_TEST_KILL_RANK"] and os.path.basename(str(path)) == \
            f"iter_{step:07d}.tmp":
        os.kill(os.getpid(), signal.SIGKILL)
    return out


if __name__ == "__main__":  # spawned helpers re-import this module: only the rank itself patches and trains
    dist_checkpointing.save = _save_then_die
    sys.exit(main(sys.argv[1:]))
