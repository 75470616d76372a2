"""Train an MLSAE: `python train.py --help` lists every option."""

from mlsae.trainer.config import RunConfig, parse
from mlsae.trainer.train import train

if __name__ == "__main__":
    output_dir = train(parse(RunConfig))
    print(f"Saved the trained model to {output_dir}")
