"""Retrieval-oriented pre-training, RetroMAE style, on the shared Trainer.

The encoder reads a lightly masked text (``encoder_mlm_probability`` ~0.3) and learns masked
language modelling; a one-layer decoder must then rebuild the *whole* text from the sentence
(CLS) embedding alone plus a heavily masked view of it (``decoder_mlm_probability`` ~0.5).
That is RetroMAE's enhanced decoding: the decoder's queries are the CLS embedding plus each
position's embedding, its keys and values are the CLS embedding and the token embeddings, and
every position sees its own random ~50% of the others (never itself). The hard reconstruction
task pushes the meaning of the text into the CLS vector, which is what a dense retriever uses.

The saved folder is the encoder with its MLM head (``AutoModel`` loads the encoder from it, and
``bgekit finetune embedder`` starts from it) plus ``retromae_decoder.safetensors``, so a later
``bgekit pretrain`` can go on from it.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import hub, io
from ..errors import InputError
from ..models.tokenization import TextTokenizer, load_hf_tokenizer
from .trainer import (
    BgekitTrainer,
    EpochCallback,
    LossPartsLogging,
    OwnFolderLayout,
    ThroughputCallback,
    TrainOptions,
    fit_lengths,
    resolve_resume,
    with_current_names,
)

logger = logging.getLogger(__name__)

DECODER_FILE = "retromae_decoder.safetensors"


@dataclass
class PretrainOptions(TrainOptions):
    """What to pre-train and how; see ``bgekit pretrain --help`` (RetroMAE's defaults)."""

    model_name_or_path: str = ""
    train_data: list[str] = field(default_factory=list)
    max_seq_length: int = 256
    encoder_mlm_probability: float = 0.3
    decoder_mlm_probability: float = 0.5
    learning_rate: float = 1e-4
    per_device_train_batch_size: int = 16
    resume_from_checkpoint: str | None = None


def read_corpus(paths: list[str]) -> list[str]:
    """Texts of text / JSONL files (``text``, with ``title`` prepended when present, as BEIR corpora),
    or of BEIR-layout folders' ``corpus.jsonl`` (also gzipped)."""
    if not paths:
        raise InputError("give at least one --train-data file")
    texts = [r.text for path in paths for r in io.read_texts(_corpus_file(Path(path))) if r.text.strip()]
    if not texts:
        raise InputError(f"{', '.join(paths)} hold no non-empty texts")
    return texts


def _corpus_file(path: Path) -> Path:
    """``path``, or a BEIR folder's corpus file."""
    if not path.is_dir():
        return path
    found = next((path / name for name in ("corpus.jsonl", "corpus.jsonl.gz") if (path / name).exists()), None)
    if found is None:
        raise InputError(f"{path} is a folder without corpus.jsonl; pass text / JSONL files or a BEIR-layout folder")
    return found


@dataclass
class CorpusItem:
    """One text of the corpus with where it stands (epoch, position): what its masks are drawn from."""

    text: str
    index: int
    epoch: int


class CorpusDataset(torch.utils.data.Dataset):
    """The texts as :class:`CorpusItem`; :class:`~bgekit.train.trainer.EpochCallback` sets ``epoch``."""

    def __init__(self, texts: list[str]):
        self.texts = texts
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> CorpusItem:
        return CorpusItem(self.texts[index], index, self.epoch)


class PretrainCollator:
    """Texts -> encoder inputs with MLM labels, decoder inputs, per-row decoder visibility and labels."""

    def __init__(self, tokenizer: TextTokenizer, options: PretrainOptions, mask_id: int, special_ids: list[int]):
        self.tokenizer = tokenizer
        self.options = options
        self.mask_id = mask_id
        self.special_ids = torch.tensor(special_ids, dtype=torch.long)
        self.vocab_size = len(tokenizer.hf)
        self.generator = torch.Generator().manual_seed(options.seed)

    def __call__(self, items: list[str] | list[CorpusItem]) -> dict[str, torch.Tensor]:
        """A batch of plain texts (masked by one generator seeded once), or of :class:`CorpusItem`
        (masked by a generator seeded from the seed, epoch and corpus positions: a run resumed from a
        checkpoint masks its next batches as the uninterrupted run did)."""
        if items and isinstance(items[0], CorpusItem):
            key = (self.options.seed, *((item.epoch, item.index) for item in items))
            self.generator = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
            items = [item.text for item in items]
        texts = items
        encoded = self.tokenizer.encode(texts, self.options.max_seq_length)
        batch = self.tokenizer.collate(encoded.ids, encoded.type_ids)
        ids, real = batch["input_ids"], batch["attention_mask"].bool()
        content = real & ~torch.isin(ids, self.special_ids)  # tokens that get masked and predicted
        # encoder: BERT's 80 / 10 / 10 masking of encoder_mlm_probability of the content tokens
        chosen = content & (torch.rand(ids.shape, generator=self.generator) < self.options.encoder_mlm_probability)
        if not chosen.any() and content.any():  # at least one label, or the loss is undefined
            chosen[content.nonzero()[0].unbind()] = True
        labels = ids.masked_fill(~chosen, -100)
        masked = ids.clone()
        roll = torch.rand(ids.shape, generator=self.generator)
        masked[chosen & (roll < 0.8)] = self.mask_id
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        masked[swap] = torch.randint(self.vocab_size, (int(swap.sum()),), generator=self.generator)
        # decoder: row i sees the CLS slot and a random (1 - p) of the content tokens, never itself
        seen = torch.rand((*ids.shape, ids.shape[1]), generator=self.generator) >= self.options.decoder_mlm_probability
        visible = seen & content[:, None, :]
        visible &= ~torch.eye(ids.shape[1], dtype=torch.bool)[None]
        visible[:, :, 0] = True
        return {
            "encoder": {**batch, "input_ids": masked},
            "encoder_labels": labels,
            "decoder_input_ids": ids,
            "decoder_visible": visible,
            "decoder_labels": ids.masked_fill(~content, -100),
        }


class EnhancedDecoder(torch.nn.Module):
    """One post-norm transformer layer whose queries attend to a separate key/value stream."""

    def __init__(self, config):
        super().__init__()
        hidden, self.heads = config.hidden_size, config.num_attention_heads
        eps = getattr(config, "layer_norm_eps", 1e-12)
        dropout = getattr(config, "hidden_dropout_prob", 0.1)
        self.attention = torch.nn.MultiheadAttention(
            hidden, self.heads, dropout=getattr(config, "attention_probs_dropout_prob", 0.1), batch_first=True
        )
        self.norm1 = torch.nn.LayerNorm(hidden, eps=eps)
        inner = getattr(config, "intermediate_size", 4 * hidden)
        self.ffn = torch.nn.Sequential(torch.nn.Linear(hidden, inner), torch.nn.GELU(), torch.nn.Linear(inner, hidden))
        self.norm2 = torch.nn.LayerNorm(hidden, eps=eps)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, content: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        blocked = (~visible).repeat_interleave(self.heads, dim=0)
        attended, _ = self.attention(query, content, content, attn_mask=blocked, need_weights=False)
        hidden = self.norm1(query + self.dropout(attended))
        return self.norm2(hidden + self.dropout(self.ffn(hidden)))


class RetroMAEModule(torch.nn.Module):
    """The MLM encoder and the enhanced decoder; the decoder reuses the encoder's embeddings and MLM head."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        self.decoder = EnhancedDecoder(lm.config)
        embeddings = getattr(lm.base_model, "embeddings", None)
        head = next(
            (getattr(lm, n) for n in ("cls", "lm_head") if isinstance(getattr(lm, n, None), torch.nn.Module)), None
        )
        if embeddings is None or head is None:
            raise InputError(
                f"pre-training needs a BERT / RoBERTa-style encoder with an MLM head; {type(lm).__name__} has none"
            )
        self._embeddings, self._head = [embeddings], [head]  # lists: not registered twice

    @property
    def config(self):
        return self.lm.config

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.lm.gradient_checkpointing_enable(**kwargs)

    def forward(self, encoder, encoder_labels, decoder_input_ids, decoder_visible, decoder_labels) -> dict:
        hidden = self.lm.base_model(**encoder, return_dict=True).last_hidden_state
        encoder_loss = self._mlm_loss(hidden, encoder_labels)
        sentence = hidden[:, :1]  # the CLS embedding, (B, 1, D)
        embeddings = self._embeddings[0]
        tokens = embeddings(input_ids=decoder_input_ids)
        content = torch.cat([sentence, tokens[:, 1:]], dim=1)
        query = embeddings(inputs_embeds=sentence.expand(-1, decoder_input_ids.shape[1], -1))
        decoder_loss = self._mlm_loss(self.decoder(query, content, decoder_visible), decoder_labels)
        return {"loss": encoder_loss + decoder_loss, "encoder_loss": encoder_loss, "decoder_loss": decoder_loss}

    def _mlm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the MLM head at the labelled positions only (the vocabulary projection
        is the costliest step, so the other positions are never projected)."""
        chosen = labels != -100
        return F.cross_entropy(self._head[0](hidden[chosen]).float(), labels[chosen])


class PretrainTrainer(LossPartsLogging, OwnFolderLayout, BgekitTrainer):
    """Trainer for :class:`RetroMAEModule`: logs both losses, saves the encoder as a model folder."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.count_tokens(inputs["encoder"])
        out = model(**inputs)
        self.record_parts({name: out[name] for name in ("encoder_loss", "decoder_loss")})
        return (out["loss"], out) if return_outputs else out["loss"]

    def save_weights(self, output_dir: str, state_dict: dict | None) -> None:
        from safetensors.torch import save_file

        module = self.accelerator.unwrap_model(self.model)
        state = module.state_dict() if state_dict is None else state_dict

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(prefix)}

        # an explicit state_dict only when the Trainer gives one (transformers 5.0 renames LayerNorm keys in it)
        module.lm.save_pretrained(output_dir, state_dict=None if state_dict is None else part("lm."))
        save_file(part("decoder."), os.path.join(output_dir, DECODER_FILE), metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        module = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_pretrain_weights(module, Path(resume_from_checkpoint))


def load_pretrain_weights(module: RetroMAEModule, folder: Path) -> None:
    """Encoder (tied weights may be missing from the file) and decoder weights from a saved folder."""
    from safetensors.torch import load_file

    state = with_current_names(load_file(str(folder / "model.safetensors")), module.lm.state_dict().keys())
    missing, unexpected = module.lm.load_state_dict(state, strict=False)
    if unexpected or any("embeddings" not in k and "decoder" not in k for k in missing):
        raise InputError(f"{folder} does not match the model being trained (missing {missing[:3]})")
    module.decoder.load_state_dict(load_file(str(folder / DECODER_FILE)))


def pretrain(options: PretrainOptions) -> Path:
    """RetroMAE pre-training of an encoder on raw texts; returns the output folder.

    Example:
        >>> from bgekit.train.pretrain import PretrainOptions, pretrain
        >>> out = pretrain(PretrainOptions(output_dir="retromae", model_name_or_path="bert-base-uncased",
        ...                                train_data=["corpus.jsonl"], max_steps=10000))  # doctest: +SKIP
        >>> # then: bgekit finetune embedder --model retromae --train-data train.jsonl ...

    ``encoder_loss`` and ``decoder_loss`` go to the Trainer's logs and ``trainer_state.json``.
    """
    resume = resolve_resume(options.resume_from_checkpoint, options.output_dir, options.overwrite_output_dir)
    from transformers import AutoModelForMaskedLM

    for name in ("encoder_mlm_probability", "decoder_mlm_probability"):
        if not 0 < getattr(options, name) < 1:
            raise InputError(f"{name} must lie strictly between 0 and 1, got {getattr(options, name)}")
    texts = read_corpus(options.train_data)  # read before any model loads
    folder = hub.model_folder(options.model_name_or_path)
    hf_tokenizer = load_hf_tokenizer(folder)
    if hf_tokenizer.mask_token_id is None:
        raise InputError(f"the tokenizer of {folder} has no mask token; pre-training needs one")
    tokenizer = TextTokenizer(hf_tokenizer)
    module = RetroMAEModule(AutoModelForMaskedLM.from_pretrained(str(folder), dtype=torch.float32))
    fit_lengths(options, module.config, "max_seq_length")
    if (folder / DECODER_FILE).exists():  # going on from an earlier pre-training run
        from safetensors.torch import load_file

        module.decoder.load_state_dict(load_file(str(folder / DECODER_FILE)))
    collator = PretrainCollator(tokenizer, options, hf_tokenizer.mask_token_id, list(hf_tokenizer.all_special_ids))
    dataset = CorpusDataset(texts)
    throughput = ThroughputCallback()
    trainer = PretrainTrainer(
        model=module,
        args=options.training_arguments(),
        train_dataset=dataset,
        data_collator=collator,
        processing_class=hf_tokenizer,
        callbacks=[EpochCallback(dataset), throughput],
        text_tokenizer=tokenizer,
        throughput=throughput,
    )
    trainer.train(resume_from_checkpoint=resume)
    output = Path(options.output_dir)
    trainer.save_model(str(output))
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(str(output / "trainer_state.json"))
    return output
