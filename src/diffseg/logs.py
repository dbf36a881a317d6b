"""Logging for workflow scripts: everything goes to the rule's log file, errors included."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def log_to(path: str | os.PathLike) -> Iterator[logging.Logger]:
    """Send logging, warnings and tqdm's stderr to ``path``; log any exception before re-raising."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as stream, contextlib.redirect_stderr(stream):
        root = logging.getLogger()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        warnings.simplefilter("default")
        log = logging.getLogger("diffseg.workflow")
        try:
            yield log
        except Exception:
            log.exception("failed")
            raise
        finally:
            root.removeHandler(handler)
            logging.captureWarnings(False)
            sys.stderr.flush()
