"""`python -m pgolf` is the same as the `pgolf` command (so `torchrun -m pgolf run ...` works)."""

from pgolf.cli import main

if __name__ == "__main__":
    main()
