"""The ONNX Runtime backend: a CPU fast path for encoder embedders (BGE-M3 too) and cross-encoders.

Only the transformer forward moves to ONNX Runtime; bgekit's tokenizer, length-sorted
batches, pooling and normalization stay the same, so ``backend="onnx"`` gives the torch
path's numbers to float32 rounding. ``backend="onnx-int8"`` adds dynamic int8
quantization of the weights (faster on CPUs with VNNI/AVX-512, at a measured accuracy
cost; see benchmarks/RESULTS.md).

Where a model reads only each text's first row of its last layer (CLS pooling, a cross-encoder's
head), the exported graph runs that layer on the first rows alone, as the torch path does
(:mod:`bgekit.runtime.first_tokens`): the caller says how with ``first_rows``.

The exported file is cached under ``$BGEKIT_CACHE/onnx`` (default ``~/.cache/bgekit/onnx``),
keyed by the model's config, weights files and remote code, the output kind and the library
versions, so the export (seconds for MiniLM, a minute for a large model) happens once per model.
Before it is cached, the export is run on other shapes than the traced one and compared with the
module's own forward (:func:`check_export`): a graph that differs is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import BgekitError, InputError

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "onnx-int8")
EXPORT_VERSION = 3  # bump when the exported graph changes, so old cache entries are not reused
OPSET = 17
#: the files besides ``config.json`` an export depends on (:func:`graph_sources`)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.index.json", "*.py")

#: ``(inputs with a prepared 4-D additive mask, the 0/1 [B, L] key mask) -> the exported output``
RowsForward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
#: given the loaded transformers module: ``(output name, RowsForward)`` to export the first-rows
#: forward, or None where it does not apply (the module's own output is exported then)
FirstRows = Callable[[torch.nn.Module], tuple[str, RowsForward] | None]


def check_backend(backend: str | None, devices: Any = None, use_bf16: bool = False) -> str:
    """Validate ``backend``; the ONNX backends run on the CPU only, in float32 (int8 weights for
    ``onnx-int8``): bfloat16 is the torch backend's."""
    backend = "torch" if backend is None else backend
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "torch":
        if use_bf16:
            raise InputError(
                f"backend={backend!r} runs float32 graphs and cannot take use_bf16=True; for bfloat16 on "
                "the CPU use backend='torch' with use_bf16=True"
            )
        if isinstance(devices, (str, int, torch.device)):
            named = [devices]
        else:
            try:
                named = list(devices or ["cpu"])
            except TypeError:
                raise InputError(
                    f"devices must be a device string, an int or a list of them, got {devices!r}"
                ) from None
        if not all(_on_cpu(d) for d in named):
            raise InputError(
                f"backend={backend!r} runs on the CPU only; pass devices='cpu' (got devices={devices!r}) "
                "or use backend='torch' on an accelerator"
            )
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise InputError(f"backend={backend!r} needs ONNX Runtime: pip install 'bgekit[onnx]'") from None
    return backend


def _on_cpu(device: Any) -> bool:
    """Whether ``device`` names the CPU as torch spells it (``"cpu"``, ``"cpu:0"``, ``torch.device("cpu")``)."""
    if isinstance(device, bool) or not isinstance(device, (str, torch.device)):
        return False  # an int is a CUDA ordinal
    try:
        return torch.device(str(device).strip()).type == "cpu"
    except (RuntimeError, ValueError):
        return False


def refuse_backend(owner: str, backend: Any) -> None:
    """For the families with no ONNX export (decoder embedders, LLM rerankers): another backend is
    an error naming the class, not a silent torch run (nor, for a decoder, a wrong export)."""
    if backend not in (None, "torch"):
        raise InputError(
            f"{owner} runs on backend='torch' only (got backend={backend!r}); the ONNX backends run "
            "BERT / XLM-R style encoder embedders (FlagModel, BGEM3FlagModel) and cross-encoders (FlagReranker)"
        )


def available_cores() -> int:
    """CPU cores this process may use (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class OnnxModule(torch.nn.Module):
    """Stands in for a transformers module: called like one, returns an object whose one field,
    named by the graph's output (``last_hidden_state``, ``logits``, ``first_token_state``), holds
    a CPU float32 tensor."""

    def __init__(self, path: Path, config: Any, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cores()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output = self.session.get_outputs()[0].name
        self.config = config
        self.path = Path(path)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: Any) -> SimpleNamespace:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, **inputs}
        feeds = {}
        for name in self.input_names:
            tensor = given.get(name)
            if tensor is None:  # e.g. token_type_ids for a tokenizer that does not make them
                tensor = torch.zeros_like(input_ids)
            feeds[name] = tensor.to("cpu", torch.int64).numpy()
        (out,) = self.session.run([self.output], feeds)
        return SimpleNamespace(**{self.output: torch.from_numpy(out)})


def runs_on_onnx(module: torch.nn.Module) -> bool:
    """Whether ``module`` (or a part of it, as BGE-M3's encoder) runs on ONNX Runtime."""
    return any(isinstance(part, OnnxModule) for part in module.modules())


class _Traceable(torch.nn.Module):
    """The transformers module (or ``rows``, its first-rows forward) with a prepared additive 4-D
    mask, so the traced graph has no branch on the mask's values (transformers' own 2-D mask
    handling does not trace cleanly)."""

    def __init__(self, module: torch.nn.Module, output: str, type_ids: bool, rows: RowsForward | None):
        super().__init__()
        self.module, self.output, self.type_ids, self.rows = module, output, type_ids, rows

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        bias = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
        inputs = {"input_ids": input_ids, "attention_mask": bias}
        if self.type_ids:
            inputs["token_type_ids"] = token_type_ids
        if self.rows is not None:
            return self.rows(inputs, attention_mask)
        return getattr(self.module(**inputs, return_dict=True), self.output)


def cache_root() -> Path:
    """``$BGEKIT_CACHE/onnx`` (default ``~/.cache/bgekit/onnx``), beside the evaluation cache."""
    return Path(os.environ.get("BGEKIT_CACHE") or Path.home() / ".cache" / "bgekit").expanduser() / "onnx"


def graph_sources(folder: Path) -> list[Path]:
    """The files of ``folder`` an export is built from: its config, every weights file (the shards of a
    sharded checkpoint and their index too) and any remote code; not the tokenizer, which stays bgekit's."""
    folder = Path(folder)
    found = {folder / "config.json"} if (folder / "config.json").exists() else set()
    for pattern in WEIGHT_PATTERNS:
        found.update(path for path in folder.glob(pattern) if path.is_file())
    return sorted(found)


def cache_key(folder: Path, backend: str, output: str, type_ids: bool, first_rows: bool = False) -> str:
    """A digest of everything the exported file depends on. Each source file counts by its size and
    its modification and change times: a checkpoint replaced in place, even by a copy of the same size
    that kept its old modification time (``cp -p``, ``rsync -a``), has a new change time, so a new key."""
    import onnxruntime
    import transformers

    parts: dict[str, Any] = {
        "folder": str(Path(folder).resolve()),
        "backend": backend,
        "output": output,
        "type_ids": type_ids,
        "first_rows": first_rows,
        "export": EXPORT_VERSION,
        "opset": OPSET,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    for path in graph_sources(folder):
        stat = path.stat()
        parts[path.name] = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def load_onnx_module(
    loader: Any,
    folder: Path,
    trust_remote_code: bool,
    backend: str,
    output: str,
    type_ids: bool,
    threads: int | None = None,
    first_rows: FirstRows | None = None,
) -> OnnxModule:
    """Export (once, cached) and load the model at ``folder`` for ``backend`` ("onnx" or "onnx-int8").

    The graph returns the module's ``output``, or, where ``first_rows`` accepts the module, the
    output it names (the module's :attr:`OnnxModule.output` says which the cached file holds)."""
    from transformers import AutoConfig

    rows = first_rows is not None
    root = cache_root() / cache_key(folder, backend, output, type_ids, rows)
    path = root / "model.onnx"
    if not path.exists():
        try:  # the exporter and the quantizer write through it; a cached graph loads without it
            import onnx  # noqa: F401
        except ImportError:
            raise InputError(
                f"backend={backend!r} exports the model once with the onnx package, which is not installed: "
                "pip install 'bgekit[onnx]'"
            ) from None
        fp32 = root.parent / cache_key(folder, "onnx", output, type_ids, rows) / "model.onnx"
        if not fp32.exists():
            _export(loader, folder, trust_remote_code, output, type_ids, fp32, first_rows)
        if backend == "onnx-int8":
            _quantize(fp32, path)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    return OnnxModule(path, config, threads)


def _export(
    loader: Any,
    folder: Path,
    trust_remote_code: bool,
    output: str,
    type_ids: bool,
    target: Path,
    first_rows: FirstRows | None = None,
) -> None:
    """Trace a private copy of the module (the exporter leaves the traced copy unusable), then run the
    graph on other shapes than the traced one and compare it with the module's own forward
    (:func:`check_export`): an export that does not give torch's outputs is refused, not cached."""
    from .base import load_module

    logger.info("exporting %s to ONNX (once; cached at %s)", folder, target)
    module = load_module(loader, folder, trust_remote_code).eval()
    chosen = None if first_rows is None else first_rows(module)
    output, rows = chosen if chosen is not None else (output, None)
    samples = sample_inputs(module.config, type_ids)
    with torch.no_grad():  # before the export, which leaves the module unusable
        wanted = [reference_output(module, sample, output) for sample in samples]
    ids = torch.full((2, 8), 5, dtype=torch.int64)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    args: tuple[torch.Tensor, ...] = (ids, mask, torch.zeros_like(ids)) if type_ids else (ids, mask)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if type_ids else [])
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes[output] = {0: "batch", 1: "sequence"} if output == "last_hidden_state" else {0: "batch"}
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staged = Path(tmp) / "model.onnx"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer notes about shape-constant Python branches
                torch.onnx.export(
                    _Traceable(module, output, type_ids, rows),
                    args,
                    str(staged),
                    input_names=names,
                    output_names=[output],
                    dynamic_axes=axes,
                    opset_version=OPSET,
                    dynamo=False,
                )
        except Exception as exc:
            raise BgekitError(
                f"could not export {folder} to ONNX ({type(exc).__name__}: {exc}); use backend='torch'"
            ) from exc
        check_export(OnnxModule(staged, module.config, threads=1), samples, wanted, folder)
        publish(Path(tmp), target)


#: the largest difference allowed between an fp32 export and torch, relative to the output's scale
#: (different kernels summing in another order give ~1e-6; a wrongly traced graph is off by far more)
EXPORT_TOLERANCE = 1e-3


def sample_inputs(config: Any, type_ids: bool) -> list[dict[str, torch.Tensor]]:
    """Padded batches of shapes other than the traced ``(2, 8)`` (one row alone, three rows of
    different lengths and a segment of type 1), with ids the model's vocabulary holds."""
    generator = torch.Generator().manual_seed(0)
    vocab = int(getattr(config, "vocab_size", 0) or 0) or 1000
    special = {getattr(config, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    pool_ids = [i for i in range(min(vocab, 1000)) if i not in special] or [0]
    longest = 13
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int):
        pad = getattr(config, "pad_token_id", None)
        longest = max(2, min(longest, limit - (pad + 1 if isinstance(pad, int) else 0) - 1))
    samples = []
    for lengths in ([min(3, longest)], [longest, 2, max(1, longest - 3)]):
        width = max(lengths)
        pick = torch.randint(len(pool_ids), (len(lengths), width), generator=generator)
        ids = torch.tensor(pool_ids)[pick]
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        pad = getattr(config, "pad_token_id", None)
        ids = ids.masked_fill(mask == 0, pad if isinstance(pad, int) else 0)
        sample = {"input_ids": ids, "attention_mask": mask}
        if type_ids:  # the last row's second half as a second segment, where the model has one
            types = torch.zeros_like(ids)
            if int(getattr(config, "type_vocab_size", 1) or 1) > 1:
                types[-1, width // 2 :] = 1
            sample["token_type_ids"] = types * mask
        samples.append(sample)
    return samples


def reference_output(module: torch.nn.Module, sample: dict[str, torch.Tensor], output: str) -> torch.Tensor:
    """What the graph must return for ``sample``, from the module's plain transformers forward:
    its ``output``, or, for a first-rows graph (``first_token_state``), the last layer's first rows."""
    result = module(**sample, return_dict=True)
    if output == "first_token_state":
        return result.last_hidden_state[:, 0].float()
    return getattr(result, output).float()


def check_export(
    graph: OnnxModule, samples: list[dict[str, torch.Tensor]], wanted: list[torch.Tensor], folder: Path
) -> None:
    """Raise a :class:`BgekitError` unless ``graph`` gives ``wanted`` (the torch outputs) for each
    sample within :data:`EXPORT_TOLERANCE` of the output's scale (token states at the real tokens only)."""
    worst = 0.0
    for sample, want in zip(samples, wanted, strict=True):
        got = getattr(graph(**sample), graph.output).float()
        if graph.output == "last_hidden_state":
            real = sample["attention_mask"].bool()
            got, want = got[real], want[real]
        if got.shape != want.shape:
            raise BgekitError(
                f"the ONNX export of {folder} returned {graph.output} of shape {tuple(got.shape)} where torch "
                f"gives {tuple(want.shape)}; use backend='torch'"
            )
        scale = max(1.0, float(want.abs().max()))
        difference = float((got - want).abs().max()) / scale if got.numel() else 0.0
        if not difference <= EXPORT_TOLERANCE:  # NaN too
            raise BgekitError(
                f"the ONNX export of {folder} does not reproduce torch's {graph.output}: it differs by "
                f"{difference:.3g} (relative to the largest value; at most {EXPORT_TOLERANCE:g} is allowed) on a "
                f"batch of shape {tuple(sample['input_ids'].shape)}; nothing was cached, use backend='torch'"
            )
        worst = max(worst, difference)
    logger.info("ONNX export of %s checked against torch: largest relative difference %.3g", folder, worst)


def _quantize(source: Path, target: Path) -> None:
    """Dynamic int8 quantization of the weights (activations quantized per batch at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()  # the quantizer's advice about a pre-processing step, meant for image models
    advice = _DropMessage("Please consider to run pre-processing before quantization")
    root.addFilter(advice)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            staged = Path(tmp) / "model.onnx"
            quantize_dynamic(str(source), str(staged), weight_type=QuantType.QInt8, per_channel=True)
            publish(Path(tmp), target)
    finally:
        root.removeFilter(advice)


def publish(staging: Path, target: Path) -> None:
    """Move a finished export from ``staging`` into ``target``'s folder, the graph (``target``'s
    name) last. A model over 2 GB (bge-m3, bge-reranker-large / v2-m3) keeps its weights in files
    beside the graph, which must move too; a graph in the cache then always means a whole export."""
    for path in staging.iterdir():
        if path.name != target.name:
            os.replace(path, target.parent / path.name)
    os.replace(staging / target.name, target)


class _DropMessage(logging.Filter):
    """Drops the log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)
