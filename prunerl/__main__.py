"""``python -m prunerl COMMAND [hydra overrides]``."""

from prunerl.cli import main

if __name__ == "__main__":
    main()
