"""The example's reward function: drpt-ray calls `score(prompt, response, reference)` once per
sampled response, in a child process, and trains on the float it returns.

`reference` is the data's `response` for that prompt. The reward is strict: 1.0 for exactly the
reference answer (its letters and its format), else 0.0. So a general prompt answered in the
conflicting format pays for that format, while the target prompts pay for the target format only.
"""


def score(prompt: str, response: str, reference: str | None) -> float:
    return float(reference is not None and response.strip() == reference.strip())
