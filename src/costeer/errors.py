"""Errors a user can cause and fix; the CLI prints these as one line, no traceback."""


class UserError(Exception):
    """Bad input from the user: a missing file, an invalid value, an unknown name.

    Messages must never quote private context: they may end up in logs.
    """


class PrivacyError(UserError):
    """A request would send private text to the cloud. Refused before anything is sent."""
