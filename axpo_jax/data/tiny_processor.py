"""A tiny but real Qwen3-VL tokenizer + processor folder, built locally.

No checkpoint can be downloaded in tests or in the demo, so `build_tiny_processor` writes the files a Qwen3-VL
checkpoint ships (tokenizer.json, tokenizer_config.json, chat_template.jinja, preprocessor_config.json,
video_preprocessor_config.json) around a small byte-level BPE. The folder is then loaded with the same
transformers classes as a real checkpoint (Qwen2Tokenizer, Qwen2VLImageProcessor*, Qwen3VLProcessor).

`<answer>`/`</answer>` are deliberately NOT added tokens: Qwen3-VL does not have them, so they stay plain text
(a few BPE tokens each) exactly as they would with a real checkpoint.
"""

import json
import os
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# Added tokens in Qwen3-VL's id order (Qwen's FIM/repo tokens are left out); True marks special tokens,
# which `skip_special_tokens` removes. Tool and think tags are non-special, as in Qwen, so they survive decoding.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
_BYTE_ALPHABET_SIZE = 256

# Qwen3-VL-Thinking's chat format: same rendering as the published template (system + <tools>, vision
# placeholders in any role, <think> kept only after the last real user query, tool_calls as JSON inside
# <tool_call>, consecutive tool messages grouped in one user turn, generation prompt opening <think>).
# Only addition: `content: None` renders as empty text instead of failing.
CHAT_TEMPLATE = r"""
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is not none %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ image_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ video_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- render_content(messages[0].content, false) + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within '
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
        '\n</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + render_content(messages[0].content, false) + '<|im_end|>\n' }}
{%- endif %}
{#- The last user turn that is a real query (not a wrapped tool response) decides where reasoning is kept. #}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' %}
        {%- set content = render_content(message.content, false) %}
        {%- if not (content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true) %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n'
                + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if not loop.first or content %}
                {{- '\n' }}
            {%- endif %}
            {%- if tool_call.function %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n<think>\n' }}
{%- endif %}
""".strip()

# Text shaped like what the RL loop feeds the model, so common pieces become single BPE tokens.
_BUILTIN_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.",
    "You are a helpful assistant. Look at the image carefully and answer the question.",
    "How many apples are on the table? There are three red apples and two green ones.",
    "What color is the car in the picture? The car is blue and it is parked near the house.",
    "Let me think step by step. First I count the objects, then I check the answer again.",
    "The user wants to know the area of the rectangle: width times height equals the area.",
    "I should zoom in on the top left corner to read the small text on the sign.",
    "Describe the scene: a cat sits on a chair next to a window, the sun is shining outside.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 100 128 256 512 1000 1024 2048 3.14 2.718 -1 0.5",
    "Solve 12 + 30 = 42, so the final answer is \\boxed{42}. Also 7 * 6 = 42 and 84 / 2 = 42.",
    "We have x^2 - 5x + 6 = 0, hence (x - 2)(x - 3) = 0 and x \\in \\{2, 3\\}. Answer: \\boxed{2}",
    "\\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}; \\sqrt{16} = 4; \\sum_{i=1}^{n} i = \\frac{n(n+1)}{2}",
    "<answer>42</answer> <answer>yes</answer> <answer>no</answer> <answer>B</answer>",
    '{"name": "zoom_in", "arguments": {"bbox": [10, 20, 110, 220], "label": "sign"}}',
    '{"name": "crop_image", "arguments": {"x": 0, "y": 0, "width": 64, "height": 48}}',
    '{"name": "calculator", "arguments": {"expression": "(3 + 4) * 6"}}',
    '{"type": "function", "function": {"name": "search", "description": "Search the web.", '
    '"parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}',
    '{"result": "ok", "value": 3, "items": [1, 2, 3], "nested": {"a": true, "b": false, "c": null}}',
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:",
    "def compute_reward(response: str, answer: str) -> float:\n"
    "    \"\"\"Return 1.0 when the boxed answer matches.\"\"\"\n"
    "    if answer in response:\n"
    "        return 1.0\n"
    "    return 0.0\n",
    "import numpy as np\n\nfor i in range(10):\n    x = np.zeros((i, 3), dtype=np.float32)\n    print(x.shape)\n",
    "class Counter:\n    def __init__(self):\n        self.count = 0\n\n    def step(self):\n        self.count += 1\n",
    "result = [value * 2 for value in values if value > 0]\nreturn {'total': sum(result), 'n': len(result)}",
)


def _train_byte_level_bpe(texts: Iterable[str], bpe_vocab_size: int) -> Tokenizer:
    """Byte-level BPE with Qwen2's normalizer and pre-tokenizer, so Qwen2Tokenizer (which rebuilds that
    pipeline around the saved vocab/merges) tokenizes exactly as the trained tokenizer does."""
    tokenizer = Tokenizer(BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, ensure_ascii=False)
        f.write("\n")


def build_tiny_processor(
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 512,
    patch_size: int = 16,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    min_pixels: int = 32 * 32,
    max_pixels: int = 128 * 128,
    corpus: Iterable[str] | None = None,
) -> dict:
    """Writes tokenizer files, chat template and preprocessor configs into out_dir; returns the special token ids
    the model config needs: {"image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
    "eos_token_id", "pad_token_id", "vocab_size" (len(tokenizer))}.

    `vocab_size` is the target size of the whole vocabulary (256 bytes + BPE merges + added tokens); the returned
    value is smaller only if the corpus runs out of pairs to merge. min/max_pixels bound each image's resized area,
    so with the defaults an image takes 1 to 16 <|image_pad|> tokens (e.g. 32x32 -> grid 1x2x2, 128x96 -> 1x6x8).
    """
    min_vocab_size = _BYTE_ALPHABET_SIZE + len(ADDED_TOKENS)
    if vocab_size <= min_vocab_size:
        raise ValueError(f"vocab_size must exceed {min_vocab_size} (byte alphabet + added tokens), got {vocab_size}")
    os.makedirs(out_dir, exist_ok=True)

    texts = [*_BUILTIN_CORPUS, *(corpus or ())]
    tokenizer = _train_byte_level_bpe(texts, vocab_size - len(ADDED_TOKENS))
    for token, special in ADDED_TOKENS:  # one at a time, so ids follow ADDED_TOKENS' order
        added = AddedToken(token, special=special, normalized=False)
        if special:
            tokenizer.add_special_tokens([added])
        else:
            tokenizer.add_tokens([added])
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))

    _write_json(
        os.path.join(out_dir, "tokenizer_config.json"),
        {
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": None,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "unk_token": None,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "model_max_length": 262144,
        },
    )
    with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(CHAT_TEMPLATE)

    vision_config = {
        "processor_class": "Qwen3VLProcessor",
        "patch_size": patch_size,
        "temporal_patch_size": temporal_patch_size,
        "merge_size": merge_size,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
    }
    _write_json(
        os.path.join(out_dir, "preprocessor_config.json"),
        {
            "image_processor_type": "Qwen2VLImageProcessor",
            **vision_config,
            "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        },
    )
    # Video budgets count pixels over all frames: at least one temporal patch at min_pixels, at most four at
    # max_pixels. Only the torchvision-backed Qwen3VLVideoProcessor reads this file.
    _write_json(
        os.path.join(out_dir, "video_preprocessor_config.json"),
        {
            "video_processor_type": "Qwen3VLVideoProcessor",
            **vision_config,
            "size": {
                "shortest_edge": min_pixels * temporal_patch_size,
                "longest_edge": max_pixels * temporal_patch_size * 4,
            },
        },
    )

    token_id = tokenizer.token_to_id
    return {
        "image_token_id": token_id("<|image_pad|>"),
        "video_token_id": token_id("<|video_pad|>"),
        "vision_start_token_id": token_id("<|vision_start|>"),
        "vision_end_token_id": token_id("<|vision_end|>"),
        "eos_token_id": token_id(EOS_TOKEN),
        "pad_token_id": token_id(PAD_TOKEN),
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
    }
