"""LoRA fine-tuning throughput of a decoder-only embedder of realistic width (check 6 of the
big-families training issue): tokens/s and peak GPU memory of ``finetune_embedder`` in bf16.

The model is a random-weight Mistral with bge-en-icl's / Mistral-7B's width (hidden 4096, MLP
14336, 32 query and 8 key/value heads) and ``--layers`` of its 32 layers; speed per layer does not
depend on the weight values. Its tokenizer is the golden tiny Mistral's (``--golden``). Training
groups come from SciFact: a 12-word query cut from each document, the document as positive, the
next documents as negatives.

    python benchmarks/lora_train.py --golden .gpu/golden --scifact .gpu/data/scifact/corpus.jsonl.gz \\
        --layers 8 --steps 200 --json lora.json

Tokens/s counts real (unpadded) query and passage tokens, as the Trainer's logs report them
(``tokens_per_second``), averaged over the logged windows after the first.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from speed import MISTRAL_7B_WIDTH  # this folder is on sys.path when the script runs

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_model(folder: Path, golden: Path, layers: int) -> int:
    """Save a random bf16 Mistral of 7B width with ``layers`` layers; returns its parameter count."""
    from transformers import AutoTokenizer, MistralConfig, MistralModel

    folder.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        shutil.copy(golden / "models" / "mistral-llm" / name, folder / name)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    config = MistralConfig(
        **MISTRAL_7B_WIDTH,
        num_hidden_layers=layers,
        vocab_size=32000,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds, not minutes
        model = MistralModel(config).to(torch.bfloat16)
    model.save_pretrained(str(folder))
    count = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return count


def write_groups(scifact: Path, target: Path, n: int, negatives: int) -> None:
    docs = []
    with gzip.open(scifact, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            text = " ".join(f"{record.get('title', '')}. {record.get('text', '')}".split())
            if len(text.split()) > 20:
                docs.append(text)
            if len(docs) >= n + negatives:
                break
    with target.open("w", encoding="utf-8") as out:
        for i in range(n):
            group = {"query": " ".join(docs[i].split()[:12]), "pos": [docs[i]], "neg": docs[i + 1 : i + 1 + negatives]}
            out.write(json.dumps(group) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--golden", type=Path, default=ROOT.parent / "shared" / "golden")
    parser.add_argument("--scifact", type=Path, default=ROOT.parent / "shared" / "data" / "scifact" / "corpus.jsonl.gz")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8, help="queries per step")
    parser.add_argument("--group-size", type=int, default=4, help="passages per query (1 positive + negatives)")
    parser.add_argument("--passage-max-len", type=int, default=256)
    parser.add_argument("--query-max-len", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from bgekit.train.embedder import EmbedderOptions, finetune_embedder

    cuda = torch.cuda.is_available()
    bf16 = cuda if args.bf16 is None else args.bf16
    work = Path(tempfile.mkdtemp(prefix="bgekit-lora-"))
    parameters = build_model(work / "model", args.golden, args.layers)
    data = work / "train.jsonl"
    write_groups(args.scifact, data, args.steps * args.batch_size, args.group_size - 1)
    options = EmbedderOptions(
        output_dir=str(work / "out"),
        model_name_or_path=str(work / "model"),
        model_class="decoder-only-base",
        train_data=[str(data)],
        use_lora=True,
        lora_rank=args.lora_rank,
        lora_alpha=2 * args.lora_rank,
        lora_dropout=0.05,
        bf16=bf16,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        train_group_size=args.group_size,
        query_max_len=args.query_max_len,
        passage_max_len=args.passage_max_len,
        learning_rate=1e-4,
        temperature=0.02,
        logging_steps=max(1, args.steps // 10),
        save_steps=args.steps,  # one checkpoint at the end: its trainer_state.json holds the logs
        gradient_checkpointing=args.gradient_checkpointing,
        query_instruction_for_retrieval="Given a scientific claim, retrieve documents that support it.",
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    finetune_embedder(options)
    total_s = time.perf_counter() - start
    state = json.loads((work / "out" / f"checkpoint-{args.steps}" / "trainer_state.json").read_text())
    logs = state["log_history"]
    rates = [entry["tokens_per_second"] for entry in logs if "tokens_per_second" in entry]
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    grad_norms = [entry.get("grad_norm") for entry in logs if "loss" in entry]
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__,
        "parameters": parameters,
        "layers": args.layers,
        "steps": args.steps,
        "batch": f"{args.batch_size} queries x {args.group_size} passages",
        "max_len": f"query {args.query_max_len}, passage {args.passage_max_len}",
        "lora_rank": args.lora_rank,
        "bf16": bf16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "tokens_per_second": round(sum(rates[1:]) / len(rates[1:]), 1) if len(rates) > 1 else None,
        "tokens_per_second_windows": rates,
        "losses": losses,
        "grad_norms": grad_norms,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "end_to_end_s_with_load_and_save": round(total_s, 1),
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
