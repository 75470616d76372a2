"""Evaluate pretrained MLSAEs: `python test.py --help` lists every option."""

from mlsae.trainer.config import TestConfig, parse
from mlsae.trainer.test import test

if __name__ == "__main__":
    test(parse(TestConfig))
