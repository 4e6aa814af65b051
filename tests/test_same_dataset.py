"""``same_dataset_within_batch`` (FlagEmbedding 1.4.2's mode): every batch from one training file, with
that file's batch size (half for symmetric records, or the records' own ``batch_size``), no in-batch
negatives for ``*no_in_batch_neg`` files, and the group sizes of ``only_1neg`` / ``symmetric_class``.
The batches are read back from the Trainer's own data loader, and losses computed by the Trainer's
``compute_loss`` on a tiny real model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bgekit import DataFormatError, InputError
from bgekit.train.data import GroupSampler

from .cli import run


def write(path: Path, name: str, count: int, **extra) -> Path:
    """``count`` records whose queries name their file (``name:i``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"query": f"{name}:{i}", "pos": [f"{name} pos {i}"], "neg": [f"{name} neg {i} {j}" for j in range(3)], **extra}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def plan_of(paths, batch_size=4, group_size=2, seed=0, processes=1, **thresholds):
    from bgekit.train.data import GroupSampler, load_train_files
    from bgekit.train.same_dataset import SameSetDataset, training_sets

    files = load_train_files([str(p) for p in paths])
    records = [r for _, _, rs in files for r in rs]
    sets = training_sets(files, batch_size, **thresholds)
    return SameSetDataset(GroupSampler(records, group_size, seed), sets, seed, processes=processes)


def source(query: str) -> str:
    return query.split(":")[0]


def test_every_batch_comes_from_one_file_with_its_own_batch_size(tmp_path):
    plain = write(tmp_path / "retrieval.jsonl", "retrieval", 10)
    sts = write(tmp_path / "sts.jsonl", "sts", 9, type="symmetric_sts")
    own = write(tmp_path / "own.jsonl", "own", 7, batch_size=3)
    dataset = plan_of([plain, sts, own], batch_size=4)
    seen: dict[str, list[int]] = {}
    for item in (dataset[i] for i in range(len(dataset))):
        names = {source(g.query) for g in item.groups}
        assert len(names) == 1, f"a batch mixes files: {names}"
        seen.setdefault(names.pop(), []).append(len(item.groups))
    # full batches only (FlagEmbedding drops each file's short last batch): 10 // 4, 9 // 2, 7 // 3
    assert seen == {"retrieval": [4, 4], "sts": [2] * 4, "own": [3, 3]}
    order = [source(dataset[i].groups[0].query) for i in range(len(dataset))]
    assert order != sorted(order, key=["retrieval", "sts", "own"].index), "batch order is shuffled across files"
    queries = [[g.query for g in dataset[i].groups] for i in range(len(dataset))]
    dataset.epoch = 1
    assert [[g.query for g in dataset[i].groups] for i in range(len(dataset))] != queries, "re-shuffled each epoch"


def test_a_file_smaller_than_a_batch_gives_no_batch_unless_merged(tmp_path, caplog):
    """As FlagEmbedding: a file with fewer records than its batch yields none (now with a warning); a
    folder's files under ``small_threshold`` records merge into one set (the smallest batch size of
    theirs), left out under ``drop_threshold``; nothing to train on at all is a clear error."""
    big = write(tmp_path / "big.jsonl", "big", 8)
    tiny = write(tmp_path / "tiny.jsonl", "tiny", 3)
    dataset = plan_of([big, tiny], batch_size=4)
    assert {source(dataset[i].groups[0].query) for i in range(len(dataset))} == {"big"}
    assert "tiny.jsonl hold fewer records than one batch" in caplog.text
    with pytest.raises(InputError, match="no training file has one full batch"):
        plan_of([tiny], batch_size=4)

    folder = tmp_path / "small"
    write(folder / "a.jsonl", "a", 2)
    write(folder / "b.jsonl", "b", 3, batch_size=2)
    merged = plan_of([folder], batch_size=4, small_threshold=4)
    # one set of 5 records, batch size min(4, 2): two batches
    assert len(merged) == 2 and all(len(merged[i].groups) == 2 for i in range(2))
    with pytest.raises(InputError, match="no training file"):
        plan_of([folder], batch_size=4, small_threshold=4, drop_threshold=6)


def test_types_set_the_group_size_and_may_not_mix_in_a_file(tmp_path):
    one = write(tmp_path / "one.jsonl", "one", 4, type="only_1neg")
    classes = tmp_path / "classes.jsonl"
    rows = [
        {"query": f"classes:{i}", "pos": ["a"], "neg": ["b"] * (1 + i % 2), "type": "symmetric_class"} for i in range(4)
    ]
    classes.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = plan_of([one, classes], batch_size=2, group_size=8)
    for item in (dataset[i] for i in range(len(dataset))):
        first = int(item.groups[0].query.split(":")[1])
        if source(item.groups[0].query) == "one":
            assert item.group_size == 2
        else:  # symmetric_class: the batch's first record's negatives + 1 (at most train_group_size); half batch
            assert item.group_size == 2 + first % 2 and len(item.groups) == 1
        assert all(len(g.passages) == item.group_size for g in item.groups)

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        json.dumps({"query": "q", "pos": ["p"]})
        + "\n"
        + json.dumps({"query": "q", "pos": ["p"], "type": "only_1neg"})
        + "\n"
    )
    with pytest.raises(DataFormatError, match=r"mixed.jsonl, line 2: 'type' is 'only_1neg'"):
        plan_of([mixed], batch_size=1)
    bad = write(tmp_path / "bad.jsonl", "bad", 2, batch_size=0)
    with pytest.raises(DataFormatError, match="line 1: 'batch_size' must be a positive integer"):
        plan_of([bad])


def test_no_in_batch_neg_files_and_folders(tmp_path):
    plain = write(tmp_path / "plain.jsonl", "plain", 4)
    alone = write(tmp_path / "nli_no_in_batch_neg.jsonl", "alone", 4)
    write(tmp_path / "set_no_in_batch_neg" / "x.jsonl", "folder", 4)
    dataset = plan_of([plain, alone, tmp_path / "set_no_in_batch_neg"], batch_size=4)
    flags = {source(dataset[i].groups[0].query): dataset[i].in_batch for i in range(len(dataset))}
    assert flags == {"plain": True, "alone": False, "folder": False}


def trainer_for(model_dir, options):
    from transformers import AutoModel

    from bgekit.models.tokenization import load_hf_tokenizer
    from bgekit.train.embedder import EmbedderTrainer
    from bgekit.train.trainer import ThroughputCallback, training_tokenizer

    hf_tokenizer = load_hf_tokenizer(model_dir)
    args = options.training_arguments()
    args.per_device_train_batch_size = 1
    model = AutoModel.from_pretrained(str(model_dir))
    return EmbedderTrainer(
        model=model,
        args=args,
        processing_class=hf_tokenizer,
        text_tokenizer=training_tokenizer(hf_tokenizer),
        throughput=ThroughputCallback(),
        options=options,
        pooling_method="cls",
    )


def test_the_trainers_data_loader_gives_one_file_per_batch(tmp_path, tiny_bert):
    """Read back through the Trainer's own data loader (its sampler, the collator): each batch's queries
    are of one file, the number of steps is the plan's, and a batch carries its group size and flag."""
    from bgekit.train.embedder import EmbedderCollator, EmbedderOptions
    from bgekit.train.same_dataset import SameSetCollator

    paths = [write(tmp_path / f"{n}.jsonl", n, 6) for n in ("alpha", "beta", "gamma_no_in_batch_neg")]
    options = EmbedderOptions(output_dir=str(tmp_path / "out"), train_group_size=3, per_device_train_batch_size=2)
    trainer = trainer_for(tiny_bert, options)
    trainer.train_dataset = plan_of(paths, batch_size=2, group_size=3)
    trainer.data_collator = SameSetCollator(EmbedderCollator(trainer.text_tokenizer, options))
    loader = trainer.get_train_dataloader()
    assert len(loader) == 9
    decode = trainer.processing_class.batch_decode
    for i, batch in enumerate(loader):
        queries = decode(batch["query"]["input_ids"], skip_special_tokens=True)
        assert len(queries) == 2 and batch["passage"]["input_ids"].shape[0] == 6 and batch["group_size"] == 3
        queries = [q.replace(" ", "") for q in queries]
        assert len({q.split(":")[0] for q in queries}) == 1, queries
        assert batch["in_batch"] == (not queries[0].startswith("gamma")), queries
        assert queries == [g.query for g in trainer.train_dataset[i].groups], "read in plan order"


def test_a_no_in_batch_neg_batch_scores_each_query_against_its_own_passages(tmp_path, tiny_bert):
    """The Trainer's loss on a batch of a ``no_in_batch_neg`` file equals a hand computation over each
    query's own group only; the same batch from a plain file counts the other queries' passages too."""
    from bgekit.train.embedder import EmbedderCollator, EmbedderOptions
    from bgekit.train.same_dataset import SameSetCollator

    paths = [write(tmp_path / "pairs_no_in_batch_neg.jsonl", "pairs", 3), write(tmp_path / "plain.jsonl", "plain", 3)]
    options = EmbedderOptions(output_dir=str(tmp_path / "out"), train_group_size=2, temperature=0.5)
    trainer = trainer_for(tiny_bert, options)
    trainer.model.eval()  # no dropout: the hand computation sees the same vectors
    collate = SameSetCollator(EmbedderCollator(trainer.text_tokenizer, options))
    dataset = plan_of(paths, batch_size=3, group_size=2)
    for item in (dataset[i] for i in range(len(dataset))):
        batch = collate([item])
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch).item()
            q = trainer.embed(trainer.model, batch["query"])
            p = trainer.embed(trainer.model, batch["passage"])
        own = []
        for i in range(3):  # -log softmax of the positive among the query's own 2 passages
            scores = [float(q[i] @ p[i * 2 + j]) / 0.5 for j in range(2)]
            own.append(-scores[0] + math.log(sum(math.exp(s) for s in scores)))
        every = F.cross_entropy(q @ p.T / 0.5, torch.arange(3) * 2).item()
        if item.in_batch:
            assert loss == pytest.approx(every, rel=1e-5) and abs(every - sum(own) / 3) > 1e-4
        else:
            assert loss == pytest.approx(sum(own) / 3, rel=1e-5)


def test_finetune_cli_trains_one_file_per_batch(tmp_path, tiny_bert):
    folder = tmp_path / "data"
    write(folder / "retrieval.jsonl", "retrieval", 8)
    write(folder / "sts.jsonl", "sts", 8, type="symmetric_sts")
    write(folder / "nli_no_in_batch_neg.jsonl", "nli", 8)
    out = tmp_path / "model"
    run(
        "finetune",
        "embedder",
        "--model",
        str(tiny_bert),
        "--train-data",
        str(folder),
        "--output-dir",
        str(out),
        "--per-device-train-batch-size",
        "4",
        "--same-dataset-within-batch",
        "--logging-steps",
        "1",
    )
    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["global_step"] == 2 + 4 + 2, "one epoch: 8 // 4 + 8 // 2 + 8 // 4 batches"
    assert (out / "model.safetensors").exists()


def test_cross_device_batches_share_one_file_and_no_in_batch_neg_gathers_nothing(tmp_path, tiny_bert):
    """Under torchrun (2 CPU processes), as FlagEmbedding: at each step both ranks take their share of one
    batch of one file (different records), cross-device negatives come from that file; a
    ``no_in_batch_neg`` batch gathers nothing, each query meets its own passages only."""
    from .test_distributed import SCRIPTS, torchrun

    folder = tmp_path / "data"
    for name in ("alpha", "beta", "pairs_no_in_batch_neg"):
        write(folder / f"{name}.jsonl", name.split("_")[0], 8)
    out = tmp_path / "steps.json"
    torchrun(str(SCRIPTS / "same_dataset_ranks.py"), str(tiny_bert), str(folder), str(out))
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3 * 8 // 4, "a batch is 2 records per rank x 2 ranks"
    files = []
    for a, b in zip(*ranks, strict=True):
        names = {q.split(":")[0] for q in a["queries"] + b["queries"]}
        assert len(names) == 1 and len(a["queries"]) == len(b["queries"]) == 2, (a, b)
        assert not set(a["queries"]) & set(b["queries"]), "each rank its own records"
        assert a["in_batch"] == b["in_batch"] == (names != {"pairs"})
        for step in (a, b):
            want = step["gathered"] if step["in_batch"] else step["own"]
            assert step["loss"] == pytest.approx(want, rel=1e-5)
        files.append(names.pop())
    assert sorted(files) == ["alpha"] * 2 + ["beta"] * 2 + ["pairs"] * 2


def test_icl_and_m3_under_torchrun_share_each_batch_of_one_file(tmp_path, golden_dir, tiny_xlmr):
    """The ICL and M3 trainers under torchrun (2 CPU processes), trained for real: at every step both ranks
    take their share (different records) of one batch of one file, with that file's group size and
    in-batch rule; ICL examples come from the query's file too; one epoch is the plan's steps."""
    from .test_distributed import SCRIPTS, torchrun

    folder = tmp_path / "data"
    write(folder / "alpha.jsonl", "alpha", 8)
    write(folder / "beta.jsonl", "beta", 8, type="symmetric_sts")  # half the batch size: 1 a rank
    write(folder / "pairs_no_in_batch_neg.jsonl", "pairs", 8, type="only_1neg")  # 2 passages a query
    prefix = tmp_path / "seen"
    icl = golden_dir / "models" / "mistral-icl"
    torchrun(str(SCRIPTS / "same_dataset_trainers.py"), str(icl), str(tiny_xlmr), str(folder), str(prefix))
    for kind in ("icl", "m3"):
        ranks = [json.loads(Path(f"{prefix}.{kind}.{r}").read_text()) for r in range(2)]
        assert len(ranks[0]) == len(ranks[1]) == 2 + 4 + 2, kind
        files = []
        for a, b in zip(*ranks, strict=True):
            (name,) = {source(q) for q in a["queries"] + b["queries"]}
            per_rank = 1 if name == "beta" else 2
            assert len(a["queries"]) == len(b["queries"]) == per_rank, (kind, a, b)
            assert not set(a["queries"]) & set(b["queries"]), "each rank its own records"
            group = 2 if name == "pairs" else 3
            assert a["group_size"] == b["group_size"] == group and set(a["passages"] + b["passages"]) == {group}
            assert a["in_batch"] == b["in_batch"] == (name != "pairs")
            assert {source(q) for q in a["examples"] + b["examples"]} <= {name}, (kind, a, b)
            files.append(name)
        assert sorted(files) == ["alpha"] * 2 + ["beta"] * 4 + ["pairs"] * 2, kind
        if kind == "icl":
            assert any(step["examples"] for step in ranks[0] + ranks[1]), "ICL queries get examples"
        state = json.loads((Path(f"{prefix}.{kind}.out") / "checkpoint-8" / "trainer_state.json").read_text())
        assert state["global_step"] == 8


def three_files(folder: Path) -> Path:
    """8 records each: plain retrieval, symmetric (batch of half size), no in-batch negatives."""
    write(folder / "alpha.jsonl", "alpha", 8)
    write(folder / "beta.jsonl", "beta", 8, type="symmetric_sts")
    write(folder / "gamma_no_in_batch_neg.jsonl", "gamma", 8)
    return folder


def test_icl_batches_and_their_examples_come_from_one_file(tmp_path, golden_dir):
    """ICL embedders (bge-en-icl) in this mode: each batch's queries, and the in-context examples put in
    front of them, are records of one file, in the very token ids the model gets; the CLI trains the
    plan's number of steps (8 // 4 + 8 // 2 + 8 // 4, not 24 // 4)."""
    from bgekit.models.tokenization import load_hf_tokenizer
    from bgekit.train.icl import ExamplePicker, ICLCollator, ICLOptions, ICLSameSetDataset, check_icl_options
    from bgekit.train.same_dataset import SameSetCollator, same_set_dataset
    from bgekit.train.trainer import training_data, training_tokenizer

    icl_dir = golden_dir / "models" / "mistral-icl"
    folder = three_files(tmp_path / "data")
    options = ICLOptions(
        output_dir=str(tmp_path / "unused"),
        train_data=[str(folder)],
        per_device_train_batch_size=4,
        query_instruction_for_retrieval="Find it.",
        query_max_len=200,
        max_examples=5,
    )
    options = check_icl_options(options, None)
    files = training_data(options)
    records = [r for _, _, rs in files for r in rs]
    tokenizer = training_tokenizer(load_hf_tokenizer(icl_dir))
    picker = ExamplePicker(records, tokenizer, options)
    sampler = GroupSampler(records, 2, options.seed)
    dataset = same_set_dataset(
        files, sampler, options, options.training_arguments(), ICLSameSetDataset, picker=picker, options=options
    )
    collate = SameSetCollator(ICLCollator(tokenizer, options))
    names, examples = [], 0
    for epoch in (0, 1):
        dataset.epoch = epoch
        for i in range(len(dataset)):
            item = dataset[i]
            (name,) = {source(g.query) for g in item.groups}
            names.append(name)
            for group in item.groups:
                examples += len(group.examples)
                assert all(source(e["query"]) == name for e in group.examples), (name, group.examples)
            batch = collate([item])
            prompts = tokenizer.hf.batch_decode(batch["query"]["input_ids"], skip_special_tokens=True)
            for prompt in prompts:  # what the model reads: no other file's record anywhere in the prompt
                assert name in prompt and not [o for o in ("alpha", "beta", "gamma") if o != name and o in prompt]
    assert sorted(names) == sorted(["alpha", "alpha", "beta", "beta", "beta", "beta", "gamma", "gamma"] * 2)
    assert examples > 0, "queries get examples"

    out = tmp_path / "out"
    run(
        "finetune",
        "embedder",
        "--model",
        str(icl_dir),
        "--model-class",
        "decoder-only-icl",
        "--train-data",
        str(folder),
        "--output-dir",
        str(out),
        "--per-device-train-batch-size",
        "4",
        "--query-instruction-for-retrieval",
        "Find it.",
        "--query-max-len",
        "64",
        "--passage-max-len",
        "16",
        "--same-dataset-within-batch",
        "--save-steps",
        "100",
    )
    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["global_step"] == 2 + 4 + 2
    assert json.loads((out / "bgekit.json").read_text())["model_class"] == "decoder-only-icl"


def test_m3_batches_come_from_one_file_with_its_group_size_and_negatives(tmp_path, tiny_xlmr):
    """BGE-M3 in this mode, read back through the M3 Trainer's own data loader: every batch of one file;
    an ``only_1neg`` file's batches have 2 passages a query whatever ``train_group_size``, and a
    ``no_in_batch_neg`` file's loss (every head's, and the ensemble's) is the loss of each query against
    its own passages only, as ``--no-inbatch-neg`` gives it."""
    from dataclasses import replace

    from bgekit.models.tokenization import load_hf_tokenizer
    from bgekit.train.embedder import EmbedderCollator
    from bgekit.train.m3 import M3Options, M3Trainer, load_m3_for_training, resolve_heads
    from bgekit.train.same_dataset import SameSetCollator, same_set_dataset
    from bgekit.train.trainer import ThroughputCallback, training_data, training_tokenizer

    write(tmp_path / "data" / "alpha.jsonl", "alpha", 6)
    write(tmp_path / "data" / "pairs_no_in_batch_neg.jsonl", "pairs", 6, type="only_1neg")
    options = M3Options(
        output_dir=str(tmp_path / "out"),
        train_data=[str(tmp_path / "data")],
        train_group_size=3,
        per_device_train_batch_size=3,
        temperature=0.5,
        same_dataset_within_batch=True,
    )
    heads = resolve_heads(options)
    hf_tokenizer = load_hf_tokenizer(tiny_xlmr)
    model = load_m3_for_training(tiny_xlmr, options, heads, hf_tokenizer)
    model.eval()  # no dropout: both losses see the same vectors
    files = training_data(options)
    args = options.training_arguments()
    sampler = GroupSampler([r for _, _, rs in files for r in rs], 3, options.seed)
    tokenizer = training_tokenizer(hf_tokenizer)
    trainer = M3Trainer(
        model=model,
        args=args,
        train_dataset=same_set_dataset(files, sampler, options, args),
        data_collator=SameSetCollator(EmbedderCollator(tokenizer, options)),
        processing_class=hf_tokenizer,
        text_tokenizer=tokenizer,
        throughput=ThroughputCallback(),
        options=options,
        heads=heads,
    )
    loader = trainer.get_train_dataloader()
    assert len(loader) == 2 + 2
    seen = []
    for batch in loader:
        queries = hf_tokenizer.batch_decode(batch["query"]["input_ids"], skip_special_tokens=True)
        (name,) = {q.split(":")[0].strip() for q in queries}
        seen.append(name)
        group = 2 if name == "pairs" else 3
        assert batch["group_size"] == group and batch["passage"]["input_ids"].shape[0] == 3 * group
        assert batch["in_batch"] == (name != "pairs")
        plain = {k: v for k, v in batch.items() if k not in ("group_size", "in_batch")}
        with torch.no_grad():
            loss = trainer.compute_loss(model, batch).item()
            trainer.options = replace(options, train_group_size=group, use_inbatch_neg=batch["in_batch"])
            want = trainer.compute_loss(model, plain).item()
            trainer.options = replace(options, train_group_size=group, use_inbatch_neg=not batch["in_batch"])
            other = trainer.compute_loss(model, plain).item()
            trainer.options = options
        assert loss == pytest.approx(want, rel=1e-6) and abs(loss - other) > 1e-4
    assert sorted(seen) == ["alpha", "alpha", "pairs", "pairs"]


def test_m3_cli_trains_one_file_per_batch(tmp_path, tiny_xlmr):
    folder = three_files(tmp_path / "data")
    out = tmp_path / "m3"
    run(
        "finetune",
        "m3",
        "--model",
        str(tiny_xlmr),
        "--train-data",
        str(folder),
        "--output-dir",
        str(out),
        "--per-device-train-batch-size",
        "4",
        "--passage-max-len",
        "16",
        "--same-dataset-within-batch",
        "--save-steps",
        "100",
    )
    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["global_step"] == 2 + 4 + 2, "one epoch: 8 // 4 + 8 // 2 + 8 // 4 batches"
    assert (out / "sparse_linear.pt").exists() and (out / "colbert_linear.pt").exists()


def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(tmp_path, tiny_bert):
    """Resuming mid-way through the second epoch gives the weights of the run that never stopped: the
    plan depends on the seed and the epoch alone, and the Trainer skips the batches already trained."""
    import shutil

    from safetensors.torch import load_file

    from bgekit.train.embedder import EmbedderOptions, finetune_embedder

    paths = [str(write(tmp_path / "data" / f"{n}.jsonl", n, 12)) for n in ("alpha", "beta_no_in_batch_neg")]

    def train(out, resume=None):
        options = EmbedderOptions(
            output_dir=str(out),
            model_name_or_path=str(tiny_bert),
            train_data=paths,
            num_train_epochs=2,
            per_device_train_batch_size=4,
            train_group_size=3,
            learning_rate=1e-3,
            passage_max_len=32,
            save_steps=4,
            save_total_limit=None,
            resume_from_checkpoint=resume,
            same_dataset_within_batch=True,
        )
        finetune_embedder(options)
        return load_file(str(out / "model.safetensors"))

    whole = train(tmp_path / "whole")  # 2 files x 12 records, 4 a batch: steps 1-6 epoch 1, 7-12 epoch 2
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoint-8", resumed_dir / "checkpoint-8")
    resumed = train(resumed_dir, "auto")
    start = load_file(str(tmp_path / "whole" / "checkpoint-8" / "model.safetensors"))
    assert any(not torch.equal(start[k], whole[k]) for k in whole), "the last steps changed the weights"
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key


def test_teacher_scores_follow_the_batch_group_size(tmp_path, tiny_bert):
    """An ``only_1neg`` file with teacher scores trains 1 positive + 1 negative per query whatever
    ``train_group_size``: the batch's teacher scores are ``(queries, 2)`` and both distillation losses
    take them (``kl_div`` adds KL over each query's own pair to the in-batch InfoNCE)."""
    from bgekit.train import losses
    from bgekit.train.embedder import EmbedderCollator, EmbedderOptions
    from bgekit.train.same_dataset import SameSetCollator

    path = write(tmp_path / "pairs.jsonl", "pairs", 4, type="only_1neg", pos_scores=[3.0], neg_scores=[1.0, 0.5, 0.0])
    for kd in ("kl_div", "m3_kd_loss"):
        options = EmbedderOptions(output_dir=str(tmp_path / kd), train_group_size=4, kd_loss_type=kd)
        trainer = trainer_for(tiny_bert, options)
        trainer.model.eval()
        batch = SameSetCollator(EmbedderCollator(trainer.text_tokenizer, options))([plan_of([path], group_size=4)[0]])
        teacher = batch["teacher_scores"]
        assert teacher.shape == (4, 2) and batch["passage"]["input_ids"].shape[0] == 8
        assert teacher[:, 0].eq(3.0).all() and torch.isin(teacher[:, 1], torch.tensor([1.0, 0.5, 0.0])).all()
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
            q, p = trainer.embed(trainer.model, batch["query"]), trainer.embed(trainer.model, batch["passage"])
        want = losses.embedding_loss(q, p, 2, options.temperature, teacher, kd)
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)
        if kd == "kl_div":
            scores = q @ p.T / options.temperature
            own = torch.stack([scores[i, 2 * i : 2 * i + 2] for i in range(4)])
            kl = F.kl_div(F.log_softmax(own, -1), F.softmax(teacher, -1), reduction="batchmean")
            assert loss.item() == pytest.approx((F.cross_entropy(scores, torch.arange(4) * 2) + kl).item(), rel=1e-5)
