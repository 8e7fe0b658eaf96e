"""The one exception type that the command line turns into a one-line ``error: ...``."""


class DrcnnError(Exception):
    """A problem with the user's input (file, config field, checkpoint, device).

    The message must name the offending file or field and say what was expected; the CLI prints
    it as ``error: <message>`` without a traceback (``--debug`` shows the traceback).
    """
