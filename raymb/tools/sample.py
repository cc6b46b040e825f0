"""`raymb sample`: continue a prompt with a saved language model, in this process.

The checkpoint's model.pt keeps the tokenizer it was trained with (raymb.data.tokenizer), so
sampling needs no data folder. Each new token is drawn from the softmax of the last
position's logits divided by the temperature (0: the most likely token), restricted to the
top k when asked, with a seeded generator: the same seed prints the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymb.config import Config
from raymb.errors import CheckpointError, RaymbError
from raymb.rundir.checkpoint import read
from raymb.tools.checkpoint_checks import check_payload
from raymb.tools.checks import check_sample
from raymb.tools.load import build_from_payload, model_file, payload_inputs


@dataclass(frozen=True)
class Sample:
    prompt_tokens: list[int]
    tokens: list[int]
    """The continuation's token ids (as many as asked)."""
    text: str
    """The continuation, decoded."""


@torch.no_grad()
def sample(
    checkpoint: str,
    prompt: str,
    tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    trust_model_code: bool = False,
) -> Sample:
    """Draw `tokens` tokens after `prompt` from the model saved in `checkpoint` (a custom
    model factory runs only with `trust_model_code`: raymb.checkpoint.load_model)."""
    from raymb.data.tokenizer import tokenizer_from_spec

    check_sample(tokens, temperature, top_k, seed, prompt)
    payload = read(model_file(checkpoint))
    check_payload(payload, checkpoint)
    inputs = payload_inputs(payload)
    if inputs.task != "lm":  # before the model is built: it would not be used
        what = f"trained for {inputs.task}"
        if inputs.columns is not None:
            what += f" on named inputs {', '.join(name for name, _ in inputs.columns)}"
        raise CheckpointError(
            f"{checkpoint}: not a language model ({what}); raymb sample continues token blocks "
            "(data.task = lm); use raymb predict"
        )
    model = build_from_payload(payload, checkpoint, trust_model_code=trust_model_code)
    if payload.get("tokenizer") is None:
        raise CheckpointError(
            f"{checkpoint}: the model was trained on token ids without a tokenizer (data not "
            "made by raymb prepare text), so a text prompt cannot be encoded"
        )
    tokenizer = tokenizer_from_spec(payload["tokenizer"])
    ids = tokenizer.encode(prompt)
    if not ids:
        raise RaymbError("--prompt: empty; give at least one character to continue")
    vocab = payload["out_features"]
    if max(ids) >= vocab:
        raise CheckpointError(f"{checkpoint}: the prompt has token ids the model does not know")
    config = Config.from_saved(payload["config"])
    context = getattr(config.model, "block_size", None) or inputs.model_shape[0]
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    idx = torch.tensor([ids], dtype=torch.long)
    for _ in range(tokens):
        logits = model(idx[:, -context:])[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < vocab:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    new = idx[0, len(ids) :].tolist()
    return Sample(prompt_tokens=ids, tokens=new, text=tokenizer.decode(new))
