"""`python -m eval`: the distill-eval command (see eval/cli.py)."""

from eval.cli import main

if __name__ == "__main__":
    main()
