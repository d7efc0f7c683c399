"""`python -m codellm ...`: the CLI (what `torchrun -m codellm train ...` starts on each GPU)."""

from codellm.cli.main import main

main()
