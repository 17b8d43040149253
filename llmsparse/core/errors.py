"""The one exception type users see: a problem with their input, said in one line with the fix."""


class LlmsparseError(Exception):
    """Bad input or an unrecoverable condition, reported as a single line by the CLI (exit code 2)."""
