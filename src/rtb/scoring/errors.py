"""Why a fitted pipeline could not be turned into tables (its callers then use the pipeline)."""


class NotTabulable(Exception):
    """A pipeline step has no exact table or constant equivalent; the message names it."""
