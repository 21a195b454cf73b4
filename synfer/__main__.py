"""`python -m synfer ...` (what `torchrun -m synfer run RECIPE` launches): the `synfer` command."""
from synfer.commands.cli import main

if __name__ == "__main__":
    main()
