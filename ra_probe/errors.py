"""The one exception type for a user's mistake: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (unknown model, unreadable file, wrong data shape, no network...)."""
