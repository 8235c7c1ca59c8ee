"""The one exception type for user mistakes (bad options, missing data, bad checkpoints).

Scripts catch it at the top level and print its message as a single line on stderr
(no traceback), exiting with status 2. Raise it with a message that says what was wrong,
where it looked, and what to do instead.
"""


class UserError(Exception):
    pass
