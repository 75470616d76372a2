from mlsae.cli import run_command
from mlsae.explorer.__main__ import main

if __name__ == "__main__":
    run_command(main)
