"""Training through a Lightning Trainer on the tiny golden model and corpus."""

import subprocess
import sys
import textwrap

import pytest
import torch
from lightning.pytorch import Trainer
from safetensors.torch import load_file

from mlsae.lm.data import token_loader
from mlsae.model.data import get_train_dataloader
from mlsae.model.lightning import MLSAETransformer
from tests.goldens import GOLDENS

TINY_NEOX = str(GOLDENS / "tiny-gpt-neox-2")
CORPUS = str(GOLDENS / "corpus.jsonl.zst")
VAL_BLOCKS = 32


def make_model(**overrides) -> MLSAETransformer:
    kwargs = dict(
        model_name=TINY_NEOX,
        expansion_factor=4,
        k=6,
        auxk=16,
        dead_tokens_threshold=512,
        lr=2e-3,
        max_length=32,
        batch_size=4,
        accumulate_grad_batches=1,
    )
    return MLSAETransformer(**{**kwargs, **overrides})


def loaders(model: MLSAETransformer, steps: int):
    tokenizer = model.transformer.tokenizer
    train = get_train_dataloader(
        CORPUS, tokenizer, 32, 4, max_tokens=steps * 4 * 32, val_blocks=VAL_BLOCKS, split="test"
    )
    val = token_loader(CORPUS, tokenizer, 32, 4, stop_block=VAL_BLOCKS, split="test")
    return train, val


def held_out_fvu(model: MLSAETransformer, val) -> float:
    values = [model._evaluate(batch)["train/fvu/avg"] for batch in val]
    return torch.stack(values).mean().item()


def trainer(steps: int, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kwargs,
    )


def test_training_halves_held_out_fvu():
    torch.manual_seed(0)
    model = make_model(lr=1e-2)
    train, val = loaders(model, 60)
    model.bias_initialized = True  # measure the initial FVU with a zero bias first
    before = held_out_fvu(model, val)
    model.bias_initialized = False
    trainer(60).fit(model, train)
    after = held_out_fvu(model, val)
    assert model.bias_initialized
    assert after <= 0.5 * before, (before, after)
    assert model.tokens_seen == 60 * 4 * 32
    norms = model.autoencoder.decoder.weight.norm(dim=0)
    assert (norms - 1).abs().max() < 1e-2


def test_dead_latents_advance_once_per_optimizer_step_in_tokens():
    model = make_model(accumulate_grad_batches=2, dead_tokens_threshold=10**9)
    train, _ = loaders(model, 6)
    batches = [batch["input_ids"] for batch in train]
    calls = []
    update = model.autoencoder.update_dead_latents

    def record(fired_counts, n_tokens):
        calls.append((fired_counts.clone(), int(n_tokens)))
        update(fired_counts, n_tokens)

    model.autoencoder.update_dead_latents = record
    trainer(3, accumulate_grad_batches=2).fit(model, train)
    assert len(calls) == 3
    special = model.transformer.special_token_ids
    for step, (fired, n_tokens) in enumerate(calls):
        step_tokens = torch.cat(batches[2 * step : 2 * step + 2])
        assert n_tokens == (~torch.isin(step_tokens, torch.tensor(special))).sum().item()
        assert fired.sum() > 0 and fired.dtype == torch.long


def test_validation_does_not_touch_the_dead_latent_state():
    model = make_model()
    _, val = loaders(model, 1)
    before = model.autoencoder.tokens_since_fired.clone()
    Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=2
    ).validate(model, val, verbose=False)
    assert torch.equal(before, model.autoencoder.tokens_since_fired)


def test_trained_checkpoint_round_trips(tmp_path):
    model = make_model()
    train, _ = loaders(model, 5)
    trainer(5).fit(model, train)
    model.save_pretrained(tmp_path / "saved")
    loaded = MLSAETransformer.from_pretrained(tmp_path / "saved")
    assert loaded.bias_initialized
    tokens = next(iter(train))["input_ids"]
    with torch.no_grad():
        a, b = model(tokens), loaded(tokens)
    assert torch.equal(a.topk.indices, b.topk.indices)
    torch.testing.assert_close(a.recons, b.recons, rtol=0, atol=0)
    assert torch.equal(loaded.autoencoder.tokens_since_fired, model.autoencoder.tokens_since_fired)


def test_warmup_and_decay_schedule():
    model = make_model(lr=1.0, lr_warmup_steps=4, lr_decay_steps=4)
    train, _ = loaders(model, 10)
    lrs = []

    class Record(__import__("lightning").pytorch.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            lrs.append(optimizer.param_groups[0]["lr"])

    trainer(10, callbacks=[Record()]).fit(model, train)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:6] == pytest.approx([1.0, 1.0])
    assert lrs[6:] == pytest.approx([1.0, 0.75, 0.5, 0.25])


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from lightning.pytorch import Trainer
    from safetensors.torch import save_file
    sys.path.insert(0, {root!r})
    from tests.model.test_training import make_model, loaders

    torch.manual_seed(0)
    model = make_model(dead_tokens_threshold=256)
    train, _ = loaders(model, 8)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, max_epochs=1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, train)
    state = {{k: v.contiguous() for k, v in model.autoencoder.state_dict().items()}}
    save_file(state, {out!r} + f"/rank{{trainer.global_rank}}.safetensors")
    """
)


def test_ddp_ranks_agree(tmp_path):
    root = str(GOLDENS.parent.parent.parent)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=root, out=str(tmp_path)))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = load_file(tmp_path / "rank0.safetensors")
    rank1 = load_file(tmp_path / "rank1.safetensors")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert rank0["tokens_since_fired"].max() > 0

    # The same micro-batches in one process, with twice the gradient accumulation.
    torch.manual_seed(0)
    model = make_model(dead_tokens_threshold=256, accumulate_grad_batches=2)
    train, _ = loaders(model, 8)
    trainer(4, accumulate_grad_batches=2).fit(model, train)
    single = model.autoencoder.state_dict()
    for name, value in rank0.items():
        torch.testing.assert_close(single[name], value, rtol=1e-4, atol=1e-6, msg=name)
