"""The launch scripts' shared start: import the command's module and run it; an install without the extra the
command needs gets one line saying which to install (exit status 2), not a traceback."""

import importlib
import sys


def run(module: str, description: str) -> int:
    """``module.main(description=...)``'s exit status, or 2 when ``module`` needs an extra that is not installed."""
    try:
        main = importlib.import_module(module).main
    except ModuleNotFoundError as e:
        if type(e).__name__ != "MissingExtraError":
            raise
        print(f"{sys.argv[0]}: error: {e}", file=sys.stderr)
        return 2
    return main(description=description)
