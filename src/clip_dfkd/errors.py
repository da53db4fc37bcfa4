"""The project's user errors: a wrong setting or missing input that a user can fix.

Every error that means "you asked for something that cannot be done as asked" derives from
:class:`UserError`. Its message is one line (or one line per problem) that names the key,
the bad value and what is allowed; the command line prints it without a traceback
(:mod:`clip_dfkd.cli`). Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user fixes by changing a setting or an input; the message says how."""
