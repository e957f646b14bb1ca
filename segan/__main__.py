"""``python -m segan`` (and ``torchrun -m segan``) entry point."""

from segan.cli import main

if __name__ == "__main__":
    main()
