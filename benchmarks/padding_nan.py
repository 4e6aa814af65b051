"""Why decoder training pads on the right: gradients through left-padded causal attention.

A left pad position under causal attention has no key it may attend to. On an H200 a bf16 LoRA
run of a 7B-width Mistral embedder padded on the left had NaN gradient norms from its first step,
and padded on the right trained (benchmarks/RESULTS.md). This probe runs one forward and backward
pass of a small random Mistral on a left- and a right-padded batch, for each attention
implementation and dtype, and prints whether the input embeddings' gradient holds NaN and how far
the last-token vectors are from the right-padded ones. At this size (2 layers, head dim 32) it
found no NaN on the H200 either, so the trigger needs more of the real run (head dim 128, long
rows, autocast over an fp32 adapter): ``--hidden``/``--heads``/``--length`` let the next GPU run
narrow it down.

    python benchmarks/padding_nan.py            # CUDA if there is one, else CPU
"""

from __future__ import annotations

import argparse

import torch
from transformers import MistralConfig, MistralModel


def run(model: MistralModel, ids: torch.Tensor, mask: torch.Tensor, left: bool) -> tuple[bool, torch.Tensor]:
    model.zero_grad()
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    last = hidden[:, -1] if left else hidden[torch.arange(len(ids)), mask.sum(1) - 1]
    last.float().pow(2).sum().backward()
    grad = model.embed_tokens.weight.grad
    return bool(torch.isnan(grad).any()), last.detach().float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--length", type=int, default=12, help="longest row; others are shorter")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = MistralConfig(
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 4),
    )
    n = args.length
    lengths = [n, max(1, n * 5 // 12), max(1, n * 3 // 4), max(1, n // 4)]
    width = max(lengths)
    rows = [torch.randint(3, 1000, (n,)) for n in lengths]
    right_ids = torch.zeros(len(rows), width, dtype=torch.long)
    right_mask = torch.zeros_like(right_ids)
    left_ids, left_mask = right_ids.clone(), right_mask.clone()
    for i, row in enumerate(rows):
        right_ids[i, : len(row)], right_mask[i, : len(row)] = row, 1
        left_ids[i, width - len(row) :], left_mask[i, width - len(row) :] = row, 1
    print(f"device {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("| attention | dtype | padding | NaN in gradient | max |last-token diff| to right padding |")
    print("|---|---|---|---|---:|")
    for attention in ("sdpa", "eager"):
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            model = MistralModel(config).to(device=device, dtype=dtype)
            model.config._attn_implementation = attention
            nan_r, ref = run(model, right_ids.to(device), right_mask.to(device), left=False)
            nan_l, out = run(model, left_ids.to(device), left_mask.to(device), left=True)
            diff = float((out - ref).abs().max())
            name = str(dtype).removeprefix("torch.")
            print(f"| {attention} | {name} | right | {nan_r} | |")
            print(f"| {attention} | {name} | left | {nan_l} | {diff:.2e} |")


if __name__ == "__main__":
    main()
