"""Evaluate pretrained MLSAEs: `python test.py --help` lists every option."""

from mlsae.cli import run_command
from mlsae.trainer.test import main

if __name__ == "__main__":
    run_command(main)
