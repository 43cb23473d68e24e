"""`python -m jaxgen` is the same as the `jaxgen` command."""

from jaxgen.cli import main

if __name__ == "__main__":
    main()
