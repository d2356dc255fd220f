"""Errors that are the user's to fix (a missing checkpoint, a tokenizer that does not fit the model). The CLI prints
their message and exits with status 2; anything else is a bug and keeps its traceback."""


class UserError(ValueError):
    pass
