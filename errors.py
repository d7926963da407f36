"""The one exception of bad input: a bad file, flag, checkpoint or setting, or a training
run that cannot go on (a NaN loss). Its message names the file (and line) or the option
and the reason; ``runtime.cli`` ends a script on it with that one line, no traceback."""


class DataError(ValueError):
    """Bad input; the message names the file, the line and the reason."""
