"""A sampler that writes scripted turns instead of sampling (through the real KV cache, each token scored by the
model), so evaluation tests know which answers and tool calls each trajectory makes."""

from tests.rollout.test_agent_loop import ScriptedSampler as AgentLoopScriptedSampler

ZOOM = ('<tool_call>\n{"name": "image_zoom_in", "arguments": {"bbox_2d": [0, 0, 500, 500], "label": "corner"}}'
        '\n</tool_call>')
BAD_JSON = "<tool_call>\n{bad json}\n</tool_call>"


def answer(text: str) -> str:
    return f"<answer>\\boxed{{{text}}}</answer>"


class ScriptedSampler(AgentLoopScriptedSampler):
    """`scripts[row]` is the list of turns (token lists) row `row` writes, one per decode call, across rollouts;
    `decode_calls` counts the decodes since the scripts were set."""

    def set_scripts(self, tokenizer, rows: list[list[str]]) -> None:
        self.scripts = [[tokenizer.encode(turn, add_special_tokens=False) for turn in row] for row in rows]
        self.decode_calls = 0

    def decode(self, *args, **kwargs):
        self.decode_calls += 1
        return super().decode(*args, **kwargs)
