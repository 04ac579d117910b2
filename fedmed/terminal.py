"""What fedmed's log lines look like on a terminal: the bare message, as a user reads it.

Library modules log through ``logging.getLogger(__name__)`` and never choose a stream; the
programs that own a terminal (the ``fedmed`` command, the coordinator's process under
``flwr run``, the SuperLink wrapper) call :func:`show_on_terminal` once. Progress lines,
summaries and results (INFO) go to stdout, warnings and errors to stderr, so users and
scripts can keep grepping stdout.
"""

from __future__ import annotations

import logging
import sys

PACKAGE_LOGGER = "fedmed"


class TerminalHandler(logging.Handler):
    """Writes each record's message alone, INFO to stdout and WARNING and above to stderr.

    The stream is looked up for every line, not kept: Flower mirrors or replaces
    ``sys.stdout`` in the coordinator's process (to stream its output to ``flwr run``), and
    pytest replaces it per test.
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()  # a line is on the terminal before the next round starts
        except Exception:  # logging must never end a run: report it the logging way
            self.handleError(record)


def show_on_terminal() -> None:
    """Show fedmed's INFO lines and above on stdout/stderr (once per process; idempotent).

    fedmed's records stop at the ``fedmed`` logger: under Hydra the root logger has its own
    handler (``[time][HYDRA]`` prefix) and would print every line a second time.
    """
    logger = logging.getLogger(PACKAGE_LOGGER)
    if not any(isinstance(handler, TerminalHandler) for handler in logger.handlers):
        logger.addHandler(TerminalHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False
