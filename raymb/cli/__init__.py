"""The `raymb` command line (the pyproject entry point `raymb = "raymb.cli:main"`): the table
of commands in raymb.cli.main, a module per group (train, data, tools)."""

from raymb.cli.main import main
from raymb.cli.train import add_config_arguments

__all__ = ["add_config_arguments", "main"]
