"""`python -m rrr ...`: the CLI as a module, so `torchrun -m rrr train ...` and `accelerate launch -m rrr
train ...` can start it on every rank."""

from rrr.cli import main

if __name__ == "__main__":
    main()
