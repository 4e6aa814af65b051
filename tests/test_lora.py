"""LLM reranker with a LoRA adapter folder (``peft_path``): merged at load, clear error on a mismatch."""

from __future__ import annotations

import shutil

import pytest
import torch

from bgekit import FlagLLMReranker, ModelNotFoundError

PAIRS = [("what is a panda?", "The giant panda is a bear."), ("capital of France", "Paris is in France.")]


def make_adapter(base_dir, out_dir, target_modules) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(str(out_dir))


def test_adapter_is_merged(tmp_path, golden_dir):
    base = golden_dir / "models" / "gemma-llm-reranker"
    make_adapter(base, tmp_path / "adapter", ["q_proj", "v_proj"])
    plain = FlagLLMReranker(str(base), devices="cpu").compute_score(PAIRS)
    tuned = FlagLLMReranker(str(base), devices="cpu", peft_path=str(tmp_path / "adapter")).compute_score(PAIRS)

    import peft
    from transformers import AutoModelForCausalLM

    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(tmp_path / "adapter"))
    merged.merge_and_unload().save_pretrained(str(tmp_path / "merged"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(base / name, tmp_path / "merged" / name)
    reference = FlagLLMReranker(str(tmp_path / "merged"), devices="cpu").compute_score(PAIRS)
    assert tuned == pytest.approx(reference, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(tuned, plain, strict=True)) > 1e-4, "the adapter must change the scores"


def test_mismatched_adapter_is_a_clear_error(tmp_path, golden_dir):
    make_adapter(golden_dir / "models" / "gemma-llm-reranker", tmp_path / "adapter", ["q_proj"])
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace('"q_proj"', '"no_such_module"'))
    with pytest.raises(ModelNotFoundError, match="does not fit this model"):
        FlagLLMReranker(str(golden_dir / "models" / "gemma-llm-reranker"), peft_path=str(tmp_path / "adapter"))
    with pytest.raises(ModelNotFoundError, match="not a LoRA adapter folder"):
        FlagLLMReranker(str(golden_dir / "models" / "gemma-llm-reranker"), peft_path=str(tmp_path))
