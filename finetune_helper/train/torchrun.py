"""torch's launcher as ``finetune-helper run --gpus N`` starts it: ``torch.distributed.run.main`` (torchrun), unchanged,
but for how it ends when a run ends early.  Stopped by a signal (Ctrl-C, the app's Stop, the death of the command
that started it) or after a worker failed, torchrun raises (``SignalException``, ``ChildFailedError``) and Python
prints its traceback and failure table after the runner has already said, in one line, what happened; here it
exits with the status instead (128 + the signal, as a shell reports it; 1 for a failed worker), quietly.  Its
notices below errors ("Sending process ... closing signal SIGINT") are left out too: the runner's lines say what
happens.  Any other error of the launcher's is raised as torchrun raises it.

    python -m finetune_helper.train.torchrun --nproc_per_node=2 --standalone -m finetune_helper run ...
"""

from __future__ import annotations

import sys


def main() -> int:
    import logging
    import os

    os.environ.setdefault("LOGLEVEL", "ERROR")  # torch elastic's get_logger loggers read it
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # and the others inherit this
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except SignalException as stopped:
        return 128 + int(stopped.sigval)
    except ChildFailedError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
