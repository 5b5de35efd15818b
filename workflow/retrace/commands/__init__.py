"""Subcommands of the ``retrace`` CLI, one module each (see ``retrace.cli``)."""
