"""User-facing errors: the CLI prints their message as one line and exits 2."""


class HarnessError(Exception):
    """Bad input or state the user can fix; the message names the file, field or shard."""
