"""pgolf: every Parameter Golf technique as a plugin on one shared, measured lifecycle."""

__version__ = "0.1.0"
