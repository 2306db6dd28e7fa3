"""The tiny Qwen3-VL processor folder loads and behaves like a real checkpoint's (without torch, too)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from axpo_jax.data.processor import load_processor
from axpo_jax.data.tiny_processor import ADDED_TOKENS, build_tiny_processor

ROOT = Path(__file__).resolve().parents[2]
MERGE_LENGTH = 2 * 2  # merge_size**2: patches per <|image_pad|> token

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "zoom_in",
            "description": "Zoom into a region.",
            "parameters": {"type": "object", "properties": {"bbox": {"type": "array"}}, "required": ["bbox"]},
        },
    }
]
CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many apples?"}]},
    {
        "role": "assistant",
        "content": "<think>\nI should zoom.\n</think>\n\n",
        "tool_calls": [
            {"type": "function", "function": {"name": "zoom_in", "arguments": {"bbox": [0, 0, 16, 16]}}},
            {"type": "function", "function": {"name": "zoom_in", "arguments": {"bbox": [16, 16, 32, 32]}}},
        ],
    },
    {"role": "tool", "content": [{"type": "text", "text": "Zoomed:"}, {"type": "image"}]},
    {"role": "tool", "content": "out of bounds"},
    {"role": "assistant", "content": "<think>\nThree apples.\n</think>\n\n<answer>3</answer>"},
]
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
EXPECTED_RENDERING = (
    "<|im_start|>system\nYou are a careful assistant.\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(TOOLS[0])
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
    f"<|im_start|>user\n{VISION}How many apples?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nI should zoom.\n</think>\n\n"
    '<tool_call>\n{"name": "zoom_in", "arguments": {"bbox": [0, 0, 16, 16]}}\n</tool_call>\n'
    '<tool_call>\n{"name": "zoom_in", "arguments": {"bbox": [16, 16, 32, 32]}}\n</tool_call><|im_end|>\n'
    f"<|im_start|>user\n<tool_response>\nZoomed:{VISION}\n</tool_response>\n"
    "<tool_response>\nout of bounds\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n<think>\nThree apples.\n</think>\n\n<answer>3</answer><|im_end|>\n"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_qwen3_vl")
    return folder, build_tiny_processor(folder)


def _images(*sizes):
    """Solid-colour RGB images of the given (width, height)."""
    return [Image.new("RGB", size, color=(30 * i, 100, 200)) for i, size in enumerate(sizes)]


def test_default_ids_and_vocab_size(tiny):
    folder, ids = tiny
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert ids["vocab_size"] == len(tokenizer) == 512
    assert ids == {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": 512,
    }
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_added_tokens_are_single_tokens_in_qwen_order(tiny):
    folder, ids = tiny
    tokenizer = AutoTokenizer.from_pretrained(folder)
    first_id = ids["vocab_size"] - len(ADDED_TOKENS)
    for offset, (token, special) in enumerate(ADDED_TOKENS):
        assert tokenizer.encode(f"a {token}b") == [*tokenizer.encode("a "), first_id + offset, *tokenizer.encode("b")]
        assert tokenizer.added_tokens_decoder[first_id + offset].special is special
    tool_call = 'Let me zoom.\n<tool_call>\n{"name": "zoom_in", "arguments": {}}\n</tool_call>'
    assert tokenizer.encode(tool_call)[-1] == tokenizer.convert_tokens_to_ids("</tool_call>")
    # Tool/think tags are not special: they survive skip_special_tokens, as in Qwen.
    assert tokenizer.decode(tokenizer.encode(tool_call + "<|im_end|>"), skip_special_tokens=True) == tool_call


def test_chat_template_renders_qwen3_vl_thinking_format(tiny):
    folder, _ = tiny
    processor = load_processor(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rendered = processor.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False)
    assert rendered == EXPECTED_RENDERING
    assert tokenizer.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False) == EXPECTED_RENDERING

    prompt = processor.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{VISION}How many apples?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    # Reasoning before the last real user query is dropped; tool-response turns do not count as queries.
    earlier_turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nx\n</think>\n\nHello"}]
    rendered = tokenizer.apply_chat_template([*earlier_turn, CONVERSATION[1]], tokenize=False)
    assert "<think>" not in rendered and "<|im_start|>assistant\nHello<|im_end|>" in rendered


@pytest.mark.parametrize(
    "sizes, grids",
    [
        ([(128, 96)], [[1, 6, 8]]),
        ([(32, 32), (50, 70), (300, 200)], [[1, 2, 2], [1, 4, 4], [1, 6, 8]]),  # 300x200 is capped by max_pixels
    ],
)
def test_image_pad_tokens_match_image_grid(tiny, sizes, grids):
    folder, ids = tiny
    processor = load_processor(folder)
    messages = [{"role": "user", "content": [*({"type": "image"} for _ in sizes), {"type": "text", "text": "Compare."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out = processor(images=_images(*sizes), text=[text], return_tensors="np")

    assert out["image_grid_thw"].tolist() == grids
    assert out["pixel_values"].shape == (sum(np.prod(grids, axis=1)), 3 * 2 * 16 * 16)
    input_ids = out["input_ids"][0]
    starts = np.flatnonzero(input_ids == ids["vision_start_token_id"])
    ends = np.flatnonzero(input_ids == ids["vision_end_token_id"])
    pads_per_image = [np.sum(input_ids[s:e] == ids["image_token_id"]) for s, e in zip(starts, ends, strict=True)]
    assert pads_per_image == [np.prod(grid) // MERGE_LENGTH for grid in grids]
    # mm_token_type_ids is returned by default: 1 marks image tokens, 0 text.
    np.testing.assert_array_equal(out["mm_token_type_ids"][0], input_ids == ids["image_token_id"])


def test_decode_encode_round_trips_any_text(tiny):
    folder, _ = tiny
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [
        "plain text, numbers 12345 and \\boxed{42}",
        "  leading spaces\ttabs\r\nand\n\nnewlines  ",
        "unicode: héllo naïve Ωμέγα 日本語 한국어 العربية 🦊🍎 \u200b\x00\x7f",
        '{"name": "zoom_in", "arguments": {"bbox": [1, 2, 3, 4]}} <answer>3</answer>',
        "<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>",
    ]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # Like Qwen's tokenizer, input is NFC-normalized first.
    assert tokenizer.decode(tokenizer.encode("e\u0301")) == "\u00e9"


def test_build_options(tmp_path):
    plain = build_tiny_processor(tmp_path / "plain", vocab_size=400)
    with_corpus = build_tiny_processor(tmp_path / "corpus", vocab_size=400, corpus=["axpo rollout trajectory"] * 20)
    assert plain["vocab_size"] == with_corpus["vocab_size"] == 400
    plain_tok = AutoTokenizer.from_pretrained(tmp_path / "plain")
    corpus_tok = AutoTokenizer.from_pretrained(tmp_path / "corpus")
    assert len(corpus_tok.tokenize(" trajectory")) == 1 < len(plain_tok.tokenize(" trajectory"))
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_processor(tmp_path / "too_small", vocab_size=276)


def test_builds_and_processes_without_torch(tiny, tmp_path):
    """The demo's environment has no torch/torchvision; a fresh build there must also match this one byte for byte."""
    script = textwrap.dedent(
        """
        import json, sys
        sys.modules["torch"] = None  # any import of torch/torchvision now raises ImportError
        sys.modules["torchvision"] = None
        from PIL import Image
        from transformers import Qwen3VLProcessor
        from axpo_jax.data.processor import load_processor
        from axpo_jax.data.tiny_processor import build_tiny_processor

        folder = sys.argv[1]
        ids = build_tiny_processor(folder)
        processor = load_processor(folder)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out = processor(images=[Image.new("RGB", (64, 64))], text=[text], return_tensors="np")
        print(json.dumps({
            "ids": ids,
            "is_qwen3_vl_processor": isinstance(processor, Qwen3VLProcessor),
            "grid": out["image_grid_thw"].tolist(),
            "image_pads": int((out["input_ids"] == ids["image_token_id"]).sum()),
            "has_mm_token_type_ids": "mm_token_type_ids" in out,
        }))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    folder, ids = tiny
    assert report == {
        "ids": ids,
        "is_qwen3_vl_processor": True,
        "grid": [[1, 4, 4]],
        "image_pads": 4,
        "has_mm_token_type_ids": True,
    }
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name
