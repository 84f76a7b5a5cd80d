"""Why a fitted pipeline could not be compiled (the service then scores with the pipeline)."""


class NotCompilable(Exception):
    """A pipeline step has no exact pure-Python equivalent; the message names the step."""
