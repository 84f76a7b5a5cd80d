"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class RtbError(Exception):
    """A user-facing failure: the message names the file, the column or row, and what was expected.

    Library code raises this instead of printing and exiting, so that the CLI decides how the
    process ends and tests can assert the message.
    """
