"""``python -m vembed`` (and ``accelerate launch -m vembed train ...``)."""

from vembed.cli import main

if __name__ == "__main__":
    main()
