"""Held-out metrics as people read them: plain names, the logged column beside each."""

PLAIN_NAMES = (
    ("fvu/avg", "FVU (fraction of variance unexplained)"),
    ("mse/avg", "MSE"),
    ("l0/avg", "L0 (latents above the firing threshold per token)"),
    ("l1/avg", "L1 (sum of activations per token)"),
    ("loss/delta/avg", "CE loss increase with the reconstruction spliced in (nats)"),
    ("logit/kldiv_per_token/avg", "KL divergence per token, spliced (nats)"),
    ("logit/kldiv/avg", "KL divergence per sequence, spliced (nats)"),
    ("logit/mse/avg", "logit MSE, spliced"),
    ("dead/rel", "dead latents (share)"),
    ("explained_variance/avg", "explained variance (SAELens)"),
    ("explained_variance_legacy/avg", "explained variance per token (SAEBench)"),
    ("loss/recovered_zero/avg", "CE loss recovered vs zero-ablation (SAELens)"),
    ("loss/recovered_mean/avg", "CE loss recovered vs mean-ablation"),
    ("never_fired/avg", "latents that never fired at a layer (share)"),
    ("dense/avg", "dense latents, firing on over 10% of tokens (share)"),
)
"""The metrics a summary shows, by the end of their logged name, in this order."""


def summary_lines(metrics: dict[str, float]) -> list[str]:
    """One line per known metric: its plain name, value and logged column (`train/...` on
    the test split, `val/...` after training), each averaged over layers."""
    rows = []
    for suffix, plain in PLAIN_NAMES:
        for name, value in metrics.items():
            if name.split("/", 1)[-1] == suffix:
                rows.append((plain, f"{float(value):.4g}", name))
    width = max((len(plain) for plain, _, _ in rows), default=0)
    return [f"  {plain:<{width}}  {value:>9}  ({name})" for plain, value, name in rows]


def print_summary(title: str, metrics: dict[str, float]) -> None:
    """`title`, then `summary_lines`; nothing when no known metric was logged."""
    lines = summary_lines(metrics)
    if lines:
        print(title)
        print("\n".join(lines))
