"""`python -m stalwart` is the `stalwart` command."""

from stalwart.launch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
