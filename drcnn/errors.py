"""The one exception type that the command line turns into a one-line ``error: ...``."""


class DrcnnError(Exception):
    """A problem with the user's input (file, config field, checkpoint, device).

    The message must name the offending file or field and say what was expected; the CLI prints
    it as ``error: <message>`` without a traceback (``--debug`` shows the traceback instead).
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(_without_worker_traceback(message))


def _without_worker_traceback(message: str) -> str:
    """The original message of an error that torch's DataLoader carried over from a worker
    process (an image refused while loading). The DataLoader re-raises it as
    ``type(error)(text)``, text being ``Caught DrcnnError in DataLoader worker process N.``, the
    worker's traceback, and ``drcnn.errors.DrcnnError: <message>`` last; the CLI would print
    all of it instead of one line."""
    if not (message.startswith("Caught ") and "\nOriginal Traceback" in message):
        return message
    return message.rstrip("\n").rsplit("\n", 1)[-1].partition(": ")[2]
