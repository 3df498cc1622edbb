"""What every workflow script does around its work: log to the rule's log file, read its params."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("character_em")


@contextlib.contextmanager
def job_log(path: str | os.PathLike[str] | None) -> Iterator[logging.Logger]:
    """Send the job's Python output and warnings to its Snakemake log file.

    The file descriptors are redirected too, so messages printed by C extensions (bitsandbytes,
    tokenizers) land in the log rather than in the scheduler's output.
    """
    if path is None:
        yield log
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as handle:
        saved = [os.dup(1), os.dup(2)]
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        old_streams = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = handle
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=handle, force=True
        )
        logging.captureWarnings(True)
        try:
            yield log
        except BaseException:
            log.exception("job failed")
            raise
        finally:
            sys.stdout.flush()
            sys.stdout, sys.stderr = old_streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def read_param(value: str) -> Any:
    """Params travel as canonical JSON strings (see config.as_param)."""
    return json.loads(value)
