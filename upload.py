"""Publish a trained MLSAE: `python upload.py --help` lists every option."""

from mlsae.cli import run_command
from mlsae.trainer.upload import main

if __name__ == "__main__":
    run_command(main)
