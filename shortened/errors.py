"""The two ways a command can fail: bad input (exit 2) and a failed gate (exit 1)."""


class UsageError(Exception):
    """Bad input or configuration: one line that names the problem and the fix. Exit code 2."""

    exit_code = 2


class GateFailed(Exception):
    """A quality, parity or speed gate failed; artifacts were still written. Exit code 1."""

    exit_code = 1
