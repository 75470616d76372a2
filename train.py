"""Train an MLSAE: `python train.py --help` lists every option."""

from mlsae.cli import run_command
from mlsae.trainer.train import main

if __name__ == "__main__":
    run_command(main)
