"""The ``fedrot-aggregate`` command: aggregate peft adapter directories into a new one."""
from .main import main

__all__ = ["main"]
