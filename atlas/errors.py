"""One exception for every mistake a user can make; the CLI prints its message and exits 2."""


class UserError(Exception):
    """Bad input: the message is one line saying what, where, and what to do."""
