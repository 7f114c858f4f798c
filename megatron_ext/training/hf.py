"""HF checkpoints in and out: a HF directory -> a run directory of this project, and a checkpoint
-> a HF directory that ``transformers`` loads.

Both directions go through the unsharded model (TP = PP = EP = 1, one process on CPU): its state
dict is mapped tensor by tensor (:mod:`megatron_ext.hf.rules`; the core decoder here, the parts a
capability owns by its :meth:`~megatron_ext.capability.Capability.hf_layer_rules`), and the
checkpoint written on import reshards on load like any other, so the imported model trains at any
TP / PP / EP layout. Every tensor on either side must be claimed by exactly one rule.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_ext.config import ConfigError
from megatron_ext.hf.config import REMOTE_CODE_FILE, dense_hf_config, resolve_architecture
from megatron_ext.hf.rules import Rule, qkv, same, swiglu_mlp, vocab
from megatron_ext.models.vocab import padded_vocab_size
from megatron_ext.run import RunConfig
from megatron_ext.run.hf import conflicts, is_hf_dir, read_hf_config, sections_from_hf

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)
"""Files of a HF directory that travel with the weights (into ``RUN_DIR/tokenizer/`` and back)."""
TOKENIZER_DIR = "tokenizer"
WEIGHTS_INDEX = "model.safetensors.index.json"
INIT_FROM_HF_DIR = "init_from_hf"
"""Where a run whose ``train.init_from`` is a HF directory keeps the converted weights."""


# -- weights -----------------------------------------------------------------------------------------
def model_rules(cfg: RunConfig) -> List[Rule]:
    """Every rule of ``cfg``'s model: embedding, norms, attention and dense MLPs here; the parts the
    enabled capabilities own (an MoE layer's MLP) from them."""
    m = cfg.model
    heads = m.num_attention_heads
    groups, head_dim = m.num_query_groups or heads, m.kv_channels or m.hidden_size // heads
    padded = padded_vocab_size(m.vocab_size)
    rules = [
        vocab("embedding.word_embeddings.weight", "model.embed_tokens.weight", m.vocab_size, padded),
        same("decoder.final_layernorm.weight", "model.norm.weight"),
    ]
    if not m.tie_embeddings:
        rules.append(vocab("output_layer.weight", "lm_head.weight", m.vocab_size, padded))
    for i in range(m.num_layers):
        ours, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        rules += [
            same(f"{ours}input_layernorm.weight", f"{hf}input_layernorm.weight"),
            same(f"{ours}pre_mlp_layernorm.weight", f"{hf}post_attention_layernorm.weight"),
            qkv(
                f"{ours}self_attention.linear_qkv.weight",
                f"{hf}self_attn.q_proj.weight",
                f"{hf}self_attn.k_proj.weight",
                f"{hf}self_attn.v_proj.weight",
                heads=heads,
                groups=groups,
                head_dim=head_dim,
            ),
            same(f"{ours}self_attention.linear_proj.weight", f"{hf}self_attn.o_proj.weight"),
        ]
        if m.qk_layernorm:
            rules += [
                same(f"{ours}self_attention.q_layernorm.weight", f"{hf}self_attn.q_norm.weight"),
                same(f"{ours}self_attention.k_layernorm.weight", f"{hf}self_attn.k_norm.weight"),
            ]
        owned = [r for c in cfg.capabilities if (r := c.hf_layer_rules(cfg, i)) is not None]
        rules += owned[0] if owned else swiglu_mlp(f"{ours}mlp.", f"{hf}mlp.", m.ffn_hidden_size)
    return rules


def _tensors_of(state: Dict[str, object]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def to_hf_tensors(cfg: RunConfig, state: Dict[str, object]) -> Dict[str, torch.Tensor]:
    """The unsharded model's state dict -> HF tensors (contiguous copies)."""
    ours = _tensors_of(state)
    out: Dict[str, torch.Tensor] = {}
    claimed = set()
    for rule in model_rules(cfg):
        if rule.ours:
            claimed.add(rule.ours)
        parts = rule.to_hf(ours[rule.ours] if rule.ours else None)
        out.update({name: t.detach().contiguous().clone() for name, t in zip(rule.hf, parts)})
    dropped = tuple(prefix for c in cfg.capabilities for prefix in c.hf_unexported(cfg))
    left = sorted(name for name in set(ours) - claimed if not name.startswith(dropped))
    if left:
        raise ValueError(f"no HF name for {len(left)} tensors of the model: {left[:6]}")
    return out


def from_hf_tensors(cfg: RunConfig, hf: Dict[str, torch.Tensor], state: Dict[str, object]) -> Dict[str, object]:
    """HF tensors -> the unsharded model's state dict (``state`` gives the names, shapes and dtypes)."""
    ours = _tensors_of(state)
    out = dict(state)
    rules = model_rules(cfg)
    missing = sorted({n for r in rules for n in r.hf} - set(hf))
    extra = sorted(set(hf) - {n for r in rules for n in r.hf})
    if missing or extra:
        raise ValueError(
            f"the HF weights do not fit the model: {len(missing)} missing ({missing[:4]}), "
            f"{len(extra)} unexpected ({extra[:4]})"
        )
    for rule in rules:
        tensor = rule.from_hf([hf[n] for n in rule.hf])
        if not rule.ours:
            continue
        target = ours[rule.ours]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"{rule.hf} -> {rule.ours}: shape {tuple(tensor.shape)}, the model has {tuple(target.shape)}"
            )
        out[rule.ours] = tensor.to(target.dtype)
    return out


def _unpack_experts(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers' packed expert tensors (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj``
    [E, H, I]) -> the Hub's per-expert layout (``experts.<e>.gate_proj.weight``, ...)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate, up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e, w in enumerate(t):
                out[f"{prefix}{e}.down_proj.weight"] = w
        else:
            out[name] = t
    return out


def load_hf_tensors(hf_dir: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a HF directory's safetensors (one file or sharded with an index)."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    tensors: Dict[str, torch.Tensor] = {}
    for name in _weight_files(hf_dir):
        tensors.update(load_file(str(hf_dir / name)))
    return _unpack_experts(tensors)


def save_hf_tensors(tensors: Dict[str, torch.Tensor], output: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write safetensors shards of at most ``max_shard_bytes`` (one file when they fit, else an index)."""
    from safetensors.torch import save_file

    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(output / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(output / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (output / WEIGHTS_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )


def _copy_files(source: Path, dest: Path, names) -> None:
    for name in names:
        if (source / name).is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, dest / name)


# -- import --------------------------------------------------------------------------------------------
def import_config(hf_dir: Path, output: Path, config_path: Optional[Path] = None) -> RunConfig:
    """The run config of an import: the HF config's sections over ``config_path``'s (which must agree
    with them where it sets a field); files the sections name are written to ``output``."""
    from megatron_ext.config import from_dict, load_yaml

    base = load_yaml(config_path) if config_path is not None else {}
    problems: List[str] = []
    derived = sections_from_hf(read_hf_config(hf_dir), output, problems)
    if not problems:
        problems = conflicts(
            derived, lambda s, f: (f in (base.get(s) or {}), (base.get(s) or {}).get(f)), str(config_path)
        )
    if problems:
        raise ConfigError([f"{hf_dir}: {p}" for p in problems])
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for section, values in derived.items():
        data.setdefault(section, {}).update(values)
    data.setdefault("name", Path(hf_dir).resolve().name)
    return from_dict(RunConfig, data)


def import_hf(hf_dir: Path, output: Path, config_path: Optional[Path] = None) -> Path:
    """Write the run directory ``output`` (config.yaml, tokenizer/, a step-0 checkpoint) holding the
    HF model of ``hf_dir``; returns the checkpoint. Needs a one-process parallel state."""
    from megatron_ext.config import dump_yaml
    from megatron_ext.run.builder import build_model, unsharded
    from megatron_ext.training.checkpoint import CheckpointManager, CommonState

    hf_dir, output = Path(hf_dir), Path(output)
    check_hf_dir(hf_dir)
    hf_weights = count_hf_weights(hf_dir)  # every header read and checked before anything is written
    if (output / "checkpoints").exists():
        raise FileExistsError(f"{output} already holds checkpoints: import into a new directory")
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    try:
        cfg = unsharded(import_config(hf_dir, output, config_path))
        check_sizes_fit(cfg, hf_weights, hf_dir)
        with torch.device("cpu"):
            (model,) = build_model(cfg, cuda=False, perform_initialization=False)
        model.load_state_dict(from_hf_tensors(cfg, load_hf_tensors(hf_dir), model.state_dict()), strict=True)
        _copy_files(hf_dir, output / TOKENIZER_DIR, TOKENIZER_FILES)
        dump_yaml(cfg, output / "config.yaml")
        hf = read_hf_config(hf_dir)
        common = CommonState(imported_from={"hf_dir": str(hf_dir), "model_type": hf.get("model_type")})
        return CheckpointManager(output / "checkpoints", keep_last=1).save(0, [model], None, common)
    except BaseException:
        if created:  # nothing half-written stays behind
            shutil.rmtree(output, ignore_errors=True)
        raise


PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")


def check_hf_dir(hf_dir: Path) -> None:
    """Refuse, naming what is wrong, a directory that is not a HF model directory with safetensors
    weights and a readable config.json (pickled weights are never loaded: unpickling runs code)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir} is not a directory: pass a HF model directory (--hf-dir)")
    if not is_hf_dir(hf_dir):
        pickled = [name for name in PICKLED_WEIGHTS if (hf_dir / name).exists()] + sorted(
            p.name for p in hf_dir.glob("pytorch_model-*.bin")
        )
        if pickled:
            raise ValueError(
                f"{hf_dir} holds pickled PyTorch weights ({', '.join(pickled[:3])}) and no safetensors; they are "
                "never loaded here (unpickling a file runs its code): convert them with transformers from a source "
                "you trust (model.save_pretrained(DIR, safe_serialization=True)) and import DIR"
            )
        raise FileNotFoundError(f"{hf_dir} is not a HF model directory (config.json and *.safetensors)")
    try:
        config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise ValueError(f"{hf_dir / 'config.json'} is not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{hf_dir / 'config.json'} holds a {type(config).__name__}, not a JSON object")


def _weight_files(hf_dir: Path) -> List[str]:
    """The safetensors files of ``hf_dir``: those its index names (plain names in the directory), else all."""
    index = hf_dir / WEIGHTS_INDEX
    if not index.is_file():
        return sorted(p.name for p in hf_dir.glob("*.safetensors"))
    try:
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{index} is not a safetensors index (weight_map of tensor names to files): {err!r}") from None
    strays = [f for f in files if not isinstance(f, str) or Path(f).name != f or not f.endswith(".safetensors")]
    if strays:
        raise ValueError(f"{index} names files that are not safetensors files of {hf_dir}: {strays[:3]}")
    return files


def count_hf_weights(hf_dir: Path) -> int:
    """Elements of every tensor of ``hf_dir``'s safetensors, from their headers alone (no data read);
    a file that is missing or not a well-formed safetensors file is refused naming it."""
    from math import prod

    from safetensors import safe_open

    total = 0
    for name in _weight_files(Path(hf_dir)):
        path = Path(hf_dir) / name
        try:
            with safe_open(str(path), framework="pt") as weights:
                total += sum(prod(weights.get_slice(key).get_shape()) for key in weights.keys())
        except Exception as err:  # safetensors raises its own SafetensorError, or OSError
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(
                f"{path} is not a readable safetensors file ({reason}): download or re-save the weights"
            ) from None
    return total


def check_sizes_fit(cfg: RunConfig, hf_weights: int, hf_dir: Path) -> None:
    """Refuse a config.json whose sizes describe a model larger than its weights: the embedding and the
    attention projections alone (a lower bound of every supported architecture) must fit in the
    elements the safetensors hold, before any memory is allocated for the model."""
    m = cfg.model
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    attention = m.hidden_size * head_dim * (2 * m.num_attention_heads + 2 * groups)
    least = m.vocab_size * m.hidden_size + m.num_layers * attention
    if least > hf_weights:
        raise ValueError(
            f"{Path(hf_dir) / 'config.json'} describes a model of at least {least:,} weights (hidden_size "
            f"{m.hidden_size}, {m.num_layers} layers, vocabulary {m.vocab_size}), but its safetensors hold "
            f"{hf_weights:,}: the config does not belong to these weights"
        )


def convert_for_init(hf_dir: Path, run_dir: Path, cfg: RunConfig) -> Path:
    """``train.init_from: <HF directory>``: the HF weights as a checkpoint of this project under
    ``run_dir/init_from_hf/`` (converted once, in a one-process job on CPU started by rank 0), for
    every rank to load at its layout. Called on every rank."""
    from megatron_ext.config import dump_yaml
    from megatron_ext.run.checks import checkpoint_dir

    target = Path(run_dir) / INIT_FROM_HF_DIR
    error = None
    if dist.get_rank() == 0 and checkpoint_dir(target) is None:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        dump_yaml(cfg, target / "run_config.yaml")
        env = {
            k: v
            for k, v in os.environ.items()
            if k
            not in (
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "LOCAL_WORLD_SIZE",
                "MASTER_ADDR",
                "MASTER_PORT",
                "GROUP_RANK",
                "ROLE_RANK",
                "TORCHELASTIC_RUN_ID",
            )
            and not k.startswith("TORCHELASTIC_")
        }
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU conversion, whatever the job runs on
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pretrain.hf",
                "import",
                "--hf-dir",
                str(hf_dir),
                "--output",
                str(target / "run"),
                "--config",
                str(target / "run_config.yaml"),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            error = f"converting {hf_dir} failed:\n{done.stderr[-3000:]}"
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise RuntimeError(box[0])
    return checkpoint_dir(target / "run")


# -- export --------------------------------------------------------------------------------------------
def hf_config_of(cfg: RunConfig, callbacks: Dict[str, object], dtype: str) -> tuple[Dict[str, object], bool]:
    """The HF ``config.json`` of ``cfg``'s trained model and whether it needs this project's remote
    code; raises ConfigError listing what cannot be represented."""
    hf, problems = dense_hf_config(cfg, dtype)
    for capability in cfg.capabilities:
        problems += capability.hf_config(cfg, callbacks.get(capability.name), hf)
    remote = resolve_architecture(hf, problems) if not problems else False
    if problems:
        raise ConfigError([f"cannot export {cfg.name}: {p}" for p in problems])
    return hf, remote


def export_hf(run_dir: Path, output: Path, step: Optional[int] = None) -> Path:
    """Write ``output``: config.json, safetensors, the run's tokenizer files and, where no stock class
    represents the model, ``modeling_hybrid.py`` (load with ``trust_remote_code=True``). Needs a
    one-process parallel state."""
    from megatron_ext.run.builder import params_dtype, unsharded
    from megatron_ext.run.schedule import trained_config
    from megatron_ext.training.evaluate import load_trained

    run_dir, output = Path(run_dir), Path(output)
    earlier = check_export_output(output)  # before any work: never replace what an export did not write
    cfg = unsharded(trained_config(run_dir, step))
    (model,), callbacks, _ = load_trained(cfg, run_dir, step)
    dtype = "bfloat16" if params_dtype(cfg, cuda=False) == torch.bfloat16 else "float32"
    hf, remote = hf_config_of(cfg, callbacks, dtype)
    tensors = to_hf_tensors(cfg, model.state_dict())
    # Written beside the output (a directory of its own), then moved into place: a failure leaves no
    # half-written HF directory.
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        save_hf_tensors(tensors, tmp)
        (tmp / "config.json").write_text(json.dumps(hf, indent=1))
        if remote:
            shutil.copy2(Path(__file__).parent.parent / "hf" / REMOTE_CODE_FILE, tmp / REMOTE_CODE_FILE)
        _copy_files(run_dir / TOKENIZER_DIR, tmp, TOKENIZER_FILES)
        _export_run_tokenizer(cfg, run_dir, tmp)
        written = sorted(p.name for p in tmp.iterdir())
        (tmp / EXPORT_RECORD).write_text(json.dumps({"run_dir": str(run_dir), "files": written}, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if earlier is None:
        os.replace(tmp, output)
        return output
    for name in earlier:  # an earlier export: its own files go, anything else stays
        (output / name).unlink(missing_ok=True)
    for entry in tmp.iterdir():
        os.replace(entry, output / entry.name)
    tmp.rmdir()
    return output


def _export_run_tokenizer(cfg: RunConfig, run_dir: Path, output: Path) -> None:
    """The run's tokenizer as HF tokenizer files in ``output``, where the run holds none of its own
    (it was not imported from HF): ``data.tokenizer`` or the built-in corpus's, of whatever kind
    (:func:`~megatron_ext.data.tokenizers.save_hf_tokenizer`). Runs on token ids alone export none."""
    from megatron_ext.data.tokenizers import is_tokenizer_dir, save_hf_tokenizer
    from megatron_ext.inference.generate import run_tokenizer

    if is_tokenizer_dir(run_dir / TOKENIZER_DIR):
        return
    tokenizer = run_tokenizer(cfg, run_dir)
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, output)


EXPORT_RECORD = "megatron_ext_export.json"
"""Written last into every export directory: the files the export wrote (the only ones a later export
into the same directory replaces)."""


def check_export_output(output: Path) -> Optional[List[str]]:
    """Where an export may write: a new directory (None), an empty one ([]) or an earlier export's,
    whose own files are returned (the new export replaces those alone). Anything else raises
    FileExistsError."""
    output = Path(output)
    if not output.exists():
        return None
    if not output.is_dir():
        raise FileExistsError(f"--output {output} is a file: pass a new directory")
    entries = sorted(p.name for p in output.iterdir())
    if not entries:
        return []
    record = output / EXPORT_RECORD
    files = None
    if record.is_file():
        try:
            files = json.loads(record.read_text())["files"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            files = None
        if not isinstance(files, list) or not all(isinstance(f, str) and f == Path(f).name for f in files):
            files = None
    if files is None:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(
            f"--output {output} exists and is not an earlier export ({len(entries)} entries: {shown}); nothing "
            "was written: pass a new or empty directory"
        )
    return [*files, EXPORT_RECORD]
