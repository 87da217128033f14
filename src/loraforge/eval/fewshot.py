"""In-context K-shot prompts: the base model sees K solved examples of the task before the one it answers.

Where the shots come from: a separate file (`loraforge eval --few-shot-data FILE`, typically the training file),
never the records being scored. `pick_shots` draws K records from it with a fixed seed (stratified by label for
classification recipes, `data.split.sample_few_shot`), after dropping every record whose prompt is one of the
scored prompts (so passing the evaluation file itself is safe) and repeats of a prompt already in the pool (E2E has
several references per input; one shot per input). The same K shots, in file order, precede every scored record.

How they are rendered, so the prompt looks like what the model was (or would be) trained on:
- a "plain" recipe (`Recipe.prompt_style`, e2e): each shot's plain prompt followed by its target and a blank line,
  then the scored record's plain prompt;
- chat template: one user/assistant turn pair per shot (the user turn as `render_prompt` writes it: instruction,
  blank line, input; the assistant turn the recipe's target), then the scored record's user turn and the
  generation prompt;
- Alpaca: each shot's Alpaca prompt followed by its target and a blank line, then the scored record's prompt.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from loraforge.data import Example, Record, Recipe, has_chat_template, prompt_ids, render_prompt
from loraforge.data.chat import render_chat
from loraforge.data.split import sample_few_shot
from loraforge.errors import LoraforgeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SHOT_SEPARATOR = "\n\n"
"""Between an Alpaca shot's answer and the next prompt."""


def pick_shots(
    pool: Iterable[Record], recipe: Recipe, k: int, seed: int, exclude: Iterable[tuple[str, str]] = ()
) -> list[Record]:
    """K records of `pool` drawn with `seed`, none with a prompt in `exclude` (the scored prompts), one per prompt."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise LoraforgeError(f"few-shot K is {k!r}; give how many in-context examples to show, at least 1")
    excluded = set(exclude)
    seen: set[tuple[str, str]] = set()

    def candidates() -> Iterable[Record]:
        for record in pool:
            prompt = recipe.prompt(record)
            if prompt in excluded or prompt in seen:
                continue
            seen.add(prompt)
            recipe.target(record)  # a shot must have an answer to show; a bad one stops here with its file:line
            yield record

    label = recipe.columns.get("label", "label") if "label" in recipe.FIELDS else None
    try:
        return sample_few_shot(candidates(), k, seed, label_key=label)
    except LoraforgeError as err:
        raise LoraforgeError(f"few-shot examples: {err} (after leaving out the scored records)") from None


def few_shot_text(recipe: Recipe, shots: list[Record], record: Record, tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt text: the K shots with their answers, then `record`'s prompt (see the module docstring)."""
    if _uses_chat(recipe, tokenizer):
        messages = []
        for shot in shots:
            messages += [{"role": "user", "content": _user_turn(recipe, shot)},
                         {"role": "assistant", "content": recipe.target(shot)}]
        messages.append({"role": "user", "content": _user_turn(recipe, record)})
        return render_chat(tokenizer, messages, add_generation_prompt=True)
    if recipe.prompt_style == "plain":
        prompt = recipe.plain_prompt
    else:
        def prompt(r: Record) -> str:
            return render_prompt(*recipe.prompt(r))  # Alpaca
    blocks = [prompt(shot) + recipe.target(shot) for shot in shots]
    return "".join(block + SHOT_SEPARATOR for block in blocks) + prompt(record)


def encode_few_shot(
    recipe: Recipe, shots: list[Record], record: Record, tokenizer: PreTrainedTokenizerBase
) -> list[int]:
    """`few_shot_text` as ids, with the special tokens a zero-shot prompt gets (BOS for plain text if the tokenizer
    adds one; nothing for chat-template text, whose template wrote its own)."""
    text = few_shot_text(recipe, shots, record, tokenizer)
    return prompt_ids(Example.from_prompt(text, "", add_special_tokens=not _uses_chat(recipe, tokenizer)), tokenizer)


def _uses_chat(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Does `recipe` write its prompts through `tokenizer`'s chat template (as `Recipe.to_example` does)?"""
    return recipe.prompt_style == "instruction" and has_chat_template(tokenizer)


def _user_turn(recipe: Recipe, record: Record) -> str:
    instruction, input_ = recipe.prompt(record)
    return instruction + ("\n\n" + input_ if input_.strip() else "")  # as render_prompt writes a one-turn chat
