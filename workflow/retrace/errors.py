"""The one exception type users see: a message naming the file or key that is wrong."""


class RetraceError(Exception):
    """Bad input or a broken file. The message names the file/key and says what is wrong.

    The command line prints it as a single line (no traceback) and exits with status 2.
    """
