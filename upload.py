"""Publish a trained MLSAE: `python upload.py --help` lists every option."""

from mlsae.trainer.config import UploadConfig, parse
from mlsae.trainer.upload import upload

if __name__ == "__main__":
    upload(parse(UploadConfig))
