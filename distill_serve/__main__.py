"""`python -m distill_serve`: the distill-serve command (see distill_serve/cli.py)."""

from distill_serve.cli import main

if __name__ == "__main__":
    main()
