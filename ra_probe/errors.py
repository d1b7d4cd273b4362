"""The one exception type for a user's mistake (the CLI prints its message on one line and exits 2),
and the one way an exception is shortened to a line."""


class UserError(ValueError):
    """Bad input from the user (unknown model, unreadable file, wrong data shape, no network...)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
