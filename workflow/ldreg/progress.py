"""Progress of long loops as log lines (so Snakemake logs show rate and ETA)."""
from __future__ import annotations

import logging

from tqdm import tqdm


class _LogStream:
    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def write(self, text):
        text = text.strip()
        if text:
            self.logger.info(text)

    def flush(self):
        pass


def progress(iterable=None, desc: str = "", logger: str = "ldreg", interval: float = 10, **kwargs):
    """tqdm whose bar is written as a log line at most every ``interval`` seconds."""
    return tqdm(iterable, desc=desc, mininterval=interval, file=_LogStream(logging.getLogger(logger)), **kwargs)
