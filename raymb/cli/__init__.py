"""The `raymb` command line (the pyproject entry point `raymb = "raymb.cli:main"`)."""

from raymb.cli.main import add_config_arguments, main

__all__ = ["add_config_arguments", "main"]
