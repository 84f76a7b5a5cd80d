"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class RtbError(Exception):
    """A user-facing failure: the message names the file, the column or row, and what was expected.

    Library code raises this instead of printing and exiting, so that the CLI decides how the
    process ends and tests can assert the message. Name files by the paths the code holds
    (absolute, under the project root): the CLI prints them relative to the project folder,
    which is how the user knows them (data/raw/..., also when the stage ran in a container).
    """
