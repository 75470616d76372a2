"""`python test.py --sae`: a stack of per-layer SAEs evaluated end to end over every block of
the golden GPT-NeoX and of tiny Llamas, its CSV checked against the MLSAE's columns and
against the metrics computed by hand from the blocks' outputs read with plain hooks."""

import csv
import importlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mlsae.cli import DataConfig, run_command
from mlsae.lm.architecture import find_decoder_blocks
from mlsae.lm.data import held_out_stream
from mlsae.metrics import (
    LayerwiseDenseLatents,
    LayerwiseL0Norm,
    LayerwiseL1Norm,
    LayerwiseNeverFired,
)
from mlsae.model.metric_sets import COMPARISON_GROUPS
from mlsae.trainer.stack_eval import nonzero_latents
from tests.analysis import CORPUS, golden_tokenizer
from tests.goldens import GOLDENS
from tests.saes.stack_files import (
    GPT_NEOX,
    block_outputs,
    encode_by_hand,
    write_saelens,
    write_stack,
    write_tiny_llama,
)

test_command = importlib.import_module("mlsae.trainer.test")

BATCHES = 3
DATA = ["--path", str(CORPUS), "--max_length", "32", "--batch_size", "2", "--accelerator", "cpu",
        "--max_tokens", str(BATCHES * 64)]  # fmt: skip


def evaluate(model: Path, saes: list[str], output_dir: Path, *options: str) -> dict[str, float]:
    """`test.py --sae` over `model`; the CSV's one row, its columns in order."""
    args = ["--model_name", str(model), "--sae", *saes, "--output_dir", str(output_dir)]
    (written,) = test_command.main([*args, *DATA, *options])
    with open(written) as file:
        return {name: float(value) for name, value in next(csv.DictReader(file)).items()}


def batches() -> list[torch.Tensor]:
    data = DataConfig(
        path=str(CORPUS), split="test", max_length=32, batch_size=2, max_tokens=BATCHES * 64
    )
    return [batch["input_ids"] for batch in held_out_stream(data, golden_tokenizer())]


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, counted: torch.Tensor):
    losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none"
    )
    weights = counted[:, :-1].flatten().float()
    return float((losses * weights).sum() / weights.sum())


def write_exact(folder: Path, layer: int, d_in: int, hook: str | None = None) -> None:
    """An SAELens SAE that reconstructs exactly: `relu(x) - relu(-x)` over `2 * d_in`
    latents; `hook` replaces the hook name `write_saelens` gives."""
    write_saelens(folder, layer, d_in, 2 * d_in)
    eye = torch.eye(d_in)
    tensors = {"W_enc": torch.cat([eye, -eye], dim=1), "b_enc": torch.zeros(2 * d_in),
               "W_dec": torch.cat([eye, -eye]), "b_dec": torch.zeros(d_in)}  # fmt: skip
    save_file(tensors, folder / "sae_weights.safetensors")
    if hook is not None:
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg["metadata"]["hook_name"] = hook
        (folder / "cfg.json").write_text(json.dumps(cfg))


def expected_columns(layers: list[int]) -> list[str]:
    """The MLSAE's columns (the golden test CSV's, then the others), but its losses."""
    with open(GOLDENS / "test_output.csv") as file:
        original = next(csv.reader(file))
    labels = [*(f"layer_{layer}" for layer in layers), "avg"]
    columns = []
    for name in original:
        group, _, last = name.rpartition("/")
        if last == "layer_0":
            columns += [f"{group}/{label}" for label in labels]
        elif not (last.startswith("layer_") or last == "avg" or name.startswith("loss/")):
            columns.append(name)
    for group in ("train/l0", "val/logit/kldiv_per_token", *COMPARISON_GROUPS):
        columns += [f"{group}/{label}" for label in labels]
    return columns


@pytest.fixture(scope="module")
def neox(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("neox-saes")
    return root, write_stack(root, [0, 1, 2, 3], 48, [64, 96, 48, 80])


def test_a_gpt_neox_stack_matches_the_metrics_computed_by_hand(neox, tmp_path, capsys):
    root, saes = neox
    ours = evaluate(GPT_NEOX, [str(root / "layer_{layer}")], tmp_path)
    assert list(ours) == expected_columns([0, 1, 2, 3])
    assert (tmp_path / f"test_{root.name}-layer_L-stack.csv").is_file()
    assert "(train/fvu/avg)" in capsys.readouterr().out

    sums = {name: torch.zeros(4) for name in ("fvu", "l0", "l1", "delta")}
    fired = [torch.zeros(tensors["W_enc"].shape[1]) for tensors in saes]
    dead_share, positions = 0.0, 0
    for tokens in batches():
        counted = tokens != 0
        outputs, own = block_outputs(GPT_NEOX, tokens)
        dead = 0
        for layer, tensors in enumerate(saes):
            x = outputs[layer]
            acts = encode_by_hand(tensors, x)
            recons = acts @ tensors["W_dec"] + tensors["b_dec"]
            inputs, counted_acts = x[counted], acts[counted]
            sums["fvu"][layer] += ((recons[counted] - inputs) ** 2).mean() / inputs.var()
            sums["l0"][layer] += (counted_acts > 1e-3).sum(-1).float().mean()
            sums["l1"][layer] += counted_acts.sum(-1).mean()
            spliced = torch.where(counted[..., None], recons, x)
            logits = block_outputs(GPT_NEOX, tokens, {layer: spliced})[1]
            loss_pred, loss_true = (next_token_loss(z, tokens, counted) for z in (logits, own))
            sums["delta"][layer] += loss_pred - loss_true
            fires = (counted_acts > 0).sum(0)
            fired[layer] += fires
            dead += int((fires == 0).sum())
        dead_share += dead / sum(len(f) for f in fired)
        positions += int(counted.sum())
    n = len(batches())
    names = {"fvu": "train/fvu", "l0": "train/l0", "l1": "train/l1", "delta": "val/loss/delta"}
    for short, group in names.items():
        for layer in range(4):
            expected = float(sums[short][layer]) / n
            assert ours[f"{group}/layer_{layer}"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        average = float(sums[short].mean()) / n
        assert ours[f"{group}/avg"] == pytest.approx(average, rel=1e-4, abs=1e-6)
    assert ours["train/dead/rel"] == pytest.approx(dead_share / n)
    for layer, counts in enumerate(fired):
        never = float((counts == 0).float().mean())
        dense = float((counts / positions > 0.1).float().mean())
        assert ours[f"train/never_fired/layer_{layer}"] == pytest.approx(never)
        assert ours[f"train/dense/layer_{layer}"] == pytest.approx(dense)
    assert 0 < ours["train/dead/rel"] < 1 and 0 < ours["train/never_fired/avg"] < 1


def test_layers_pick_the_blocks_of_a_pattern(neox, tmp_path):
    root, _ = neox
    ours = evaluate(GPT_NEOX, [str(root / "layer_{layer}"), "--layers", "3", "1"], tmp_path)
    assert list(ours) == expected_columns([1, 3])


def test_padding_counts_as_no_latent():
    acts = torch.tensor([[[0.0, 2.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, -1.0, 0.0]]])
    latents = nonzero_latents(acts)
    assert latents.values.shape == (1, 3, 2)
    assert torch.equal(torch.zeros_like(acts).scatter(-1, latents.indices, latents.values), acts)
    padded = {"values": latents.values[None], "indices": latents.indices[None], "mask": None}
    assert float(LayerwiseL0Norm(1, 0.0)(**padded)) == pytest.approx(1.0)
    assert float(LayerwiseL1Norm(1)(**padded)) == pytest.approx(6.5 / 3)
    never = LayerwiseNeverFired(1, 4)
    never.update(**padded)
    assert float(never.compute()) == 0.25  # latent 2 is only below 0
    dense_latents = LayerwiseDenseLatents(1, 4, threshold=0.3)
    dense_latents.update(**padded)
    assert float(dense_latents.compute()) == 0.75


def test_a_llama_stack_that_reconstructs_exactly_loses_nothing(tmp_path):
    model = write_tiny_llama(tmp_path / "model")
    for layer in range(3):
        write_exact(tmp_path / "saes" / f"layer_{layer}", layer, 32)
    ours = evaluate(model, [str(tmp_path / "saes" / "layer_{layer}")], tmp_path)
    assert list(ours) == expected_columns([0, 1, 2])
    for layer in ["layer_0", "layer_1", "layer_2", "avg"]:
        assert ours[f"train/fvu/{layer}"] == 0.0
        assert ours[f"val/loss/delta/{layer}"] == 0.0
        assert ours[f"val/logit/kldiv/{layer}"] == 0.0
        assert ours[f"val/loss/recovered_zero/{layer}"] == 1.0
        assert ours[f"val/loss/recovered_mean/{layer}"] == 1.0
        assert ours[f"train/explained_variance/{layer}"] == 1.0


def test_saes_of_other_widths_and_sites_in_one_stack(tmp_path):
    """attn_z of a Llama whose heads are wider than its residual stream, beside
    resid_post and mlp_out SAEs."""
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=128, bos_token_id=0,
                         eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(str(GPT_NEOX)).save_pretrained(tmp_path / "model")
    saes = tmp_path / "saes"
    write_exact(saes / "resid", 0, 32)
    write_exact(saes / "heads", 1, 64, hook="blocks.1.attn.hook_z")
    write_saelens(saes / "mlp", 2, 32, 24, site="mlp_out")
    names = [str(saes / name) for name in ("mlp", "heads", "resid")]
    ours = evaluate(tmp_path / "model", names, tmp_path, "--count_special_tokens", "true")
    assert list(ours) == expected_columns([0, 1, 2])
    assert (tmp_path / "test_saes-mlp-stack.csv").is_file()
    for layer in ("layer_0", "layer_1"):
        assert ours[f"train/fvu/{layer}"] == 0.0 and ours[f"val/loss/delta/{layer}"] == 0.0
    assert ours["train/fvu/layer_2"] > 0.0 and ours["val/loss/delta/layer_2"] != 0.0
    assert ours["train/never_fired/layer_2"] < 1.0


def test_a_transcoder_is_measured_against_the_site_it_writes(tmp_path):
    folder = tmp_path / "transcoder"
    write_saelens(folder, 1, 48, 64)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(architecture="transcoder", d_out=48)
    cfg["metadata"].update(hook_name="blocks.1.ln2.hook_normalized",
                           hook_name_out="blocks.1.hook_mlp_out")  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    ours = evaluate(GPT_NEOX, [str(folder)], tmp_path)
    assert list(ours) == expected_columns([1])

    tensors = load_file(folder / "sae_weights.safetensors")
    hf = AutoModelForCausalLM.from_pretrained(str(GPT_NEOX)).eval()
    block = hf.get_submodule(find_decoder_blocks(hf, hf.config.num_hidden_layers))[1]
    read: dict[str, torch.Tensor] = {}
    replacement: dict[str, torch.Tensor] = {}

    def read_and_replace(module, args, output):
        read["in"], read["out"] = args[0], output
        return replacement.get("out")

    handle = block.mlp.register_forward_hook(read_and_replace)
    fvu, delta = 0.0, 0.0
    for tokens in batches():
        counted = tokens != 0
        replacement.clear()
        with torch.no_grad():
            own = hf(input_ids=tokens).logits
            acts = (read["in"] @ tensors["W_enc"] + tensors["b_enc"]).relu()
            prediction = acts @ tensors["W_dec"] + tensors["b_dec"]
            target = read["out"]
            replacement["out"] = torch.where(counted[..., None], prediction, target)
            spliced = hf(input_ids=tokens).logits
        fvu += float(((prediction - target)[counted] ** 2).mean() / target[counted].var())
        delta += next_token_loss(spliced, tokens, counted) - next_token_loss(own, tokens, counted)
    handle.remove()
    n = len(batches())
    assert ours["train/fvu/layer_1"] == pytest.approx(fvu / n, rel=1e-4)
    assert ours["val/loss/delta/layer_1"] == pytest.approx(delta / n, rel=1e-4, abs=1e-6)


def error_line(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: test_command.main(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    return errors[0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--sae", "saes/layer_{layer}"], "--sae needs one --model_name"),
        (["--sae", "s", "--model_name", "a", "b"], "--sae needs one --model_name"),
        (["--sae", "s", "--model_name", "a", "--repo_id", "r"], "pass one of them"),
        (["--sae", "s", "--model_name", "a", "--tuned_lens", "true"], "--tuned_lens applies"),
        (["--sae", "s", "--model_name", "a", "--precision", "32"], "leave --precision out"),
        (["--layers", "0", "1"], "--layers expands a --sae pattern"),
    ],
)
def test_options_that_cannot_go_with_a_stack(capsys, options, message):
    assert message in error_line(capsys, [*options, *DATA])


def test_stacks_that_test_py_refuses(capsys, neox, tmp_path):
    root, _ = neox
    write_saelens(tmp_path / "attn", 0, 48, 16, site="attn_out")
    two_sites = ["--sae", str(root / "layer_0"), str(tmp_path / "attn")]
    line = error_line(capsys, ["--model_name", str(GPT_NEOX), *two_sites, *DATA])
    assert "both read block 0" in line and "one SAE per block" in line
    write_saelens(tmp_path / "narrow", 0, 32, 16)
    narrow = ["--sae", str(tmp_path / "narrow")]
    line = error_line(capsys, ["--model_name", str(GPT_NEOX), *narrow, *DATA])
    assert "encodes vectors of width 32" in line
