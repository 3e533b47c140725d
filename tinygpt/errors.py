"""The one exception type for mistakes a user can cause (bad config, bad file, bad argument).

CLIs catch it, print ``error: <message>`` to stderr and exit with status 2, without a traceback.
Messages are one line and name the file and the field or argument at fault.
"""


class UserError(Exception):
    """A problem the user can fix: bad input file, bad config value, bad CLI argument."""
