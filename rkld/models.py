"""Causal language models for the pipeline: loading, tiny models, and the final hidden state.

Public API:
    load_model(path_or_name, dtype=None) -> (model, tokenizer)
        Any Hugging Face causal LM from a local folder (or the hub, with network), a .gguf file
        or a known name such as ``smollm2-135m`` (converted once, ``rkld.pretrained``). A
        tokenizer without a pad token gets its EOS token as pad (the vocabulary is unchanged).
    build_tiny_model(texts, out_dir=None, seed=0, **config) -> (model, tokenizer)
        A small Llama with a byte-level BPE tokenizer trained in-process on ``texts``; saved with
        ``save_pretrained`` to ``out_dir`` when given, so later stages load it like any model.
    train_tokenizer(texts, vocab_size=1024) -> PreTrainedTokenizerFast  (<pad>, <bos>, <eos>)
    output_head(model) -> (weight, bias)       the lm_head parameters (bias may be None)
    final_hidden(model, input_ids, attention_mask, position_ids=None) -> hidden [B, T, H]
        The input of the lm_head, captured by a forward pre-hook on
        ``get_output_embeddings()``; the head itself then only projects one position.
    supervised_positions(hidden, labels) -> (hidden_rows [n, H], targets [n])
        Shift to next-token targets and keep the supervised positions, in row-major order.
    check_logits_are_linear(model)
        Refuse (ValueError) models whose logits are not ``lm_head(hidden)``: final-logit
        soft-capping, logit scaling, scaled tied embeddings... by config and by a probe forward.
    check_config_logits(config, name)   the config part alone, before any weight is loaded
    check_same_vocabulary(tokenizer_a, tokenizer_b, what_a, what_b)
    unwrap_model(model) -> the Hugging Face model inside DDP / peft wrappers
    model_fingerprint(path_or_name) -> sha256 of a local model's weight, config and tokenizer
        files (the hub name itself for a hub id)
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch

from .data import IGNORE_INDEX

TINY_DEFAULTS = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "intermediate_size": 172, "max_position_embeddings": 512}
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")

# Config attributes by which some architectures transform logits after the lm_head. A value
# that is neither None nor 1 means the logits are not lm_head(hidden).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                     "output_multiplier_scale", "logit_softcapping")


# The longest run of non-whitespace characters that the tiny tokenizer keeps as one pre-token.
PRE_TOKEN_CHARS = 32
# The command-line options of the tiny model's settings (rkld finetune --model tiny).
TINY_FLAGS = {"vocab_size": "--tiny-vocab", "hidden_size": "--tiny-hidden",
              "num_hidden_layers": "--tiny-layers", "intermediate_size": "--tiny-intermediate"}
# The byte-level tokenizer's base alphabet (256 bytes) and its special tokens.
MIN_TINY_VOCAB = 256 + len(SPECIAL_TOKENS)


def check_tiny_settings(tiny: dict) -> None:
    """Refuse tiny-model settings a Llama cannot be built with, naming the option: sizes must
    be positive integers, the hidden size a multiple of the attention heads, and the vocabulary
    at least the byte alphabet plus the special tokens."""
    settings = {**TINY_DEFAULTS, "vocab_size": 1024, **tiny}

    def name(key):
        return f"{TINY_FLAGS[key]} ({key})" if key in TINY_FLAGS else key

    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                "num_attention_heads"):
        value = settings.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"tiny model: {name(key)} must be a positive integer; got "
                             f"{value!r}")
    if settings["vocab_size"] < MIN_TINY_VOCAB:
        raise ValueError(f"tiny model: {name('vocab_size')} must be at least {MIN_TINY_VOCAB} "
                         f"(the tokenizer's 256 byte tokens and {', '.join(SPECIAL_TOKENS)}); "
                         f"got {settings['vocab_size']}")
    heads = settings["num_attention_heads"]
    if settings["hidden_size"] % heads or (settings["hidden_size"] // heads) % 2:
        raise ValueError(f"tiny model: {name('hidden_size')} must be a multiple of "
                         f"{2 * heads} ({heads} attention heads of an even width, for rotary "
                         f"positions); got {settings['hidden_size']}")


def train_tokenizer(texts, vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on ``texts`` (any string is encodable: bytes are the
    base alphabet). ``<bos>`` is prepended to every encoded text with special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer needs at least one non-empty text")
    tokenizer = Tokenizer(models.BPE())
    # Runs of more than PRE_TOKEN_CHARS characters without whitespace are cut into pieces
    # first: BPE training is superlinear in the length of a pre-token, and text without spaces
    # (some scripts, code, identifiers) would otherwise be one pre-token of its whole length.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(rf"\S{{{PRE_TOKEN_CHARS}}}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>")


def build_tiny_model(texts, out_dir=None, seed: int = 0, vocab_size: int = 1024, **config):
    """A small Llama (defaults: TINY_DEFAULTS) with a tokenizer trained on ``texts``.

    Extra keyword arguments override LlamaConfig fields (e.g. ``hidden_size=32``). The weights
    depend only on ``seed`` and the configuration. Returns ``(model, tokenizer)``; with
    ``out_dir`` both are saved there first.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    check_tiny_settings({"vocab_size": vocab_size, **config})
    tokenizer = train_tokenizer(texts, vocab_size)
    settings = {**TINY_DEFAULTS, **config}
    settings.setdefault("num_key_value_heads", settings["num_attention_heads"])
    model_config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False,
                               bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, **settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(model_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model, tokenizer


def remote_code_refused(what) -> ValueError:
    """The error for a model whose config needs code shipped with it (``auto_map``)."""
    return ValueError(f"{what}: the model needs its own code (config auto_map) to load, and rkld "
                      f"never runs code shipped with a model; use a model whose architecture "
                      f"transformers implements")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _is_tokenizer_file(name: str) -> bool:
    return (name.startswith(("tokenizer", "vocab", "spiece", "sentencepiece"))
            or name.endswith((".model", ".tiktoken")) or name == "merges.txt")


def check_model_folder(folder, what: str = "the model", weights: bool = True) -> None:
    """Refuse a local model folder that cannot load, naming the file: no config.json, no
    tokenizer files, no weights, or a weights file whose safetensors header is corrupt or
    truncated (read from the header alone, without loading any tensor)."""
    from .storage import CorruptFileError
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what} {folder}: expected a Hugging Face model folder with "
                                f"config.json (from save_pretrained); it has none")
    names = [p.name for p in folder.iterdir() if p.is_file()]
    if not any(_is_tokenizer_file(name) for name in names):
        raise FileNotFoundError(f"{what} {folder}: expected the model's tokenizer files "
                                f"(tokenizer.json, tokenizer_config.json, ...) beside "
                                f"config.json; found none (save the tokenizer into the folder "
                                f"with tokenizer.save_pretrained)")
    if not weights:
        return
    shards = sorted(folder / name for name in names if name.endswith(".safetensors"))
    if not shards and not any(name.endswith(".bin") for name in names):
        raise FileNotFoundError(f"{what} {folder}: expected its weights (model.safetensors, "
                                f"shards or pytorch_model.bin); found none")
    from safetensors import safe_open
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                f.keys()
        except Exception as err:    # safetensors' own error: header unreadable or cut short
            raise CorruptFileError(f"{shard}: the weights of {what} are corrupt or truncated "
                                   f"({_first_line(err)}); save or download the model "
                                   f"again") from None


def load_model(path_or_name, dtype=None):
    """Load ``(model, tokenizer)`` from a local folder or a hub name (hub needs network).

    ``dtype`` is a torch dtype or its name ("bfloat16"); None keeps the saved dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .pretrained import resolve_model_ref

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    source = str(resolve_model_ref(path_or_name))
    local = Path(source).expanduser()
    if local.exists():
        check_model_folder(local)
        source = str(local)
    try:
        # Never run code shipped with a model (config.auto_map), nor ask on a terminal whether to.
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto",
                                                     trust_remote_code=False)
    except ValueError as err:
        if "custom code" in str(err):
            raise remote_code_refused(source) from None
        if not local.exists():
            raise
        raise ValueError(f"could not load model {source}: {_first_line(err)}") from None
    except OSError as err:
        where = "the local folder" if local.exists() else \
            "the hub (no such local folder; the hub needs network access)"
        raise OSError(f"could not load model {source!r} from {where}: {err}") from err
    except Exception as err:    # e.g. safetensors' error for a shard the index names
        if not local.exists():
            raise
        raise ValueError(f"could not load model {source}: {_first_line(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def unwrap_model(model):
    """The Hugging Face model inside DDP and DeepSpeed (``.module``) and peft
    (``get_base_model``) wrappers."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or \
            type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def output_head(model):
    """``(weight, bias)`` of the model's lm_head; ``bias`` is None when it has none."""
    head = unwrap_model(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(unwrap_model(model)).__name__} has no output embedding "
                         f"(lm_head) with a weight; a causal LM is needed")
    return head.weight, getattr(head, "bias", None)


@contextlib.contextmanager
def capture_final_hidden(model, project_all: bool = False):
    """Capture the input of the lm_head during forward passes of ``model``.

    Yields a list that receives one ``[B, T, H]`` tensor per forward. Unless ``project_all``,
    the head then projects only the last position, so no ``[B, T, V]`` logits are allocated.
    """
    head = unwrap_model(model).get_output_embeddings()
    captured = []

    def hook(module, args):
        hidden = args[0]
        captured.append(hidden)
        if project_all:
            return None
        return (hidden[..., -1:, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(hook, prepend=True)
    try:
        yield captured
    finally:
        handle.remove()


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The final hidden state (input of the lm_head) for every position: ``[B, T, H]``.

    ``position_ids`` mark packed documents (``rkld.packing``); the model must then use
    per-document attention, or a token would attend across its document's boundary."""
    extra = {}
    if position_ids is not None:
        from .packing import uses_document_attention
        if not uses_document_attention(model):
            raise ValueError("packed examples (position_ids) need per-document attention: call "
                             "rkld.packing.use_document_attention(model) first")
        extra = {"position_ids": position_ids}
    with capture_final_hidden(model) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    if len(captured) != 1:
        raise RuntimeError(f"expected the lm_head to run once per forward; it ran "
                           f"{len(captured)} times")
    return captured[0]


def supervised_positions(hidden: torch.Tensor, labels: torch.Tensor):
    """Rows of ``hidden`` whose next-token label is supervised, and those labels.

    ``labels`` follow the Hugging Face convention (``labels[:, t]`` is the token at ``t``), so
    position ``t`` predicts ``labels[:, t + 1]``. Rows come out example by example, position
    ascending: the order the teacher cache stores them in.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


def check_config_logits(config, name: str) -> None:
    """Raise ValueError if a model configuration declares a transformation of the logits after
    the lm_head (soft-capping, scaling). Cheap: needs the config only, not the weights."""
    configs = [config] + [getattr(config, key) for key in ("text_config",)
                          if getattr(config, key, None) is not None]
    for cfg in configs:
        for attr in _LOGIT_TRANSFORMS:
            value = getattr(cfg, attr, None)
            if value is not None and value != 1:
                raise ValueError(
                    f"{name}: config.{attr} = {value}, so its logits are not lm_head(hidden); "
                    f"the fused RKL loss would optimise a different objective. Models with "
                    f"final-logit soft-capping or logit scaling are not supported")


def check_logits_are_linear(model, atol: float | None = None) -> None:
    """Raise ValueError unless the model's logits are exactly ``lm_head(hidden)``.

    The fused losses rebuild logits as ``hidden @ W.T + b``; a model that soft-caps or scales
    its logits would silently be trained on another objective. Checks known config attributes,
    then compares a probe forward's logits with the projection of its captured hidden state.
    """
    hf_model = unwrap_model(model)
    check_config_logits(hf_model.config, type(hf_model).__name__)
    weight, bias = output_head(hf_model)
    if weight.device.type == "meta":
        return
    partitioned = hasattr(weight, "ds_id")     # ZeRO-3: the forward gathers, every process runs it
    probe_length = 5
    vocab = weight.ds_shape[0] if partitioned else weight.shape[0]
    input_ids = (torch.arange(probe_length, device=weight.device) * 7 + 3) % vocab
    input_ids = input_ids.unsqueeze(0)
    was_training = hf_model.training
    hf_model.eval()
    try:
        with torch.no_grad(), capture_final_hidden(hf_model, project_all=True) as captured:
            logits = hf_model(input_ids=input_ids, use_cache=False).logits
    finally:
        hf_model.train(was_training)
    with _gathered([weight, bias] if partitioned else []):
        rebuilt = torch.nn.functional.linear(captured[0].float(), weight.float(),
                                             None if bias is None else bias.float())
    logits = logits.float()
    if atol is None:
        atol = 1e-4 if weight.dtype == torch.float32 else 5e-2
    scale = rebuilt.abs().max().clamp(min=1.0)
    error = (logits - rebuilt).abs().max() / scale
    if logits.shape != rebuilt.shape or not error <= atol:
        raise ValueError(
            f"{type(hf_model).__name__}: its logits differ from lm_head(final hidden state) "
            f"(relative max difference {error.item():.3g}); the model transforms logits after "
            f"the head (soft-capping, scaling, scaled tied embeddings), which the fused RKL "
            f"loss does not reproduce")


def _gathered(params):
    if not params:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters([p for p in params if p is not None])


def check_same_vocabulary(tokenizer_a, tokenizer_b, what_a: str, what_b: str) -> None:
    """Raise ValueError unless two tokenizers map the same strings to the same ids."""
    size_a, size_b = len(tokenizer_a), len(tokenizer_b)
    if size_a != size_b:
        raise ValueError(f"{what_a} and {what_b} must share one tokenizer; their vocabularies "
                         f"have {size_a} and {size_b} entries")
    if tokenizer_a.get_vocab() != tokenizer_b.get_vocab():
        raise ValueError(f"{what_a} and {what_b} must share one tokenizer; their vocabularies "
                         f"have the same size but map tokens to different ids")


def _is_model_file(name: str) -> bool:
    """Weights, configuration and tokenizer files; not the run records that stages and
    evaluations write next to a model."""
    return (name.endswith((".safetensors", ".bin", ".model", ".jinja", "merges.txt"))
            or name in ("config.json", "generation_config.json", "special_tokens_map.json",
                        "vocab.json", "added_tokens.json", "model.safetensors.index.json")
            or (name.startswith("tokenizer") and name.endswith(".json")))


def model_fingerprint(model_ref) -> str:
    """sha256 over a local model folder's weight, config and tokenizer files (names and
    contents), or over the name itself for a hub model id."""
    path = Path(str(model_ref)).expanduser()
    digest = hashlib.sha256()
    if not path.is_dir():
        digest.update(f"hub:{model_ref}".encode())
        return digest.hexdigest()
    for file in sorted(p for p in path.iterdir() if p.is_file() and _is_model_file(p.name)):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()
