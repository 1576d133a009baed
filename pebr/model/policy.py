"""The policy: a Qwen2.5-VL model, its tokenizer and its image preprocessing, as one object.

    policy = build_tiny_policy(seed=0)           # random-init tiny Qwen2.5-VL + tokenizer built here
    policy = load_policy("path/to/hf_folder")    # any Qwen2-VL / Qwen2.5-VL folder (safetensors)
    batch = policy.encode_prompts(images, problems)   # left-padded prompt ids + vision inputs
    batch = policy.encode_prompts([[a, b], c], problems)  # a prompt may show several images
    policy.save(folder)                          # save_pretrained: model, tokenizer, preprocessor

Prompts go through the tokenizer's chat template (the prompt's images, in order, then the text);
each image's <|image_pad|> is expanded to that image's token count, as Qwen's processor does.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from pebr.data.prompts import build_prompt
from pebr.model.image_encoder import ImageEncoder


@dataclasses.dataclass(frozen=True)
class TinySize:
    """Sizes of the built-in tiny Qwen2.5-VL (random init): a few M parameters, fast on 2 CPU cores."""

    hidden_size: int = 128  # text width
    intermediate_size: int = 384  # text MLP width
    num_hidden_layers: int = 4  # text depth: enough to copy image facts into words
    num_attention_heads: int = 4  # head_dim 32 -> mrope_section [4, 6, 6]
    num_key_value_heads: int = 2  # GQA as in Qwen2.5
    vision_depth: int = 2  # vision blocks
    vision_hidden_size: int = 64  # vision width
    vision_heads: int = 4
    vision_intermediate_size: int = 128
    vocab_size: int = 768  # learned BPE vocabulary (special tokens come on top)
    image_size: int = 112  # procedural images are 112 x 112 -> 8 x 8 patches -> 16 image tokens


@dataclasses.dataclass
class PromptBatch:
    """P prompts, left-padded, showing I images in all (prompt p shows images_per_prompt[p] >= 1).

    input_ids / attention_mask / mm_token_type_ids: [P, L]
    pixel_values: [N, C*Tp*P*P], N = sum over the I images of prod(image_grid_thw[i])
    image_grid_thw: [I, 3]
    images_per_prompt: [P] int64, summing to I (default: one image per prompt)

    Images are in prompt order, and within a prompt in the order its text shows them: the layout
    transformers' Qwen2-VL / 2.5-VL take (they walk the image tokens of the flattened batch and
    the rows of image_grid_thw together). `select` takes a subset of prompts with their rows.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    images_per_prompt: torch.Tensor | None = None

    def __post_init__(self):
        P, I = self.input_ids.shape[0], self.image_grid_thw.shape[0]
        if self.images_per_prompt is None:  # the one-image layout every caller had before several images
            self.images_per_prompt = torch.ones(P, dtype=torch.long, device=self.image_grid_thw.device)
        counts = self.images_per_prompt
        if counts.shape != (P,) or int(counts.sum()) != I or bool((counts < 1).any()):
            raise ValueError(f"images_per_prompt must hold P={P} counts >= 1 summing to the {I} rows of "
                             f"image_grid_thw, got {counts.tolist()}")

    def image_index(self, prompts: list[int]) -> torch.Tensor:
        """Rows of image_grid_thw (images) of these prompts, in the order given: [sum of their counts]."""
        counts = self.images_per_prompt.tolist()
        starts = _starts(counts)
        return _ranges([(starts[p], counts[p]) for p in prompts])

    def pixel_index(self, prompts: list[int]) -> torch.Tensor:
        """Rows of pixel_values of these prompts: each image owns prod(grid_thw) consecutive rows."""
        sizes = self.image_grid_thw.prod(-1).tolist()
        starts = _starts(sizes)
        return _ranges([(starts[i], sizes[i]) for i in self.image_index(prompts).tolist()])

    def select(self, prompts: list[int]) -> "PromptBatch":
        """These prompts only (in the order given), with their images' grid and pixel rows."""
        dev = self.pixel_values.device
        return PromptBatch(
            input_ids=self.input_ids[prompts],
            attention_mask=self.attention_mask[prompts],
            mm_token_type_ids=self.mm_token_type_ids[prompts],
            pixel_values=self.pixel_values[self.pixel_index(prompts).to(dev)],
            image_grid_thw=self.image_grid_thw[self.image_index(prompts).to(self.image_grid_thw.device)],
            images_per_prompt=self.images_per_prompt[prompts],
        )

    def to(self, device) -> "PromptBatch":
        return PromptBatch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def _starts(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def _ranges(spans: list[tuple[int, int]]) -> torch.Tensor:
    """(start, length) spans -> the concatenated aranges, int64."""
    if not spans:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(s, s + n, dtype=torch.long) for s, n in spans])


@dataclasses.dataclass
class Policy:
    model: torch.nn.Module  # Qwen2_5_VLForConditionalGeneration (or Qwen2-VL)
    tokenizer: object  # a Qwen2 tokenizer with the Qwen-VL special tokens, left padding
    images: ImageEncoder  # the preprocessing the model was trained with
    adapter: object | None = None  # LoRA: the PeftModel around `model` (adapted in place; pebr.model.lora)
    base_path: str | None = None  # LoRA: the folder of the frozen base, recorded with every saved adapter

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def eos_ids(self) -> list[int]:
        ids = {self.tokenizer.convert_tokens_to_ids("<|im_end|>"), self.tokenizer.eos_token_id}
        return sorted(i for i in ids if i is not None)

    @property
    def vision_token_ids(self) -> list[int]:
        """<|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>: never generated."""
        hf_config = self.model.config
        names = ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")
        return sorted({int(getattr(hf_config, n)) for n in names if getattr(hf_config, n, None) is not None})

    @property
    def never_sampled_ids(self) -> list[int]:
        """Ids a rollout never samples: the vision tokens (an <|image_pad|> in a response would be read as
        an image slot) and the rows of the LM head past the tokenizer, which no text decodes to (Qwen's
        151,936-row head has 271 such rows, a real-width model on our tokenizer ~151,000)."""
        vocab = self.model.get_output_embeddings().weight.shape[0]
        return sorted(set(self.vision_token_ids) | set(range(len(self.tokenizer), vocab)))

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.eos_ids[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt_text(self, problem: str, *, num_images: int = 1) -> str:
        """The chat-formatted prompt (its `num_images` images, then `build_prompt(problem)`), ready for the answer."""
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": build_prompt(problem)}]
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode_items(self, items) -> PromptBatch:
        """P task items (anything with `.images` and `.problem`, as pebr.data.tasks.TaskItem) ->
        their prompts, as encode_prompts builds them."""
        return self.encode_prompts([it.images for it in items], [it.problem for it in items])

    def encode_prompts(self, images, problems) -> PromptBatch:
        """images: P entries, each one PIL image or a list of PIL images (the prompt's images, in
        order); problems: P strings -> PromptBatch (left-padded, images in prompt order)."""
        if len(images) != len(problems):
            raise ValueError(f"images ({len(images)}) and problems ({len(problems)}) must have the same length")
        per_prompt = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        empty = [p for p, ims in enumerate(per_prompt) if not ims]
        if empty:
            raise ValueError(f"every prompt needs at least one image; prompts {empty} have none")
        # One call for every image of the batch: the same pixel rows as one call per prompt.
        pixel_values, grid = self.images([im for ims in per_prompt for im in ims])
        n_tok = self.images.num_tokens(grid).tolist()
        pad_tok = "<|image_pad|>"
        rows, first = [], 0
        for problem, ims in zip(problems, per_prompt):
            parts = self.prompt_text(problem, num_images=len(ims)).split(pad_tok)
            if len(parts) - 1 != len(ims):
                raise ValueError(f"the chat template must place one {pad_tok} per image ({len(ims)}), "
                                 f"got {len(parts) - 1}")
            counts, first = n_tok[first : first + len(ims)], first + len(ims)
            # The k-th placeholder becomes the k-th image's tokens (one image: text.replace(pad, pad * n)).
            text = parts[0] + "".join(pad_tok * n + rest for n, rest in zip(counts, parts[1:]))
            rows.append(self.tokenizer(text, add_special_tokens=False).input_ids)
        ids, mask = left_pad(rows, pad_id=self.pad_id)
        return PromptBatch(
            input_ids=ids,
            attention_mask=mask,
            mm_token_type_ids=(ids == self.image_token_id).to(torch.int32),
            pixel_values=pixel_values.to(self.model.dtype),
            image_grid_thw=grid,
            images_per_prompt=torch.tensor([len(ims) for ims in per_prompt], dtype=torch.long),
        )

    def save(self, folder: str | os.PathLike, *, state_dict: dict | None = None, merged: bool = True) -> None:
        """save_pretrained of the model (safetensors), tokenizer and preprocessor into `folder`.
        state_dict: the full weights to write (gathered from FSDP shards); default the model's own.

        With LoRA (`adapter`): the adapter in PEFT's format under folder/adapter (its base recorded),
        and with `merged` the plain model with the adapters merged in (W + (alpha/r) B A), which
        transformers loads alone; without it no model weights (a checkpoint mid-stage: the adapter
        and the base folder are the policy, `load_policy` merges them). state_dict then needs only
        the adapter's tensors unless `merged`."""
        os.makedirs(folder, exist_ok=True)
        if self.adapter is None:
            self.model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
        else:
            from pebr.model.lora import (
                ADAPTER_DIR,
                lora_scaling,
                merged_state_dict,
                save_adapter,
            )

            if state_dict is None:
                state_dict = {k: v.detach() for k, v in self.model.state_dict().items()}
            save_adapter(self.adapter, os.path.join(folder, ADAPTER_DIR), state_dict=state_dict, base=self.base_path)
            if merged:
                plain = merged_state_dict(state_dict, scaling=lora_scaling(self.model))
                self.model.save_pretrained(folder, safe_serialization=True, state_dict=plain)
        self.tokenizer.save_pretrained(folder)
        self.images.save(folder)


def left_pad(rows: list[list[int]], *, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows of token ids -> (ids [R, L], attention_mask [R, L]), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's mrope splits the rotary half-dims over (t, h, w): a quarter to t, the rest halved."""
    half = head_dim // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def tiny_config(tokenizer, size: TinySize = TinySize()):
    """A Qwen2_5_VLConfig of `size` whose special-token ids are `tokenizer`'s."""
    from transformers import Qwen2_5_VLConfig

    from pebr.model.tokenizer import special_ids

    ids = special_ids(tokenizer)
    mrope = mrope_section(size.hidden_size // size.num_attention_heads)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
    )
    text_ids, model_ids = token_id_fields(ids)
    vision = dict(
        depth=size.vision_depth,
        hidden_size=size.vision_hidden_size,
        intermediate_size=size.vision_intermediate_size,
        num_heads=size.vision_heads,
        out_hidden_size=size.hidden_size,
        window_size=112,
        fullatt_block_indexes=[size.vision_depth - 1],
    )
    return Qwen2_5_VLConfig(text_config={**text, **text_ids}, vision_config=vision, tie_word_embeddings=False, **model_ids)


def token_id_fields(ids: dict) -> tuple[dict, dict]:
    """A tokenizer's special ids (pebr.model.tokenizer.special_ids) -> (the text config's end, pad
    and bos ids; the model config's image, video and vision-marker ids)."""
    text = dict(bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    model = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                 vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return text, model


def build_tiny_policy(*, seed: int = 0, size: TinySize = TinySize(), corpus=None) -> Policy:
    """A random-init tiny Qwen2.5-VL with a BPE tokenizer learned from `corpus` (default: the
    built-in tasks' prompts and responses, pebr.data.tasks.task_corpus)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pebr.model.tokenizer import build_tokenizer

    if corpus is None:
        from pebr.data.tasks import task_corpus

        corpus = task_corpus()
    tok = build_tokenizer(corpus=corpus, vocab_size=size.vocab_size)
    cfg = tiny_config(tok, size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = cfg.text_config.eos_token_id
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    side = size.image_size * size.image_size
    images = ImageEncoder(min_pixels=min(56 * 56, side), max_pixels=max(side, 56 * 56))
    return Policy(model=use_engine_kernels(model), tokenizer=tok, images=images)


# Every load of a model folder: its files only, and never its Python (a folder is data, possibly untrusted).
LOCAL_NO_CODE = dict(trust_remote_code=False, local_files_only=True)


def load_model_config(path: str | os.PathLike):
    """The transformers config of model folder `path`. CheckpointError (a ValueError) naming the file
    when config.json is missing or not JSON, and when it names custom code (`auto_map`): pebr never
    runs a folder's code, and transformers would otherwise ask on a terminal whether to."""
    import json

    from transformers import AutoConfig

    from pebr.errors import CheckpointError

    path = os.fspath(path)
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"model path {path!r} is not a Hugging Face model folder (no config.json)")
    try:
        with open(file, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not a readable JSON config ({exc})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{file}: not a model config (a JSON object is expected)")
    if doc.get("auto_map"):
        raise CheckpointError(f"{file} names custom code (auto_map: {', '.join(map(str, doc['auto_map']))[:200]}); "
                              f"pebr loads only transformers' own Qwen2-VL / Qwen2.5-VL classes and never runs a "
                              f"model folder's Python: remove auto_map if the folder is a plain Qwen2(.5)-VL")
    return AutoConfig.from_pretrained(path, **LOCAL_NO_CODE)


def load_policy(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu") -> Policy:
    """A Qwen2-VL / Qwen2.5-VL HF folder (config.json, safetensors, tokenizer files) -> Policy.
    A LoRA checkpoint of mid-stage (an adapter, no model weights) loads as its base with the adapter
    merged in (load_adapted_policy)."""
    path = os.fspath(path)
    if is_adapter_only(path):
        return load_adapted_policy(path, dtype=dtype, device=device)
    cfg = load_model_config(path)
    if cfg.model_type == "qwen2_vl":
        from transformers import Qwen2VLForConditionalGeneration as cls
    elif cfg.model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration as cls
    else:
        raise ValueError(f"model at {path!r} is a {cfg.model_type!r}; a Qwen2-VL or Qwen2.5-VL model is expected")
    model = cls.from_pretrained(path, dtype=dtype, **LOCAL_NO_CODE).to(device)
    return Policy(model=use_engine_kernels(model), tokenizer=load_tokenizer(path), images=ImageEncoder.from_folder(path))


def is_adapter_only(path: str | os.PathLike) -> bool:
    """Whether `path` is a LoRA checkpoint without model weights: an adapter/ folder, no config.json."""
    from pebr.model.lora import ADAPTER_DIR

    path = os.fspath(path)
    return (not os.path.isfile(os.path.join(path, "config.json"))
            and os.path.isfile(os.path.join(path, ADAPTER_DIR, "adapter_config.json")))


def adapter_base(path: str | os.PathLike) -> str:
    """The base model folder a LoRA checkpoint's adapter names (its adapter_config.json).
    CheckpointError when the file is unreadable or the folder is gone."""
    import json

    from pebr.errors import CheckpointError
    from pebr.model.lora import ADAPTER_DIR

    adapter = os.path.join(os.fspath(path), ADAPTER_DIR)
    try:
        with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{adapter}: adapter_config.json is unreadable ({type(exc).__name__})") from None
    if not base or not os.path.isdir(base):
        raise CheckpointError(f"{os.fspath(path)} is a LoRA checkpoint whose base model folder {base!r} is gone; "
                              f"restore it, or load a stage's final checkpoint (it holds the merged model)")
    return base


def load_adapted_policy(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu") -> Policy:
    """A LoRA checkpoint folder (path/adapter in PEFT's format, naming its base folder) -> the base
    Policy with the adapter merged into its weights (a plain model: generation runs at full speed).
    CheckpointError when the adapter's base folder is gone."""
    from peft import PeftModel

    from pebr.model.lora import ADAPTER_DIR

    adapter = os.path.join(os.fspath(path), ADAPTER_DIR)
    policy = load_policy(adapter_base(path), dtype=dtype, device=device)
    merged = PeftModel.from_pretrained(policy.model, adapter, is_trainable=False).merge_and_unload()
    return dataclasses.replace(policy, model=merged)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of HF folder `path` as the trainer uses it: left padding, a pad token, and our
    chat template where the folder has none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(os.fspath(path), **LOCAL_NO_CODE)
    except (ValueError, OSError) as exc:  # a malformed tokenizer.json raises a bare JSON error otherwise
        from pebr.errors import CheckpointError

        raise CheckpointError(f"{os.fspath(path)}: its tokenizer files do not load ({type(exc).__name__}: {exc})") from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = "<|endoftext|>"
    if tok.chat_template is None:
        from pebr.model.tokenizer import CHAT_TEMPLATE

        tok.chat_template = CHAT_TEMPLATE
    return tok


def use_engine_kernels(model):
    """Route the vision patch embedding through `engine.ops.patch_embed` (parameters and their
    names unchanged, so checkpoints save and load as before), and give a head tied to the input
    embedding one dense gradient, not two (pebr.model.tied_embedding). Returns `model`."""
    from engine.patching import patch_model
    from pebr.model.tied_embedding import install_tied_embedding_grad

    model = patch_model(model)
    install_tied_embedding_grad(model)
    return model
