"""The ``lowbit`` command line: ``main`` parses and dispatches; ``qnn`` adds the phone commands."""

from lowbit.cli.main import main

__all__ = ["main"]
