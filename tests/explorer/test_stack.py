"""The explorer on a stack of per-layer SAEs: each layer shows its own SAE's latents, and
reconstructions and steering replace that SAE's site, checked against the SAEs' formulas
and the model run by hand."""

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from mlsae.analysis import examples as examples_command
from mlsae.analysis.identity import OutputOfAnotherModelError
from mlsae.analysis.source import StackSource, load_stack_source
from mlsae.cli import run_command
from mlsae.explorer import __main__ as explorer_command
from mlsae.explorer import create_app
from tests.analysis import CORPUS
from tests.explorer.conftest import PROMPT, local_client
from tests.saes.stack_files import GPT_NEOX, block_outputs, encode_by_hand, write_stack

WIDTHS = [64, 96, 48, 80]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> tuple[Path, list[dict], StackSource]:
    root = tmp_path_factory.mktemp("stack") / "saes"
    saes = write_stack(root, [0, 1, 2, 3], 48, WIDTHS)
    return root, saes, load_stack_source(str(root / "layer_{layer}"), str(GPT_NEOX), device="cpu")


@pytest.fixture(scope="module")
def client(stack) -> TestClient:
    return local_client(create_app(stack[2], repo_id="saes/layer_{layer}"))


def post(client: TestClient, path: str, **body) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def prompt_tokens(source: StackSource) -> torch.Tensor:
    return torch.tensor([source.tokenizer(PROMPT)["input_ids"]])


def test_params_describe_the_stack(client):
    params = client.get("/api/params").json()
    assert (params["n_layers"], params["blocks"], params["n_latents"]) == (4, [0, 1, 2, 3], 96)
    assert params["hparams"]["d_sae"] == WIDTHS
    assert params["hparams"]["sites"] == ["resid_post"] * 4
    assert client.get("/api/py/params").json()["layers"] == [0, 1, 2, 3]


def test_each_layer_shows_its_own_saes_latents(client, stack):
    _, saes, source = stack
    tokens = prompt_tokens(source)
    outputs, _ = block_outputs(GPT_NEOX, tokens)
    top = post(client, "/api/activations", prompt=PROMPT)["top"]
    special = (tokens[0] == 0).tolist()
    for layer, (x, tensors) in enumerate(zip(outputs, saes, strict=True)):
        acts = encode_by_hand(tensors, x[0])
        for pos, shown in enumerate(top[layer]):
            expected = (
                {}
                if special[pos]
                else {i: float(acts[pos, i]) for i in acts[pos].nonzero().flatten().tolist()}
            )
            assert {row["latent"]: pytest.approx(row["act"], rel=1e-5) for row in shown} == {
                latent: pytest.approx(act, rel=1e-5) for latent, act in expected.items()
            }
            assert [row["act"] for row in shown] == sorted((r["act"] for r in shown), reverse=True)
    assert any(top[3][pos] for pos in range(len(special)))  # the widest latents show too


def test_metrics_count_each_saes_nonzero_latents(client, stack):
    _, saes, source = stack
    tokens = prompt_tokens(source)
    outputs, _ = block_outputs(GPT_NEOX, tokens)
    counted = tokens[0] != 0
    metrics = post(client, "/api/metrics", prompt=PROMPT)
    assert metrics["n_tokens"] == int(counted.sum())
    for row, x, tensors in zip(metrics["layers"], outputs, saes, strict=True):
        l0 = (encode_by_hand(tensors, x[0])[counted] > 0).sum(-1).float().mean()
        assert row["l0"] == pytest.approx(float(l0))
        assert row["fvu"] > 0 and row["kl_div"] > 0 and row["loss"] is not None
    training = post(client, "/api/py/prompt/metrics", prompt=PROMPT)
    assert training["train/l0/layer_1"] == pytest.approx(metrics["layers"][1]["l0"])


def test_reconstruction_and_steering_replace_the_saes_site(client, stack):
    _, saes, source = stack
    tokens = prompt_tokens(source)
    outputs, _ = block_outputs(GPT_NEOX, tokens)
    counted = (tokens[0] != 0)[None, :, None]
    tensors = saes[2]
    recon = encode_by_hand(tensors, outputs[2]) @ tensors["W_dec"] + tensors["b_dec"]
    _, logits = block_outputs(GPT_NEOX, tokens, {2: torch.where(counted, recon, outputs[2])})
    body = post(client, "/api/logits/reconstruction", prompt=PROMPT, layer=2, top_n=1)
    shown = torch.tensor([row[0]["logit"] for row in body["top"]])
    torch.testing.assert_close(shown, logits[0].max(-1).values, rtol=1e-4, atol=1e-4)

    steered = outputs[1].clone()
    steered[0, 3] += 5.0 * saes[1]["W_dec"][7]
    _, logits = block_outputs(GPT_NEOX, tokens, {1: steered})
    body = post(
        client, "/api/logits/steering", prompt=PROMPT, latent=7, layer=1, factor=5.0,
        positions=[3], top_n=1,
    )  # fmt: skip
    shown = torch.tensor([row[0]["logit"] for row in body["top"]])
    torch.testing.assert_close(shown, logits[0].max(-1).values, rtol=1e-4, atol=1e-4)
    assert body["kl_div"][:3] == [0.0, 0.0, 0.0] and body["kl_div"][3] > 0


def test_a_latent_beyond_a_layers_width_is_refused(client):
    response = client.post(
        "/api/logits/steering", json={"prompt": PROMPT, "latent": 60, "layer": 2}
    )
    assert response.status_code == 422
    assert response.json()["detail"] == "latent must be in [0, 48) at layer 2, not 60"


def test_the_command_finds_the_stacks_own_examples(stack, tmp_path, monkeypatch):
    root, _, _ = stack
    monkeypatch.chdir(tmp_path)
    pattern = str(root / "layer_{layer}")
    args = ["--sae", pattern, "--model_name", str(GPT_NEOX), "--device", "cpu"]
    _, none = explorer_command.load_stack(explorer_command.parse_args(args))
    assert none is None
    examples_command.main(
        [*args, "--path", str(CORPUS), "--max_length", "32", "--batch_size", "2",
         "--max_tokens", "64", "--n_examples", "2"]
    )  # fmt: skip
    _, found = explorer_command.load_stack(explorer_command.parse_args(args))
    assert found is not None and found.path.name == "saes-layer_L-stack-examples.db"

    write_stack(tmp_path / "other" / "saes", [0], 48, [8])  # the same name, other SAEs
    other = ["--sae", str(tmp_path / "other" / "saes" / "layer_{layer}"), *args[2:]]
    with pytest.raises(OutputOfAnotherModelError, match="saes-layer_L-stack-examples.db holds"):
        explorer_command.load_stack(explorer_command.parse_args(other))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sae", "x_{layer}"], "--sae needs --model_name"),
        (["--sae", "x", "--repo_id", "y", "--model_name", "m"], "pass one of them"),
        ([], "pass --repo_id (a pretrained MLSAE) or --sae (per-layer SAEs)"),
        (["--repo_id", "y", "--layers", "1"], "--layers expands a --sae pattern"),
    ],
)
def test_options_that_cannot_go_together_are_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: explorer_command.main(args))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
