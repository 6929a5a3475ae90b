"""A trained run as what decoding needs: its model with the checkpoint's weights, its tokenizer and
its context length. Named by run folder, checkpoint file, or MLflow run id."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from research.config.build import apply_precision_recipe, linear_factory, model_config
from research.errors import DecodeError
from research.inference.engine import GREEDY, Sampling, generate
from research.inference.measure import DecodeSettings, decode_metrics
from research.inference.speculative import speculative_generate
from research.model.transformer import Transformer
from research.tracking import tags
from research.training.checkpoints import CheckpointError, find_checkpoint, read_checkpoint, run_folder_of
from research.training.data import BPETokenizer, ByteTokenizer, tokenize_corpus
from research.training.module import unwrapped_name

RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids


@dataclass
class Trained:
    model: Transformer
    tokenizer: ByteTokenizer | BPETokenizer
    context: int  # data.seq_len: the longest sequence it was trained on
    cfg: DictConfig
    checkpoint: Path | None  # None: taken from a training run's memory
    val_tokens: np.ndarray  # the run's validation split: prompts for measurements

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text.encode()).tolist()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids).decode("utf-8", errors="replace")


def run_folder_of_id(run_id: str, uri: str) -> Path:
    from research.tracking.store import client

    try:
        run = client(uri).get_run(run_id)
    except Exception as e:
        raise DecodeError(f"'{run_id}': no such MLflow run in {uri}") from e
    folder = run.data.tags.get(tags.RUN_DIR)
    if not folder:
        raise DecodeError(f"MLflow run {run_id} records no run folder (tag {tags.RUN_DIR})")
    return Path(folder)


def load_trained(source: str, uri: str = "sqlite:///mlruns.db", device: str | torch.device | None = "cpu",
                 dtype: torch.dtype | None = None) -> Trained:  # fmt: skip
    """``source``: a run folder (its last checkpoint), a checkpoint file, or an MLflow run id.
    ``device`` None: a GPU when there is one; ``dtype`` None: bf16 on a GPU, else fp32."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if RUN_ID.fullmatch(source) and not Path(source).exists():
        source = str(run_folder_of_id(source, uri))
    try:
        ckpt = find_checkpoint(source)
    except CheckpointError as e:
        raise DecodeError(str(e).replace("resume=", "", 1)) from None
    config_file = run_folder_of(str(ckpt.path)) / "config.yaml"
    if not config_file.exists():
        raise DecodeError(
            f"'{source}': no config.yaml beside its checkpoint ({config_file}): a run folder holds one"
        )
    cfg = OmegaConf.load(config_file)
    corpus = tokenize_corpus(cfg.data, log=lambda _: None)
    state = read_checkpoint(ckpt.path)["state_dict"]
    model = rebuild(cfg, corpus.vocab_size, {k.removeprefix("model."): v for k, v in state.items()})
    model = model.to(device=device, dtype=dtype).eval()
    return Trained(model, corpus.tokenizer, int(cfg.data.seq_len), cfg, ckpt.path, corpus.tokens["val"])


def rebuild(cfg: DictConfig, vocab_size: int, state: dict[str, torch.Tensor]) -> Transformer:
    """A plain model of ``cfg`` holding ``state``: no compiled blocks or other speed converters,
    whose wrappers' names (``_orig_mod.``) the state may carry."""
    model = Transformer(model_config(cfg, vocab_size), linear_factory(cfg))
    if cfg.precision.name == "fp8":
        apply_precision_recipe(model, cfg)  # the layers FP8 left in bf16 are plain again
    model.load_state_dict({unwrapped_name(k): v for k, v in state.items()})
    return model


def decode_settings(cfg: DictConfig) -> DecodeSettings:
    e = cfg.eval
    return DecodeSettings(tuple(e.decode_batches), tuple(e.decode_contexts or [cfg.data.seq_len]),
                          int(e.decode_new_tokens), e.decode_memory_gib, bool(e.decode_compile))  # fmt: skip


def measure_decoding(trained: Trained, settings: DecodeSettings, n_prompts: int = 8) -> dict[str, float]:
    """The ``decode/*`` metrics of a trained run; speculation drafts on prompts from its validation
    split (half a context each), where acceptance means what it will mean on its data."""
    length = max(1, trained.context // 2)
    starts = np.linspace(0, len(trained.val_tokens) - length - 1, n_prompts).astype(int)
    prompts = [trained.val_tokens[s : s + length].astype(np.int64).tolist() for s in starts]
    return decode_metrics(trained.model, settings, prompts)


def complete(trained: Trained, prompts: list[str], max_new: int, sampling: Sampling = GREEDY,
             speculative: bool = False, compile: bool = False) -> tuple[list[str], str | None]:  # fmt: skip
    """Each prompt's continuation, and with ``speculative`` a line on how the drafts fared."""
    ids = [trained.encode(p) for p in prompts]
    if min(map(len, ids)) == 0:
        raise DecodeError("a prompt encodes to no tokens: give some text")
    if not speculative:
        outputs = generate(trained.model, ids, max_new, sampling, compile, trained.context)
        return [trained.decode(o) for o in outputs], None
    spec = speculative_generate(trained.model, ids, max_new, trained.context)
    rates = ", ".join(f"depth {k} {a:.0%}" for k, a in enumerate(spec.acceptance, start=1))
    note = f"speculative: {spec.tokens_per_round:.2f} tokens per main-model pass; drafts kept: {rates}"
    return [trained.decode(o) for o in spec.tokens], note


def log_to_run(trained: Trained, values: dict[str, float], uri: str) -> str:
    """Log ``values`` to the MLflow run that wrote the checkpoint; its id."""
    from research.tracking.store import client

    run_id = read_checkpoint(trained.checkpoint).get("mlflow_run_id") if trained.checkpoint else None
    if not run_id:
        raise DecodeError(f"{trained.checkpoint} names no MLflow run to log to")
    c = client(uri)
    for name, value in values.items():
        c.log_metric(run_id, name, value)
    return run_id
