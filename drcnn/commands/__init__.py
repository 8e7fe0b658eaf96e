"""Sub-commands of the ``drcnn`` CLI, one module each (see :mod:`drcnn.cli`).

Modules here only parse arguments and call library functions; heavy imports (torch) happen
inside the handler so that ``drcnn --help`` stays fast.
"""
