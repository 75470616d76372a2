"""Analysis outputs: the model that wrote them, and writes that leave nothing half-done."""

import errno
import hashlib
import json
import logging
import os
import runpy
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors import safe_open

from mlsae.analysis import dists as dists_module
from mlsae.analysis import examples_db
from mlsae.analysis.dists import Dists, DistsAccumulator, write_layer_std_csv
from mlsae.analysis.examples import Example, Examples, main, write_db
from mlsae.analysis.geometry import write_rows
from mlsae.analysis.identity import (
    OutputOfAnotherModelError,
    OutputOrigin,
    model_identity,
    source_identity,
)
from mlsae.analysis.variances import write_csv
from mlsae.explorer.__main__ import find_examples
from mlsae.files import DiskFullError
from mlsae.lm.data import held_out_stream
from mlsae.trainer.config import DataConfig
from tests.analysis import (
    CORPUS,
    GOLDEN_MODEL,
    GOLDEN_TRANSFORMER,
    TOKENS_PER_BATCH,
    golden_source,
    golden_tokenizer,
    random_latents,
)
from tests.goldens import GOLDENS

COMMON = [
    f"--repo_id={GOLDEN_MODEL}",
    f"--model_name={GOLDEN_TRANSFORMER}",
    f"--path={CORPUS}",
    "--max_length=32",
    "--batch_size=2",
    f"--max_tokens={TOKENS_PER_BATCH}",
    "--device=cpu",
]
EXAMPLE = Example(3, 1, 5, "x", 1.5, [5], ["x"], [1.5])


@pytest.fixture(scope="module")
def golden_model():
    return golden_source().model


@pytest.fixture(scope="module")
def other_model():
    """The golden model with one decoder weight changed: another model of the same name."""
    model = golden_source().model
    with torch.no_grad():
        model.autoencoder.decoder.weight[0, 0] += 1.0
    return model


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_model_identity_is_a_hash_of_the_weights(golden_model, other_model):
    identity = model_identity(golden_model)
    assert len(identity) == 64 and int(identity, 16) >= 0
    assert model_identity(golden_source().model) == identity
    assert source_identity(golden_source()) == identity
    assert model_identity(other_model) != identity
    # Counters that change no latent leave it as it is.
    again = golden_source().model
    again.autoencoder.tokens_since_fired += 7
    assert model_identity(again) == identity
    # The layers and k are part of it, and so are the transformer's weights, not its name.
    for name, value in (("layers", [0, 1]), ("k", 3)):
        changed = golden_source().model
        setattr(changed, name, value)
        assert model_identity(changed) != identity, name
    renamed = golden_source().model
    renamed.model_name = "another/name-for-the-same-model"
    assert model_identity(renamed) == identity
    retuned = golden_source().model
    with torch.no_grad():
        next(iter(retuned.transformer.model.parameters()))[0, 0] += 1
    assert model_identity(retuned) != identity


def test_model_identity_hashes_every_weight_byte(golden_model):
    # Independently: the SHA-256 over the same header and the raw bytes of each parameter.
    digest = hashlib.sha256()
    header = {"layers": list(golden_model.layers), "k": golden_model.k}
    digest.update(json.dumps(header).encode())
    for name, parameter in sorted(golden_model.transformer.model.named_parameters()):
        meta = {"name": f"transformer.{name}", "dtype": str(parameter.dtype)}
        meta["shape"] = list(parameter.shape)
        digest.update(json.dumps(meta).encode())
        raw = parameter.detach().numpy().tobytes()
        digest.update(raw if len(raw) <= 8192 else raw[:4096] + raw[-4096:])
    for name, parameter in sorted(golden_model.autoencoder.named_parameters()):
        meta = {"name": f"autoencoder.{name}", "dtype": str(parameter.dtype)}
        meta["shape"] = list(parameter.shape)
        digest.update(json.dumps(meta).encode())
        digest.update(parameter.detach().numpy().tobytes())
    assert model_identity(golden_model) == digest.hexdigest()


def test_examples_record_their_model_and_refuse_another(
    tmp_path, capsys, golden_model, other_model
):
    with main([*COMMON, "--n_examples=2", "--n_tokens=1", f"--output_dir={tmp_path}"]) as saved:
        path = saved.path
        assert saved.origin() == OutputOrigin(model_identity(golden_model), str(GOLDEN_MODEL))
    assert "Replaced" not in capsys.readouterr().out

    with Examples(str(GOLDEN_MODEL), str(tmp_path), model=golden_model) as opened:
        assert len(opened) > 0
    assert find_examples(str(GOLDEN_MODEL), None, str(tmp_path), model=golden_model).path == path
    rerun = f"run `python -m mlsae.analysis.examples --repo_id {GOLDEN_MODEL}` to rebuild it"
    with pytest.raises(OutputOfAnotherModelError, match="another model") as refused:
        Examples(str(GOLDEN_MODEL), str(tmp_path), model=other_model)
    assert str(refused.value).endswith(rerun) and "\n" not in str(refused.value)
    with pytest.raises(OutputOfAnotherModelError, match="another model"):
        find_examples(str(GOLDEN_MODEL), None, str(tmp_path), model=other_model)
    with pytest.raises(OutputOfAnotherModelError, match="python -m mlsae.analysis.examples"):
        find_examples(
            str(GOLDEN_MODEL), str(path), str(tmp_path), model=model_identity(other_model)
        )
    # Without a model, nothing is checked (as before).
    assert find_examples(str(GOLDEN_MODEL), None, str(tmp_path)).path == path

    # The command replaces another model's database, saying so.
    write_db([EXAMPLE], path, origin=OutputOrigin(model_identity(other_model), "elsewhere"))
    with main([*COMMON, "--n_examples=2", "--n_tokens=1", f"--output_dir={tmp_path}"]) as e:
        assert e.origin().model == model_identity(golden_model)
    (note,) = [line for line in capsys.readouterr().out.splitlines() if "Replaced" in line]
    assert note.startswith(f"Replaced {path}, an output of another model (written by elsewhere")


def test_older_databases_are_accepted_with_a_warning(tmp_path, caplog, golden_model):
    path = write_db([EXAMPLE], tmp_path / "mlsae-tfm-trained-examples.db")
    assert Examples(path).origin() is None
    with caplog.at_level(logging.WARNING, logger="mlsae.analysis.identity"):
        reader = find_examples(str(GOLDEN_MODEL), None, str(tmp_path), model=golden_model)
    assert reader.path == path
    assert "records no model" in caplog.text and "mlsae.analysis.examples" in caplog.text


def test_imported_examples_are_accepted_for_their_model_id(tmp_path, monkeypatch, golden_model):
    rows = datasets.load_dataset(
        "json", data_files=str(GOLDENS / "examples_rows.jsonl"), split="train"
    )
    asked = []

    def fake_hub(dataset_id, split):
        asked.append(dataset_id)
        return rows

    monkeypatch.setattr(examples_db.datasets, "load_dataset", fake_hub)
    repo_id = "someone/mlsae-model-tfm"
    with Examples(repo_id, str(tmp_path), model=golden_model) as imported:
        assert asked == ["someone/mlsae-model-examples"]
        assert imported.origin() == OutputOrigin(imported_from="someone/mlsae-model-examples")
        assert imported.path == tmp_path / "someone-mlsae-model-examples.db"
        cache = imported.path
    # Opened again for the same id: accepted without a new import.
    with Examples(repo_id, str(tmp_path), model=golden_model) as again:
        assert len(again) == len(rows) and asked == ["someone/mlsae-model-examples"]
    # The same file as the cache of a model of another id is refused.
    os.replace(cache, tmp_path / "mlsae-tfm-trained-examples.db")
    with pytest.raises(OutputOfAnotherModelError, match="imported from someone/mlsae-model"):
        Examples(str(GOLDEN_MODEL), str(tmp_path), model=golden_model)


def test_dists_record_their_model_and_refuse_another(tmp_path, capsys, golden_model, other_model):
    args = [*COMMON, f"--output_dir={tmp_path}"]
    dists = dists_module.main(args)
    path = tmp_path / "mlsae-tfm-trained-dists.safetensors"
    with safe_open(path, "pt") as file:
        metadata = file.metadata()
    assert metadata["mlsae.model"] == model_identity(golden_model)
    assert metadata["mlsae.repo_id"] == str(GOLDEN_MODEL)
    loaded = Dists.load(str(GOLDEN_MODEL), output_dir=tmp_path, model=golden_model)
    assert torch.equal(loaded.counts, dists.counts)
    with pytest.raises(OutputOfAnotherModelError, match="python -m mlsae.analysis.dists"):
        Dists.load(str(GOLDEN_MODEL), output_dir=tmp_path, model=other_model)
    with pytest.raises(OutputOfAnotherModelError):
        Dists.load(path, model=model_identity(other_model))
    assert torch.equal(Dists.load(str(GOLDEN_MODEL), output_dir=tmp_path).counts, dists.counts)

    dists.save(path, OutputOrigin(model_identity(other_model), "elsewhere"))
    capsys.readouterr()
    dists_module.main(args)
    assert "Replaced" in capsys.readouterr().out
    assert Dists.load(str(GOLDEN_MODEL), output_dir=tmp_path, model=golden_model)

    dists.save(path)  # as written before outputs recorded their model
    assert Dists.load(str(GOLDEN_MODEL), output_dir=tmp_path, model=golden_model)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_examples_write_on_a_full_disk_leaves_nothing_behind(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    path = out / "model-examples.db"
    write_db([EXAMPLE], path)
    before = path.read_bytes()
    (out / "model-examples.db.partial").write_bytes(b"left by a killed run")
    (out / ".model-examples.db.partial").write_bytes(b"left by a killed run")

    monkeypatch.setattr(examples_db, "insert_examples", disk_full)
    with pytest.raises(DiskFullError) as error:
        write_db([EXAMPLE, EXAMPLE], path)
    message = str(error.value)
    assert str(out) in message and "no space left" in message and "\n" not in message
    assert files_in(out) == ["model-examples.db"] and path.read_bytes() == before
    monkeypatch.undo()

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", disk_full)
        with pytest.raises(DiskFullError):
            write_db([EXAMPLE], path)
    assert files_in(out) == ["model-examples.db"] and path.read_bytes() == before

    # SQLite reports a full disk as its own error: a database capped at a few pages.
    def capped(partial):
        connection = create_db(partial)
        connection.execute("PRAGMA max_page_count = 4")
        return connection

    create_db = examples_db.create_db
    monkeypatch.setattr(examples_db, "create_db", capped)
    with pytest.raises(DiskFullError, match="no space left"):
        write_db([EXAMPLE] * 5000, path)
    assert files_in(out) == ["model-examples.db"] and path.read_bytes() == before


def test_the_command_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    for module in ("mlsae.analysis.examples", "mlsae.analysis.dists"):
        argv = [module, *COMMON, f"--output_dir={out}"]
        with monkeypatch.context() as patch:
            patch.setattr(sys, "argv", argv)
            patch.setattr(os, "replace", disk_full)
            patch.delitem(sys.modules, module)
            with pytest.raises(SystemExit) as exit_info:
                runpy.run_module(module, run_name="__main__")
        assert exit_info.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
        assert line.startswith(f"error: no space left on the disk of {out} while writing")
        assert files_in(out) == []


def test_every_output_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    accumulator = DistsAccumulator(2, 4)
    accumulator.update(random_latents(2, 1, 3, 4, 2, torch.Generator().manual_seed(0)))
    rows = [{"layer": 0, "value": 1.0}]
    writers = {
        "dists.safetensors": lambda path: accumulator.dists().save(path),
        "layer-std.csv": lambda path: write_layer_std_csv([], path),
        "variances.csv": lambda path: write_csv(rows, path),
        "geometry.csv": lambda path: write_rows([], path),
    }
    for name, write in writers.items():
        write(tmp_path / name)
    before = {name: (tmp_path / name).read_bytes() for name in writers}
    monkeypatch.setattr(os, "replace", disk_full)
    for name, write in writers.items():
        with pytest.raises(DiskFullError, match=f"no space left on the disk of {tmp_path}"):
            write(tmp_path / name)
    assert files_in(tmp_path) == sorted(writers)
    assert {name: (tmp_path / name).read_bytes() for name in writers} == before


def test_analysis_loaders_pass_skip_bad_documents(tmp_path):
    lines = [json.dumps({"text": f"a fox number {i} " * 20}) for i in range(40)]
    lines[3] = '{"text": null}'
    (tmp_path / "docs.jsonl").write_text("\n".join(lines))
    config = DataConfig(path=str(tmp_path / "docs.jsonl"), max_length=8, batch_size=2)
    config.skip_bad_documents = True
    loader = held_out_stream(config, golden_tokenizer())
    assert loader.dataset.skip_bad_documents
    assert len(list(loader)) > 0 and loader.dataset.skipped_documents == 1


def test_help_lists_skip_bad_documents(capsys):
    with pytest.raises(SystemExit):
        dists_module.main(["--help"])
    assert "--skip_bad_documents" in capsys.readouterr().out
