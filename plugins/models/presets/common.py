"""What every preset file shares."""


def defaults(args, **values):
    """Set ``values`` on ``args`` where the command line did not: presets only set defaults."""
    for name, value in values.items():
        setattr(args, name, getattr(args, name, value))
