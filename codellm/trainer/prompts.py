"""Training prompts: the base model's chat template (instruct models) or an Alpaca template (base
models), tokenized so that only the response tokens carry labels; prompt tokens get -100."""

from __future__ import annotations

from codellm.trainer.data import Example

IGNORE = -100
ALPACA = ("Below is an instruction that describes a task{extra}. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")


def alpaca_prompt(ex: Example) -> str:
    if ex.instruction is None:
        return ex.prompt or ""
    input_block = f"### Input:\n{ex.context}\n\n" if ex.context else ""
    extra = ", paired with an input that provides further context" if ex.context else ""
    return ALPACA.format(extra=extra, instruction=ex.instruction, input_block=input_block)


def encode(ex: Example, tokenizer, template: str, max_len: int) -> tuple[list[int], list[int], bool] | None:
    """(input_ids, labels, truncated) for one example; None when not even the prompt fits."""
    eos = tokenizer.eos_token or ""
    if template == "chat" and ex.prompt is None:
        msgs = ex.messages if ex.messages is not None else [
            {"role": "user", "content": ex.instruction + (f"\n\n{ex.context}" if ex.context else "")}]
        prompt_text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": ex.response}], tokenize=False)
        response_text = full_text[len(prompt_text):] if full_text.startswith(prompt_text) else ex.response + eos
    else:
        prompt_text = alpaca_prompt(ex) if ex.messages is None else tokenizer.apply_chat_template(
            ex.messages, tokenize=False, add_generation_prompt=True)
        response_text = ex.response + eos
    prompt_ids = tokenizer(prompt_text, add_special_tokens=template != "chat")["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    if eos and tokenizer.eos_token_id in response_ids:  # the template's tail after EOS is not the model's to learn
        response_ids = response_ids[:response_ids.index(tokenizer.eos_token_id) + 1]
    elif eos:
        response_ids.append(tokenizer.eos_token_id)  # the model must learn to stop
    if len(prompt_ids) >= max_len:
        return None
    ids = prompt_ids + response_ids
    truncated = len(ids) > max_len
    ids = ids[:max_len]
    labels = [IGNORE] * len(prompt_ids) + response_ids
    return ids, labels[:max_len], truncated
