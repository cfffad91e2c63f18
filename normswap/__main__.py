"""``python -m normswap`` runs the command line."""

from normswap.cli.main import main

if __name__ == "__main__":
    main()
