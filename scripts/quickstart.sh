#!/usr/bin/env bash
# The quick start in one command, offline: install the library (with the CPU build of torch
# where there is no NVIDIA GPU), train an MLSAE on every layer of the small language model
# in quickstart/, evaluate it on held-out text, compute its latents' distributions over
# layers and draw them.
#
#   bash scripts/quickstart.sh [--no-install] [--tokens N] [--out DIR]
#                              [--architecture topk|batchtopk|matryoshka] [-- TRAIN_ARGS...]
#
# --no-install     use the Python environment as it is
# --tokens N       training tokens (default 131072: 128 optimizer steps of 1,024 tokens)
# --out DIR        where every output goes (default out)
# --architecture A the SAE's architecture (default topk; docs/variants.md)
# -- TRAIN_ARGS    everything after -- goes to train.py as it is, e.g.
#                  -- --matryoshka_widths 128 512
set -euo pipefail
cd "$(dirname "$0")/.."

install=1
tokens=131072
out=out
architecture=topk
train_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --no-install) install=0; shift ;;
        --tokens) tokens="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --architecture) architecture="$2"; shift 2 ;;
        --) shift; train_args=("$@"); break ;;
        *) echo "error: unknown option $1 (use --no-install, --tokens N, --out DIR," \
               "--architecture A or -- TRAIN_ARGS)" >&2; exit 2 ;;
    esac
done
eval_tokens=$(( tokens < 16384 ? tokens : 16384 ))
model="$out/runs/quickstart/model"
python=${PYTHON:-python}

if [ "$install" = 1 ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "Installing mlsae (a GPU is present: torch as pip resolves it)"
        "$python" -m pip install -q -e .
    else
        echo "Installing mlsae with the CPU build of torch (constraints/cpu.txt)"
        "$python" -m pip install -q -c constraints/cpu.txt -e .
    fi
fi

export HF_HUB_OFFLINE=1
data=(--path quickstart/data --max_length 128 --batch_size 8)

echo "== Training a $architecture MLSAE on quickstart/model ($tokens tokens)"
"$python" train.py --model_name quickstart/model "${data[@]}" --val_path quickstart/data \
    --accumulate_grad_batches 1 --max_tokens "$tokens" --expansion_factor 16 -k 16 \
    --auxk 64 --lr 1e-3 --dead_tokens_threshold 100000 --val_check_interval 64 \
    --limit_val_batches 8 --logger csv --run quickstart --run_dir "$out/runs" \
    --architecture "$architecture" ${train_args[@]+"${train_args[@]}"}

echo "== Evaluating it on the test split"
"$python" test.py --repo_id "$model" "${data[@]}" --split test --max_tokens "$eval_tokens" \
    --output_dir "$out"

echo "== Its latents' distributions over layers"
"$python" -m mlsae.analysis.dists --repo_id "$model" "${data[@]}" --split test \
    --max_tokens "$eval_tokens" --output_dir "$out"
"$python" -m figures.dists_heatmaps --repo_id "$model" --histogram \
    --analysis_dir "$out" --output_dir "$out/figures"

echo
echo "Outputs:"
echo "  the trained model      $model (MLSAETransformer.from_pretrained, or --repo_id)"
echo "  checkpoints and logs   $out/runs/quickstart/{checkpoints,logs}"
echo "  test metrics           $out/test_quickstart.csv"
echo "  latent distributions   $out/quickstart-dists.safetensors"
echo "  the figure             $out/figures/dists_heatmap_quickstart.png"
echo "Next: python -m mlsae.explorer --repo_id $model (docs/usage.md)"
