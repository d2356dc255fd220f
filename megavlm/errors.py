"""Errors that are the user's to fix (a missing checkpoint, a tokenizer that does not fit the model). The CLI prints
their message and exits with status 2; anything else is a bug and keeps its traceback."""


class UserError(ValueError):
    """``all_ranks=True``: every rank meets the same error at the same point (a check all ranks make alike, or one
    after a collective), so the CLI prints it once, from rank 0; every rank still exits with status 2."""

    def __init__(self, *args, all_ranks: bool = False):
        super().__init__(*args)
        self.all_ranks = all_ranks
