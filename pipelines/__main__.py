"""List the available pipelines: ``python -m pipelines``."""

import sys

from pipelines import list_pipelines


def main() -> int:
    """Print one pipeline name per line, with how to run it."""
    names = list_pipelines()
    for name in names:
        print(name)
    print(
        f"\n{len(names)} pipeline(s). Run one with: python -m pipelines.<name> "
        "{train,evaluate,predict,tune,export} --help",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
